"""Bring your own model and data: `module:function` specs, checked with clear errors."""
from __future__ import annotations

import importlib

import torch
from torch import nn

from shardps.pscommon.errors import InvalidArgument
from shardps.worker.data import Split


def load_callable(spec: str, what: str):
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise InvalidArgument(f"{what} {spec!r} is neither a built-in name nor module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - user code may raise anything while importing
        raise InvalidArgument(f"{what} {spec!r}: cannot import module {module_name!r} "
                              f"({type(exc).__name__}: {exc})") from None
    fn = getattr(module, func_name, None)
    if fn is None:
        raise InvalidArgument(f"{what} {spec!r}: module {module_name!r} has no {func_name!r}")
    if not callable(fn):
        raise InvalidArgument(f"{what} {spec!r}: {func_name!r} is not callable")
    return fn


def _call(fn, spec: str, what: str):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - user code: report it as one line, not a traceback
        raise InvalidArgument(f"{what} {spec!r} raised {type(exc).__name__}: {exc}") from None


def build_model(spec: str) -> nn.Module:
    model = _call(load_callable(spec, "--model"), spec, "--model")
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"--model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_data(spec: str) -> Split:
    """The function returns a worker.data.Split or (x_train, y_train, x_test, y_test) tensors."""
    result = _call(load_callable(spec, "--data"), spec, "--data")
    if isinstance(result, Split):
        return result
    if (isinstance(result, (tuple, list)) and len(result) == 4
            and all(isinstance(t, torch.Tensor) for t in result)):
        x_tr, y_tr, x_te, y_te = result
        if len(x_tr) != len(y_tr) or len(x_te) != len(y_te) or len(x_tr) == 0:
            raise InvalidArgument(f"--data {spec!r}: inputs and labels differ in length, or no training data")
        return Split(x_tr, y_tr, x_te, y_te)
    raise InvalidArgument(f"--data {spec!r} returned {type(result).__name__}; expected worker.data.Split "
                          "or a tuple (x_train, y_train, x_test, y_test) of tensors")
