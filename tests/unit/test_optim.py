"""psserver.optim against torch.optim: same gradients, same parameters after every step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shardps.pscommon.config import OptimizerConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.psserver import optim

N, STEPS = 1000, 10

CASES = {
    "sgd": (dict(kind="sgd", lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd-weight-decay": (dict(kind="sgd", lr=0.05, weight_decay=0.01),
                         lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.01)),
    "heavy-ball": (dict(kind="sgd", lr=0.05, momentum=0.9),
                   lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "dampening": (dict(kind="sgd", lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.001),
                  lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.001)),
    "nesterov": (dict(kind="sgd", lr=0.05, momentum=0.9, nesterov=True),
                 lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    "momentum-kind-defaults-to-0.9": (dict(kind="momentum", lr=0.05),
                                      lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "momentum-kind-keeps-explicit-value": (dict(kind="momentum", lr=0.05, momentum=0.5),
                                           lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5)),
    "adam": (dict(kind="adam", lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
    "adam-weight-decay": (dict(kind="adam", lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
                          lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                                                     weight_decay=0.1)),
    "adagrad": (dict(kind="adagrad", lr=0.1, eps=1e-10),
                lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10)),
    "adagrad-decay-and-accumulator": (
        dict(kind="adagrad", lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-10,
             weight_decay=0.01),
        lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1,
                                      eps=1e-10, weight_decay=0.01)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_after_every_step(case):
    fields, make_torch = CASES[case]
    rng = np.random.default_rng(list(CASES).index(case))
    start = rng.standard_normal(N).astype(np.float32)

    ours = optim.build(OptimizerConfig(**fields))
    param, state = start.copy(), ours.init_state(N)

    ref = torch.nn.Parameter(torch.from_numpy(start.copy()))
    ref_opt = make_torch([ref])

    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(N).astype(np.float32)
        ours.apply(param, grad.copy(), state, step)
        ref.grad = torch.from_numpy(grad.copy())
        ref_opt.step()
        assert param.dtype == np.float32
        np.testing.assert_allclose(param, ref.detach().numpy(), rtol=1e-6, atol=1e-6,
                                   err_msg=f"{case} step {step}")


def test_optimizer_state_arrays_match_their_declared_names():
    for kind, expected in (("sgd", ()), ("momentum", ("momentum_buffer",)),
                           ("adam", ("exp_avg", "exp_avg_sq")), ("adagrad", ("sum",))):
        opt = optim.build(OptimizerConfig(kind=kind))
        state = opt.init_state(7)
        assert tuple(opt.state_names) == expected == tuple(state)
        assert all(a.shape == (7,) and a.dtype == np.float32 for a in state.values())


@pytest.mark.parametrize("fields, named", [
    (dict(lr=-0.1), "lr"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(momentum=-0.5), "momentum"),
    (dict(beta1=1.0), "beta1"),
    (dict(beta2=-0.1), "beta2"),
    (dict(eps=float("inf")), "eps"),
    (dict(nesterov=True), "nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    (dict(kind="rmsprop"), "rmsprop"),
])
def test_config_validation_names_the_field(fields, named):
    with pytest.raises(InvalidArgument, match=named):
        OptimizerConfig(**fields)


def test_optimizer_config_proto_round_trip():
    cfg = OptimizerConfig(kind="adagrad", lr=0.3, weight_decay=0.01, lr_decay=0.2,
                          initial_accumulator_value=0.5, eps=1e-10)
    assert OptimizerConfig.from_proto(cfg.to_proto()) == cfg
