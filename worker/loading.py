"""Bring your own model and data: `module:function` specs, checked with clear errors."""
from __future__ import annotations

import importlib

import torch
from torch import nn

from shardps.pscommon.errors import InvalidArgument
from shardps.worker.data import Split
from shardps.worker.models.ctr_sparse import ClickPrediction, ClickSplit


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


def load_data(spec: str) -> Split | ClickSplit:
    """The function returns a worker.data.Split or (x_train, y_train, x_test, y_test) tensors
    (the classifiers), or a worker.models.ctr_sparse.ClickSplit (ctr-sparse: a click log of
    another size or seed, e.g. `ctr_sparse.click_data(6000, 3000)`). Which one the model
    trains on is check_split's to say."""
    result = _call(load_callable(spec, "--data"), spec, "--data")
    if isinstance(result, Split):
        return result
    if isinstance(result, ClickSplit):
        return _checked_clicks(result, spec)
    if (isinstance(result, (tuple, list)) and len(result) == 4
            and all(isinstance(t, torch.Tensor) for t in result)):
        x_tr, y_tr, x_te, y_te = result
        if len(x_tr) != len(y_tr) or len(x_te) != len(y_te) or len(x_tr) == 0:
            raise InvalidArgument(f"--data {spec!r}: inputs and labels differ in length, or no training data")
        return Split(x_tr, y_tr, x_te, y_te)
    raise InvalidArgument(f"--data {spec!r} returned {type(result).__name__}; expected worker.data.Split, "
                          "a tuple (x_train, y_train, x_test, y_test) of tensors, or (ctr-sparse) "
                          "worker.models.ctr_sparse.ClickSplit")


def _checked_clicks(s: ClickSplit, spec: str) -> ClickSplit:
    """A click log whose parts agree: ids int64, one row of ids, dense features and label per
    sample, and some training and test samples. (A wrong field count or dense width is the
    model's to refuse: check_fits runs it.)"""
    parts = ((s.ids_train, s.dense_train, s.y_train), (s.ids_test, s.dense_test, s.y_test))
    if not all(isinstance(t, torch.Tensor) for p in parts for t in p) or not isinstance(s.teacher, dict):
        raise InvalidArgument(f"--data {spec!r}: a ClickSplit holds tensors and a dict of the teacher's metrics")
    for what, (ids, dense, y) in zip(("training", "test"), parts):
        if ids.dtype != torch.int64 or ids.dim() != 2 or dense.dim() != 2 or y.dim() != 1:
            raise InvalidArgument(f"--data {spec!r}: the {what} ids must be int64 (n, fields), the dense "
                                  "features (n, dense) and the labels (n,)")
        if not len(ids) == len(dense) == len(y) or len(y) == 0:
            raise InvalidArgument(f"--data {spec!r}: the {what} ids, dense features and labels differ in "
                                  "length, or there are none")
    return s


def check_split(split, task, model: str, spec: str | None) -> None:
    """`--data` gave what the model's task trains on (a click log for ctr-sparse, a Split for
    the classifiers), or a usage error that names both, before anything joins the job."""
    wanted = ClickSplit if isinstance(task, ClickPrediction) else Split
    if spec and not isinstance(split, wanted):
        raise InvalidArgument(f"--data {spec!r} returned a {type(split).__name__}; --model {model!r} trains on "
                              f"{wanted.__module__.removeprefix('shardps.')}.{wanted.__name__}")
