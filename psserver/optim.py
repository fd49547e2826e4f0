"""Server-side optimizers: per-key state, updates that follow torch.optim's formulas.

Each optimizer updates one flat float32 slice in place. State lives beside the slice on the
shard (and goes into checkpoints), keyed by name so it can be saved as safetensors.
"""
from __future__ import annotations

import abc

import numpy as np

from shardps.pscommon.config import OptimizerConfig


class Optimizer(abc.ABC):
    #: names of the per-key state arrays (each the size of the slice)
    state_names: tuple[str, ...] = ()

    def __init__(self, cfg: OptimizerConfig):
        self.cfg = cfg

    def init_state(self, n: int) -> dict[str, np.ndarray]:
        return {name: np.zeros(n, np.float32) for name in self.state_names}

    @abc.abstractmethod
    def apply(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int) -> None:
        """Update `param` in place; `step` counts this key's updates, starting at 1."""

    def _with_weight_decay(self, param, grad):
        if self.cfg.weight_decay:
            return grad + np.float32(self.cfg.weight_decay) * param
        return grad


class SGD(Optimizer):
    """torch.optim.SGD: optional momentum (heavy ball or Nesterov) and dampening."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.state_names = ("momentum_buffer",) if cfg.momentum else ()

    def apply(self, param, grad, state, step):
        cfg = self.cfg
        grad = self._with_weight_decay(param, grad)
        if cfg.momentum:
            buf = state["momentum_buffer"]
            if step == 1:
                buf[...] = grad
            else:
                buf *= np.float32(cfg.momentum)
                buf += np.float32(1 - cfg.dampening) * grad
            grad = grad + np.float32(cfg.momentum) * buf if cfg.nesterov else buf
        param -= np.float32(cfg.lr) * grad


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient, not AdamW)."""

    state_names = ("exp_avg", "exp_avg_sq")

    def apply(self, param, grad, state, step):
        cfg = self.cfg
        grad = self._with_weight_decay(param, grad)
        b1, b2 = np.float32(cfg.beta1), np.float32(cfg.beta2)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m += (grad - m) * (np.float32(1) - b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v *= b2
        v += (np.float32(1) - b2) * grad * grad
        bias1 = 1 - cfg.beta1 ** step
        bias2_sqrt = (1 - cfg.beta2 ** step) ** 0.5
        denom = np.sqrt(v) / np.float32(bias2_sqrt) + np.float32(cfg.eps)
        param -= np.float32(cfg.lr / bias1) * (m / denom)


class Adagrad(Optimizer):
    """torch.optim.Adagrad, with lr decay and an initial accumulator value."""

    state_names = ("sum",)

    def init_state(self, n):
        return {"sum": np.full(n, self.cfg.initial_accumulator_value, np.float32)}

    def apply(self, param, grad, state, step):
        cfg = self.cfg
        grad = self._with_weight_decay(param, grad)
        clr = cfg.lr / (1 + (step - 1) * cfg.lr_decay)
        acc = state["sum"]
        acc += grad * grad
        param -= np.float32(clr) * (grad / (np.sqrt(acc) + np.float32(cfg.eps)))


def build(cfg: OptimizerConfig) -> Optimizer:
    """The optimizer for a job; `momentum` is SGD with momentum (0.9 unless set)."""
    if cfg.kind == "momentum":
        return SGD(cfg)
    return {"sgd": SGD, "adam": Adam, "adagrad": Adagrad}[cfg.kind](cfg)
