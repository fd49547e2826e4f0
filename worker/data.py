"""Built-in datasets: scikit-learn's bundled digits (no downloads), split as the peer
benchmarks split it (bench/peers/README.md, workload "digits")."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch


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
