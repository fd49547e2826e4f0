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


@functools.lru_cache(maxsize=2)
def digits(image: bool = False) -> Split:
    """1347 train / 450 test samples; features scaled to [0, 1]; image=True gives 1x8x8."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    return Split(torch.from_numpy(x_tr).reshape(shape), torch.from_numpy(y_tr.astype(np.int64)),
                 torch.from_numpy(x_te).reshape(shape), torch.from_numpy(y_te.astype(np.int64)))


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
