"""Built-in datasets: scikit-learn's bundled digits (no downloads), split as the peer
benchmarks split it (bench/peers/README.md, workload "digits"); and the classification task
the worker's loop trains them with.

A task is what the loop needs to know about a model and its data, and nothing else: the
number of training samples, a batch's model inputs and targets, the loss, and the held-out
metrics. `Classification` (here) serves the digits models and `ctr`; the click task of
`ctr-sparse` is `models.ctr_sparse.ClickPrediction`. The loop reads a model's task from its
`models.ModelEntry`.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import pathlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as `load_digits(return_X_y=True)` gives them (float64
    pixels 0..16, int64 labels), read from its CSV: importing scikit-learn would cost a worker
    process about 2 s at start."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-learn is not installed: the digits dataset is its bundled copy")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=2)
def digits(image: bool = False) -> Split:
    """1347 train / 450 test samples; features scaled to [0, 1]; image=True gives 1x8x8."""
    from shardps.worker.digits_split import TEST, TRAIN

    x, y = bundled_digits()
    x = (x / 16.0).astype(np.float32)
    train, test = np.asarray(TRAIN), np.asarray(TEST)
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    return Split(torch.from_numpy(x[train]).reshape(shape), torch.from_numpy(y[train]),
                 torch.from_numpy(x[test]).reshape(shape), torch.from_numpy(y[test]))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    device = next(model.parameters()).device
    with torch.no_grad():
        pred = model(x.to(device)).argmax(dim=1).cpu()
    return float((pred == y).float().mean())


class Classification:
    """x -> class logits, cross-entropy, held-out accuracy (`Split` data)."""

    name = "classification"

    def size(self, split: Split) -> int:
        return len(split.x_train)

    def batch(self, split: Split, idx: torch.Tensor, device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(the model's inputs, the targets) of the training samples `idx`."""
        return (split.x_train[idx].to(device),), split.y_train[idx].to(device)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    def evaluate(self, model: torch.nn.Module, split: Split, fetch_rows: Callable | None = None) -> dict:
        """Held-out metrics, as the worker's final record names them. `fetch_rows` loads the
        rows of sharded embedding tables; a dense model needs none."""
        return {"eval_accuracy": round(accuracy(model, split.x_test, split.y_test), 4)}


CLASSIFICATION = Classification()
