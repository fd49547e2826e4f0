"""Built-in models by name. Each entry builds the module and names its dataset."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from worker import data


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    build: Callable[[], nn.Module]
    dataset: Callable[[], data.Split]


def digits_mlp() -> nn.Module:
    """The peer benchmark's model: 64 -> 128 -> 10, 9,610 parameters."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


BUILTIN = {
    "digits-mlp": ModelEntry(digits_mlp, lambda: data.digits(image=False)),
    "digits-cnn": ModelEntry(digits_cnn, lambda: data.digits(image=True)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The named model with weights drawn from `seed` (every worker draws the same)."""
    torch.manual_seed(seed)
    return BUILTIN[name].build()
