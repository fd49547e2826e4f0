"""All-or-nothing sync steps across shards (psserver/consistency/sync.py), on an in-process
cluster (a scheduler, two servers, real gRPC): a worker that goes away at the worst moment,
between its pushes to the two shards, or after pushing everywhere but before saying so,
counts on neither shard; one that said so counts on both. Every shard must then hold
exactly the values a single-process replay of the same averaged gradients gives, bit for bit.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from shardps.pscommon.config import SETTLING_SHARD, JobSpec, OptimizerConfig
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc
from shardps.psserver import optim
from shardps.worker.client import ClientConfig, ShardClient

from .helpers import poll, push_requests

OPT = OptimizerConfig(kind="sgd", lr=0.1, momentum=0.9)
SHAPES = {"w": (48,), "b": (16,)}
STEPS = 3
VICTIM_STEP = 1     # the step at which the third worker goes away
TIMEOUT_S = 30.0


def grad(index: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A worker's gradient: depends on the values it pulled, and workers disagree."""
    return {k: (v * np.float32(0.1) + np.float32(index + 1) * np.linspace(-1, 1, v.size, dtype=np.float32))
            for k, v in params.items()}


def flat_init() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {k: rng.standard_normal(int(np.prod(s))).astype(np.float32) for k, s in SHAPES.items()}


def connect(c, name: str) -> ShardClient:
    w = ShardClient(ClientConfig(scheduler=c.address, name=name))
    w.join()
    w.wait_for_servers()
    w.declare(flat_init())
    return w


def pull(w: ShardClient) -> dict[str, np.ndarray]:
    into = {k: np.empty(int(np.prod(s)), np.float32) for k, s in SHAPES.items()}
    w.pull(into)
    return into


def raw_push(c, w: ShardClient, shard: int, step: int, grads: dict[str, np.ndarray]) -> None:
    """`w`'s push of `step` to one shard only, as its client would send it."""
    smap = w.shard_map
    parts = {k.key: grads[k.param][k.offset:k.offset + k.length] for k in smap.keys_of(shard)}
    msgs = list(push_requests(smap.fingerprint, parts, worker=w.worker_id, incarnation=w.incarnation,
                              step=step, shard=shard))
    msgs[0].header.caller.credential = w.identity.credential
    with grpc.insecure_channel(c.servers[shard].address) as ch:
        reply = ps_pb2_grpc.ParameterServerStub(ch).Push(iter(msgs), timeout=TIMEOUT_S)
    assert not reply.duplicate


def raw_commit(c, w: ShardClient, step: int) -> None:
    """`w` says its pushes before `step` reached every shard, and does not wait."""
    req = ps_pb2.SettleRequest(caller=ps_pb2.Caller(worker_id=w.worker_id, incarnation=w.incarnation,
                                                    credential=w.identity.credential),
                               shard=SETTLING_SHARD, step=step, wait=False,
                               model_fingerprint=w.shard_map.fingerprint)
    with grpc.insecure_channel(c.servers[SETTLING_SHARD].address) as ch:
        ps_pb2_grpc.ParameterServerStub(ch).SettleStep(req, timeout=TIMEOUT_S)


def replay(contributors_by_step: list[list[int]], grads_of) -> dict[str, np.ndarray]:
    """The job in one process: each step's gradients summed in worker-id order, averaged,
    and applied by the servers' own optimizer."""
    params = flat_init()
    opt = optim.build(OPT)
    state = {k: opt.init_state(v.size) for k, v in params.items()}
    for step, contributors in enumerate(contributors_by_step):
        grads = [grads_of(step, w, params) for w in sorted(contributors)]
        for k in params:
            total = grads[0][k].copy()
            for g in grads[1:]:
                total += g[k]
            opt.apply(params[k], total / np.float32(len(grads)), state[k], step + 1)
    return params


def served(c, smap) -> dict[str, np.ndarray]:
    """The values both servers hold, assembled into whole parameters."""
    out = {k: np.empty(int(np.prod(s)), np.float32) for k, s in SHAPES.items()}
    for key in smap.keys:
        out[key.param][key.offset:key.offset + key.length] = c.servers[key.shard].shard.entries[key.key].value
    return out


@pytest.mark.parametrize("victim", ["between-shards", "everywhere-unsaid", "everywhere-said"])
def test_a_step_counts_a_push_on_every_shard_or_on_none(cluster, victim):
    c = cluster(JobSpec(mode="sync", num_servers=2, optimizer=OPT))
    workers = [connect(c, f"w{i}") for i in range(3)]
    a, d, b = workers          # b goes away at VICTIM_STEP
    smap = a.shard_map
    assert {k.shard for k in smap.keys} == {0, 1}, "every shard must hold part of the model"
    for w in workers:
        w.wait_for_workers(3)
    poll(lambda: all(len(s.shard.gate.live) == 3 for s in c.servers), TIMEOUT_S, what="both shards see 3 workers")
    index = {w.worker_id: i for i, w in enumerate(workers)}
    pulled: dict[tuple[int, int], dict] = {}   # (step, worker id) -> the values it computed on

    def step_of(w: ShardClient, t: int) -> None:
        params = pull(w)
        pulled[t, w.worker_id] = {k: v.copy() for k, v in params.items()}
        w.push(grad(index[w.worker_id], params))

    for t in range(VICTIM_STEP):
        for w in workers:
            step_of(w, t)
    # the victim's step: it pulls and computes, then goes away partway through its push
    params = pull(b)
    g = grad(index[b.worker_id], params)
    raw_push(c, b, 1, VICTIM_STEP, g)
    if victim != "between-shards":
        raw_push(c, b, 0, VICTIM_STEP, g)
    if victim == "everywhere-said":
        raw_commit(c, b, VICTIM_STEP + 1)
    b.leave()
    counted = victim == "everywhere-said"
    for t in range(VICTIM_STEP, STEPS):
        for w in (a, d):
            step_of(w, t)
    pull(a)   # the last step settled, and carried to shard 1
    poll(lambda: all(s.shard.gate.completed_step == STEPS for s in c.servers), TIMEOUT_S,
         what=f"both shards to complete {STEPS} steps")

    everyone, survivors = sorted(index), sorted(w.worker_id for w in (a, d))
    victim_step = everyone if counted else survivors
    steps = [everyone] * VICTIM_STEP + [victim_step] + [survivors] * (STEPS - VICTIM_STEP - 1)
    # the victim computed on the same values as the others: its gradient comes from those
    pulled[VICTIM_STEP, b.worker_id] = params

    def grads_of(t, w, _):
        return grad(index[w], pulled[t, w])
    expected = replay(steps, grads_of)
    got = served(c, smap)
    for k in SHAPES:
        assert got[k].tobytes() == expected[k].tobytes(), f"{k}: the shards hold no step of the replay"
    # and the other outcome would have been visibly different
    other = replay(steps[:VICTIM_STEP] + [everyone if not counted else survivors] + steps[VICTIM_STEP + 1:], grads_of)
    assert not np.allclose(got["w"], other["w"], rtol=1e-4, atol=1e-6)
    dropped = [s.shard.dropped_pushes for s in c.servers]
    assert dropped == ([0, 0] if counted else [0, 1] if victim == "between-shards" else [1, 1]), dropped
    for w in (a, d):
        w.leave()
