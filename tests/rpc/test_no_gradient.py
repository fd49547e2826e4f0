"""A parameter without a gradient (an unused branch, a conditional head) is left alone, as
torch.optim leaves a parameter whose grad is None: no momentum, no weight decay, no Adam step.

The worker says so explicitly on the wire (TensorMeta.no_gradient, no payload) rather than
pushing zeros, which every stateful optimizer would still act on.
"""
import grpc
import numpy as np
import pytest
import torch
from torch import nn

from shardps import PSClient
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2

from .helpers import (declare, declare_requests, members, push, push_header, raw_stream, shard_map, tensor_chunks,
                      values)

STEPS = 12
OPTIMIZERS = {
    "sgd-momentum-weight-decay": (dict(kind="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
                                  lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)),
    "adam": (dict(kind="adam", lr=1e-2, weight_decay=0.01),
             lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01)),
    "adagrad": (dict(kind="adagrad", lr=0.1), lambda p: torch.optim.Adagrad(p, lr=0.1)),
}


class TwoHeads(nn.Module):
    """`rare` takes part in every third step only; `frozen` never does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 16)
        self.common = nn.Linear(16, 3)
        self.rare = nn.Linear(16, 3)
        self.frozen = nn.Linear(16, 3)

    def forward(self, x, step):
        h = torch.relu(self.body(x))
        return self.common(h) + (self.rare(h) if step % 3 == 0 else 0)


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 8, generator=gen), torch.randint(3, (16,), generator=gen)


def loss_of(model, step):
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x, step), y)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_params_without_gradients_follow_torch_optim(cluster, name, overlap):
    """One worker in async mode is plain sequential training: the served model must match
    torch.optim on the same batches, with `rare` stepped one step in three and `frozen` never
    (with overlap, gradients stream from autograd hooks, which never fire for those)."""
    server_opt, torch_opt = OPTIMIZERS[name]
    c = cluster(JobSpec(num_servers=2, optimizer=OptimizerConfig(**server_opt)))
    model, reference = TwoHeads(), TwoHeads()
    frozen_before = {n: p.detach().clone() for n, p in model.frozen.named_parameters()}
    opt = torch_opt(reference.parameters())
    with PSClient.connect(c.address, model, overlap=overlap) as ps:
        for step in range(STEPS):
            ps.pull()
            model.zero_grad(set_to_none=True)
            loss_of(model, step).backward()
            assert model.frozen.weight.grad is None
            assert ps.push()
            opt.zero_grad(set_to_none=True)
            loss_of(reference, step).backward()
            opt.step()
        ps.pull()
    for n, p in model.frozen.named_parameters():
        assert torch.equal(p.detach(), frozen_before[n]), f"frozen.{n} moved"
    for (n, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.detach(), r.detach(), rtol=1e-4, atol=1e-5), \
            (n, (p.detach() - r.detach()).abs().max().item())


# -- the wire: the marker, its refusals, and sync averaging ----------------------------------
SHAPES = {"w": (4,), "b": (2,)}


@pytest.fixture
def sync_shard(shard_server):
    srv = shard_server(JobSpec(mode="sync", optimizer=OptimizerConfig(kind="sgd", lr=1.0, momentum=0.9)))
    srv.smap = shard_map(SHAPES)
    srv.init = {"w": np.ones(4, np.float32), "b": np.array([1.0, 2.0], np.float32)}
    declare(srv.stub, srv.smap, srv.init)
    srv.shard.set_view(1, members(range(2)))
    return srv


def no_gradient_chunk(name: str, length: int, payload: bytes = b"") -> ps_pb2.PushRequest:
    meta = tensor_pb2.TensorMeta(name=name, dtype=tensor_pb2.DTYPE_FLOAT32, shape=[length], no_gradient=True,
                                 payload_size=len(payload))
    return ps_pb2.PushRequest(chunk=tensor_pb2.TensorChunk(meta=meta, offset=0, data=payload))


def push_skipping(stub, fp, grads, skipped, worker, step=0):
    msgs = [push_header(fp, worker=worker, step=step)]
    msgs += [ps_pb2.PushRequest(chunk=ch) for n, g in grads.items() for ch in tensor_chunks(n, g)]
    msgs += [no_gradient_chunk(n, SHAPES[n][0]) for n in skipped]
    return raw_stream(stub.Push, msgs)


def test_sync_step_averages_a_key_over_every_contributor_and_skips_a_key_nobody_had(sync_shard):
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    g = np.full(4, 2.0, np.float32)
    push_skipping(srv.stub, fp, {"w": g}, ["b"], worker=0)
    push_skipping(srv.stub, fp, {}, ["w", "b"], worker=1)
    after = values(srv.stub, fp)
    # like DDP: the worker without a gradient contributes nothing to the sum, and the sum is
    # divided by the step's two contributors
    np.testing.assert_array_equal(after["w"], srv.init["w"] - 1.0 * g / 2)
    np.testing.assert_array_equal(after["b"], srv.init["b"])  # no gradient from anyone: untouched
    assert srv.shard.entries["b"].version == 0 and not srv.shard.entries["b"].state["momentum_buffer"].any()
    assert srv.shard.gate.completed_step == 1


@pytest.mark.parametrize("case", ["payload", "unknown-key", "also-sent"])
def test_a_malformed_no_gradient_marker_is_refused_and_changes_nothing(sync_shard, case):
    srv, fp = sync_shard, sync_shard.smap.fingerprint
    msgs = [push_header(fp, worker=0)]
    if case == "payload":
        msgs.append(no_gradient_chunk("b", 2, payload=b"\0" * 8))
    elif case == "unknown-key":
        msgs.append(no_gradient_chunk("nope", 2))
    else:
        msgs += [ps_pb2.PushRequest(chunk=ch) for ch in tensor_chunks("b", np.ones(2, np.float32))]
        msgs.append(no_gradient_chunk("b", 2))
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(srv.stub.Push, msgs)
    assert err.value.code() == (grpc.StatusCode.NOT_FOUND if case == "unknown-key" else grpc.StatusCode.INVALID_ARGUMENT)
    assert srv.shard.pushes == 0 and not srv.shard.gate.pending_from
    # the worker can still push this step
    push(srv.stub, fp, {"w": np.ones(4, np.float32), "b": np.ones(2, np.float32)}, worker=0)
    assert srv.shard.gate.pending_from == {0}


def test_a_declare_cannot_mark_a_key_without_a_value(shard_server):
    srv = shard_server(JobSpec())
    smap = shard_map(SHAPES)
    msgs = list(declare_requests(smap.fingerprint, smap.keys_of(0), {"w": np.ones(4, np.float32)}))
    req = ps_pb2.DeclareRequest(chunk=no_gradient_chunk("b", 2).chunk)
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(srv.stub.Declare, msgs + [req])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not srv.shard.entries
