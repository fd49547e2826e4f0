"""Built-in models by name. Each entry builds the module and names its dataset and task."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from shardps.pscommon.errors import InvalidArgument

from shardps.worker import data
from shardps.worker.models import ctr_sparse
from shardps.worker.models.ctr import CTRModel, ctr_data


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    build: Callable[[], nn.Module]
    dataset: Callable[[], object]     # data.Split for classification, ctr_sparse.ClickSplit for clicks
    task: object = data.CLASSIFICATION  # inputs, loss and held-out metrics (data.Classification's methods)


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
    "ctr": ModelEntry(CTRModel, ctr_data),
    # rows in a sharded table keyed by the raw 64-bit ids; train with an optimizer that has a
    # sparse form (sgd, adagrad, adam): `--optimizer adagrad --lr 0.02 --initial-accumulator 1e-6`
    "ctr-sparse": ModelEntry(ctr_sparse.CTRShardedModel, ctr_sparse.click_data, ctr_sparse.CLICK),
}


def entry(model: str, data_spec: str | None = None) -> ModelEntry:
    """A built-in model by name, or `module:function` (with --data `module:function`)."""
    from shardps.worker import loading
    if model in BUILTIN and not data_spec:
        return BUILTIN[model]
    build_fn = BUILTIN[model].build if model in BUILTIN else (lambda: loading.build_model(model))
    if data_spec:
        task = BUILTIN[model].task if model in BUILTIN else data.CLASSIFICATION
        return ModelEntry(build_fn, lambda: loading.load_data(data_spec), task)
    if model not in BUILTIN:
        raise InvalidArgument(f"--model {model!r} is not built in ({', '.join(sorted(BUILTIN))}): "
                              "give its data with --data module:function")
    return BUILTIN[model]


def build(name: str, seed: int = 0, data_spec: str | None = None) -> nn.Module:
    """The model with weights drawn from `seed` (every worker draws the same)."""
    torch.manual_seed(seed)
    return entry(name, data_spec).build()
