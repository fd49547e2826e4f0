"""Sparse optimizers for embedding tables: each update touches the rows a push names and no other.

An optimizer works on a row store's slabs (psserver/rowstore.py): `values` float32
[capacity, dim] and one state slab per name in `state_spec`, of the same row layout. `apply`
gets the slots of the rows to update, unique, and their gradients, duplicates already summed,
and updates those rows in place: gather, compute on the gathered copies, scatter back (faster
than in-place fancy-index arithmetic, and what torch's own sparse kernels do). Numpy in,
numpy out; nothing here knows about ids, the index or the wire.

Semantics, each checked against torch on the same gradients to 1e-6
(tests/unit/test_sparse_optim.py):

- **sgd**: torch.optim.SGD on a sparse gradient: ``w -= lr * g``. Weight decay, when set, is
  applied to the touched rows only (``g += weight_decay * w`` for the rows in the push);
  torch's dense weight decay would shrink every row every step, which is neither sparse nor
  what an embedding table wants (a row nobody looks up should stay as it was). Momentum is not
  offered: a lazy momentum buffer on rows that are only sometimes touched is not torch's SGD.
- **adagrad**: torch.optim.Adagrad on a sparse gradient (which refuses weight decay):
  ``sum += g*g; w -= clr * g / (sqrt(sum) + eps)`` with
  ``clr = lr / (1 + (step - 1) * lr_decay)``.
- **sparse_adam**: torch.optim.SparseAdam (lazy Adam): the moments of the touched rows only,
  ``m += (g - m)(1 - beta1); v += (g*g - v)(1 - beta2);
  w -= lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)`` (eps outside the bias
  correction, as torch). torch's ``t`` is one count per parameter, i.e. per table: the number
  of ``step()`` calls, including calls whose gradient names no row. ``step="global"`` (the
  default) does exactly that and matches torch; ``step="row"`` keeps a count per row instead,
  so a row's first update is Adam's bias-corrected ``lr * sign(g)`` whenever it comes; under
  the global count a row first touched at table step t moves by
  ``lr * sqrt(1 - beta2**t) / (1 - beta1**t) * (1 - beta1) / sqrt(1 - beta2)``, which tends to
  ``3.16 * lr`` with the default betas once t is in the thousands. "row" does not match torch.
- **ftrl**: FTRL-proximal, below.

``step`` is the table's count of apply calls, this one included (torch's ``state["step"]``);
the row store counts it. On a table sharded over servers each shard counts its own calls, so
a shard that is sent an (empty) push every step keeps torch's count.

FTRL-proximal (McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches",
Algorithm 1), per coordinate i, with per-coordinate learning rates
``eta_t,i = alpha / (beta + sqrt(n_i))``, state ``z_i`` and ``n_i`` (both start at 0), and
gradient ``g_i``::

    sigma_i = (sqrt(n_i + g_i^2) - sqrt(n_i)) / alpha
    z_i    <- z_i + g_i - sigma_i * w_t,i
    n_i    <- n_i + g_i^2
    w_t+1,i = 0                                                       if |z_i| <= lambda_1
            = -(z_i - sgn(z_i) * lambda_1) / ((beta + sqrt(n_i)) / alpha + lambda_2)   otherwise

with ``l1 = lambda_1``, ``l2 = lambda_2``. ``w_t`` is the stored row, so with the zeros
initializer this is the paper's algorithm exactly; with another initializer the first update
reads the initial value as ``w_t`` (as TensorFlow's Ftrl does) and every later value is the
closed form of ``(z, n)``. ``sigma`` is computed as ``g^2 / (alpha * (sqrt(n + g^2) +
sqrt(n)))``, the same quantity without the cancellation of two close square roots in float32.
"""
from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from typing import ClassVar

import numpy as np

from shardps.pscommon.errors import InvalidArgument

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One per-row state slab: `width` columns of `dtype`, every new row filled with `fill`."""

    name: str
    width: int
    dtype: str = "float32"
    fill: float = 0.0


def _number(owner: str, field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgument(f"{owner} {field} must be a finite number, got {value!r}")
    return float(value)


def _positive(owner, field, value):
    if _number(owner, field, value) <= 0:
        raise InvalidArgument(f"{owner} {field} must be > 0, got {value!r}")


def _non_negative(owner, field, value):
    if _number(owner, field, value) < 0:
        raise InvalidArgument(f"{owner} {field} must be >= 0, got {value!r}")


def _unit_interval(owner, field, value):
    if not 0 <= _number(owner, field, value) < 1:
        raise InvalidArgument(f"{owner} {field} must be in [0, 1), got {value!r}")


class _Config:
    """Mixin: JSON round trip for snapshots (plain dicts, no pickle)."""

    name: ClassVar[str]

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class SGDConfig(_Config):
    name: ClassVar[str] = "sgd"
    lr: float = 0.01
    weight_decay: float = 0.0  # touched rows only

    def __post_init__(self):
        _positive("sgd", "lr", self.lr)
        _non_negative("sgd", "weight_decay", self.weight_decay)


@dataclasses.dataclass(frozen=True)
class AdagradConfig(_Config):
    name: ClassVar[str] = "adagrad"
    lr: float = 0.01
    lr_decay: float = 0.0
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0

    def __post_init__(self):
        _positive("adagrad", "lr", self.lr)
        _non_negative("adagrad", "lr_decay", self.lr_decay)
        _positive("adagrad", "eps", self.eps)
        _non_negative("adagrad", "initial_accumulator_value", self.initial_accumulator_value)


@dataclasses.dataclass(frozen=True)
class SparseAdamConfig(_Config):
    name: ClassVar[str] = "sparse_adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step: str = "global"  # "global": torch.optim.SparseAdam; "row": a step count per row

    def __post_init__(self):
        _positive("sparse_adam", "lr", self.lr)
        _unit_interval("sparse_adam", "beta1", self.beta1)
        _unit_interval("sparse_adam", "beta2", self.beta2)
        _positive("sparse_adam", "eps", self.eps)
        if self.step not in ("global", "row"):
            raise InvalidArgument(f"sparse_adam step must be 'global' or 'row', got {self.step!r}")


@dataclasses.dataclass(frozen=True)
class FtrlConfig(_Config):
    name: ClassVar[str] = "ftrl"
    alpha: float = 0.05
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0

    def __post_init__(self):
        _positive("ftrl", "alpha", self.alpha)
        _non_negative("ftrl", "beta", self.beta)
        _non_negative("ftrl", "l1", self.l1)
        _non_negative("ftrl", "l2", self.l2)


def put_rows(slab: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None:
    """``slab[slots] = rows`` for a C-contiguous 2-D slab, moving each row as one item: fancy
    assignment of a 2-D array goes element by element, this up to twice as fast on wide rows."""
    width = slab.shape[1] * slab.itemsize
    row = _ROW_TYPES.get(width)
    if row is None:   # made once per width: a dtype costs as much to build as the put itself
        row = _ROW_TYPES.setdefault(width, np.dtype((np.void, width)))
    slab.view(row).ravel().put(slots, np.ascontiguousarray(rows, slab.dtype).view(row).ravel())


_ROW_TYPES: dict[int, np.dtype] = {}


class SparseOptimizer(abc.ABC):
    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.name

    def state_spec(self, dim: int) -> tuple[StateSpec, ...]:
        return ()

    @abc.abstractmethod
    def apply(self, values: np.ndarray, state: dict[str, np.ndarray], slots: np.ndarray,
              grads: np.ndarray, step: int) -> None:
        """Update rows `slots` (int64, unique) of `values` and `state` in place with `grads`
        (float32 [len(slots), dim], duplicates already summed); `step` counts this table's
        apply calls, this one included."""


class SparseSGD(SparseOptimizer):
    def apply(self, values, state, slots, grads, step):
        rows = values.take(slots, axis=0)
        if self.cfg.weight_decay:
            grads = grads + F32(self.cfg.weight_decay) * rows
        rows -= F32(self.cfg.lr) * grads
        put_rows(values, slots, rows)


class SparseAdagrad(SparseOptimizer):
    def state_spec(self, dim):
        return (StateSpec("sum", dim, fill=self.cfg.initial_accumulator_value),)

    def apply(self, values, state, slots, grads, step):
        cfg = self.cfg
        acc = state["sum"].take(slots, axis=0)
        work = grads * grads   # one temporary for the whole update: at a few hundred rows
        acc += work            # a step is numpy calls, and allocations are part of each
        put_rows(state["sum"], slots, acc)
        clr = cfg.lr / (1 + (step - 1) * cfg.lr_decay)
        std = np.sqrt(acc, out=work)
        std += F32(cfg.eps)
        update = np.divide(grads, std, out=work)
        update *= F32(clr)
        rows = values.take(slots, axis=0)
        rows -= update
        put_rows(values, slots, rows)


class SparseAdam(SparseOptimizer):
    def state_spec(self, dim):
        spec = (StateSpec("exp_avg", dim), StateSpec("exp_avg_sq", dim))
        return spec + ((StateSpec("step", 1, "int64"),) if self.cfg.step == "row" else ())

    def apply(self, values, state, slots, grads, step):
        cfg = self.cfg
        m = state["exp_avg"].take(slots, axis=0)
        m += (grads - m) * F32(1 - cfg.beta1)  # the order of torch's ops, for the same rounding
        put_rows(state["exp_avg"], slots, m)
        v_old = state["exp_avg_sq"].take(slots, axis=0)
        v = v_old + (grads * grads - v_old) * F32(1 - cfg.beta2)
        put_rows(state["exp_avg_sq"], slots, v)
        step_size = self._step_size(state, slots, step)
        rows = values.take(slots, axis=0)
        rows -= step_size * (m / (np.sqrt(v) + F32(cfg.eps)))
        put_rows(values, slots, rows)

    def _step_size(self, state, slots, step):
        b1, b2, lr = self.cfg.beta1, self.cfg.beta2, self.cfg.lr
        if self.cfg.step == "global":
            return F32(lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step))
        t = state["step"].take(slots, axis=0) + 1
        put_rows(state["step"], slots, t)
        t = t.astype(np.float64)
        return (lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)).astype(F32)


class SparseFtrl(SparseOptimizer):
    def state_spec(self, dim):
        return (StateSpec("z", dim), StateSpec("n", dim))

    def apply(self, values, state, slots, grads, step):
        cfg = self.cfg
        w = values.take(slots, axis=0)
        z = state["z"].take(slots, axis=0)
        n = state["n"].take(slots, axis=0)
        g2 = grads * grads
        sqrt_n = np.sqrt(n)
        n += g2
        new_sqrt_n = np.sqrt(n)
        sigma = g2 / (F32(cfg.alpha) * (new_sqrt_n + sqrt_n))
        z += grads - sigma * w
        denom = (F32(cfg.beta) + new_sqrt_n) / F32(cfg.alpha) + F32(cfg.l2)
        shrunk = z - np.sign(z) * F32(cfg.l1)
        w = np.where(np.abs(z) <= F32(cfg.l1), F32(0), -shrunk / denom).astype(F32, copy=False)
        put_rows(state["z"], slots, z)
        put_rows(state["n"], slots, n)
        put_rows(values, slots, w)


REGISTRY: dict[str, tuple[type, type[SparseOptimizer]]] = {
    "sgd": (SGDConfig, SparseSGD),
    "adagrad": (AdagradConfig, SparseAdagrad),
    "sparse_adam": (SparseAdamConfig, SparseAdam),
    "ftrl": (FtrlConfig, SparseFtrl),
}


def config(name: str, **params):
    """The validated config of optimizer `name`; unknown names and parameters are refused."""
    if name not in REGISTRY:
        raise InvalidArgument(f"unknown sparse optimizer {name!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name][0]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidArgument(f"{name} has no parameter {', '.join(unknown)}; it takes {', '.join(sorted(known))}")
    return cls(**params)


def build(cfg_or_name, **params) -> SparseOptimizer:
    """`build("adagrad", lr=0.1)` or `build(AdagradConfig(lr=0.1))`."""
    cfg = config(cfg_or_name, **params) if isinstance(cfg_or_name, str) else cfg_or_name
    if not isinstance(cfg, tuple(c for c, _ in REGISTRY.values())):
        raise InvalidArgument(f"not a sparse optimizer config: {cfg!r}")
    return REGISTRY[cfg.name][1](cfg)


def from_dict(d: dict) -> SparseOptimizer:
    """Inverse of `cfg.to_dict()` (snapshot metadata)."""
    if not isinstance(d, dict) or "name" not in d:
        raise InvalidArgument(f"sparse optimizer config must be a dict with a name, got {d!r}")
    params = dict(d)
    return build(params.pop("name"), **params)
