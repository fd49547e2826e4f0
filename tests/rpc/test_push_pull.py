"""PushPullBatch: a push and the next step's pull in one round trip (async always, ssp within
its bound). A fused step computes on exactly the values a push then a pull give; its push half
is exactly-once under lost replies; a refused call changes nothing; codecs apply on both
halves. Real servers on port 0 (raw stubs) and real in-process clusters (ShardClient)."""
from __future__ import annotations

import contextlib
import dataclasses

import grpc
import numpy as np
import pytest

from shardps.pscommon import codecs
from shardps.pscommon.bounds import MAX_CLOCK
from shardps.pscommon.config import CodecConfig, JobSpec, OptimizerConfig
from shardps.pscommon.tensors import ChunkAssembler
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.worker.client import ClientConfig, ShardClient

from .faults import FaultInjector, FaultPlan
from .helpers import (TIMEOUT_S, caller, declare, members, pull, push, shard_map, snapshot, status,
                      tensor_chunks, values)

LR = 0.05
SMAP = shard_map({"w": (8,), "b": (2,)})
INIT = {"w": np.linspace(-1, 1, 8).astype(np.float32), "b": np.array([0.3, -0.7], np.float32)}
# the client-level model: "w" is above small_tensor_bytes (4 KiB), so codecs apply to it
SHAPES = {"w": 2048, "b": 3}


def grad(step: int, params: dict[str, np.ndarray], worker: int = 0) -> dict[str, np.ndarray]:
    """Depends on the parameters, so a step computed on other values shows."""
    return {k: (v * np.float32(0.5) + np.float32(0.01 * (step + 1) * (worker + 1))).astype(np.float32)
            for k, v in params.items()}


def push_pull(stub, fp: str, grads: dict, worker: int = 0, step: int = 0, incarnation: int = 1,
              base_version: int = 0, keys=(), codec: int = tensor_pb2.CODEC_UNSPECIFIED, observer: bool = False,
              credential: bytes = b"") -> tuple[ps_pb2.PushPullReply, dict[str, np.ndarray] | None]:
    """One PushPullBatch through the generated stub: (reply, pulled values or None)."""
    req = ps_pb2.PushPullRequest(
        header=ps_pb2.PushHeader(caller=caller(worker, incarnation, observer, credential), shard=0, step=step,
                                 base_version=base_version, model_fingerprint=fp),
        chunks=[c for name, g in grads.items() for c in tensor_chunks(name, g)], pull_keys=list(keys))
    if codec:
        req.pull_codec.codec = codec
    reply = stub.PushPullBatch(req, timeout=TIMEOUT_S)
    if not reply.HasField("header"):
        assert not reply.chunks
        return reply, None
    asm, out = ChunkAssembler(1 << 30, 1 << 40), {}
    for chunk in reply.chunks:
        done = asm.add(chunk)
        if done is not None:
            meta, payload = done
            out[meta.name] = np.array(codecs.decode(meta, payload, 1 << 30), np.float32).reshape(-1)
    asm.finish()
    return reply, out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


# -- the RPC on a bare shard -----------------------------------------------------------------
@pytest.mark.parametrize("codec", [tensor_pb2.CODEC_UNSPECIFIED, tensor_pb2.CODEC_FP16, tensor_pb2.CODEC_BF16])
def test_fused_step_equals_push_then_pull(shard_server, codec):
    """Two shards from the same start: one driven by Push then Pull, one by PushPullBatch. Every
    pull half equals the separate pull bit for bit (values, version, next step), in any pull codec."""
    job = JobSpec(optimizer=OptimizerConfig(kind="sgd", lr=LR))
    a, b = shard_server(job), shard_server(job)
    for s in (a, b):
        declare(s.stub, SMAP, INIT)
    fp = SMAP.fingerprint
    _, pa, _ = pull(a.stub, fp, step=0, codec=codec)
    _, pb, _ = pull(b.stub, fp, step=0, codec=codec)
    for step in range(6):
        assert _same(pa, pb)
        g = grad(step, pa)
        pushed = push(a.stub, fp, g, step=step)
        header, pa, _ = pull(a.stub, fp, step=step + 1, codec=codec)
        fused, pb = push_pull(b.stub, fp, grad(step, pb), step=step, codec=codec)
        assert fused.push == pushed
        assert (fused.header.shard_version, fused.header.next_step) == (header.shard_version, header.next_step)
    assert _same(pa, pb)
    sa, sb = status(a.stub), status(b.stub)
    assert (sa.pushes, sa.pulls, sa.shard_version) == (sb.pushes, sb.pulls, sb.shard_version) == (6, 7, 6)
    assert dict(sa.clocks) == dict(sb.clocks) == {0: 6}


def test_a_retried_fused_push_is_a_duplicate_with_the_same_values(shard_server):
    """A lost reply's retry: the push is acknowledged as a duplicate (applied once) and the pull
    half reads the same values again."""
    srv = shard_server(JobSpec(optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    declare(srv.stub, SMAP, INIT)
    fp = SMAP.fingerprint
    g = grad(0, INIT)
    first, got = push_pull(srv.stub, fp, g)
    again, got_again = push_pull(srv.stub, fp, g)
    assert not first.push.duplicate and again.push.duplicate
    assert first.push.shard_version == again.push.shard_version == again.header.shard_version == 1
    assert _same(got, got_again)
    assert _same(got, {k: INIT[k] - np.float32(LR) * g[k] for k in INIT})
    st = status(srv.stub)
    assert (st.pushes, st.duplicates, st.shard_version) == (1, 1, 1)


def test_ssp_serves_the_pull_half_only_within_the_bound(shard_server):
    """ssp(1), workers 0 and 1: worker 0's push of step 0 may read step 1 at once (1 - 0 <= 1),
    its push of step 1 may not read step 2 (the push applies, the reply has no values, nothing
    waits); once worker 1 pushes, worker 0's own pull of step 2 is admitted."""
    srv = shard_server(JobSpec(mode="ssp", staleness=1, optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    declare(srv.stub, SMAP, INIT)
    srv.shard.set_view(1, members([0, 1]))
    fp = SMAP.fingerprint
    inside, got = push_pull(srv.stub, fp, grad(0, INIT), worker=0, step=0)
    assert got is not None and inside.header.next_step == 1
    assert _same(got, values(srv.stub, fp))
    outside, none = push_pull(srv.stub, fp, grad(1, got), worker=0, step=1)
    assert none is None and not outside.push.duplicate and outside.push.shard_version == 2
    st = status(srv.stub)
    assert (st.pushes, st.pulls, dict(st.clocks)) == (2, 1, {0: 2})   # the unserved half is not a pull
    push(srv.stub, fp, grad(0, INIT, worker=1), worker=1, step=0)
    header, after, _ = pull(srv.stub, fp, worker=0, step=2, timeout=TIMEOUT_S)
    assert header.shard_version == 3 and header.next_step == 2


def _refused(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


def test_refused_calls_change_nothing(shard_server):
    """Every check of either half runs before the push applies: a wrong member, a step past
    the clock bound, a step whose next overflows, an observer, a bad pull codec, a pull key the
    shard lacks, a sync job. Each is refused with its code, and the shard is as before."""
    srv = shard_server(JobSpec(optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    declare(srv.stub, SMAP, INIT)
    srv.shard.set_view(1, members([0]))
    fp = SMAP.fingerprint
    push_pull(srv.stub, fp, grad(0, INIT))   # worker 0 is heard here: its clock is 1
    before = snapshot(srv.stub, fp)
    g = grad(1, INIT)
    cases = {
        "not a member": (dict(worker=7), grpc.StatusCode.FAILED_PRECONDITION),
        "stale incarnation": (dict(incarnation=0), grpc.StatusCode.FAILED_PRECONDITION),
        "too far ahead": (dict(step=5000), grpc.StatusCode.INVALID_ARGUMENT),
        "next step overflows": (dict(step=MAX_CLOCK), grpc.StatusCode.INVALID_ARGUMENT),
        "observer": (dict(observer=True), grpc.StatusCode.INVALID_ARGUMENT),
        "int8 pull": (dict(codec=tensor_pb2.CODEC_INT8), grpc.StatusCode.INVALID_ARGUMENT),
        "foreign key": (dict(keys=["w", "nope"]), grpc.StatusCode.NOT_FOUND),
    }
    for what, (kw, code) in cases.items():
        kw = {"step": 1, **kw}
        assert _refused(lambda: push_pull(srv.stub, fp, g, **kw)) == code, what
        assert snapshot(srv.stub, fp) == before, what
    assert srv.shard.ledger[0].last_step == 0


def test_sync_refuses_the_fused_call_and_applies_nothing(shard_server):
    srv = shard_server(JobSpec(mode="sync", optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    declare(srv.stub, SMAP, INIT)
    srv.shard.set_view(1, members([0]))
    before = snapshot(srv.stub, SMAP.fingerprint)
    assert _refused(lambda: push_pull(srv.stub, SMAP.fingerprint, grad(0, INIT))) == grpc.StatusCode.FAILED_PRECONDITION
    assert snapshot(srv.stub, SMAP.fingerprint) == before


# -- the worker's client over real clusters --------------------------------------------------
@contextlib.contextmanager
def counted_cluster(job: JobSpec, drop: float = 0.0):
    """A scheduler and job.num_servers servers in this process; each server counts its
    PushPullBatch calls (and drops that share of their replies after they ran)."""
    sched = SchedulerProcess(SchedulerConfig(job=job))
    sched.start()
    injectors = [FaultInjector(FaultPlan(drop_response_after_apply=drop, methods=("PushPullBatch",), seed=7 + s))
                 for s in range(job.num_servers)]
    servers = []
    try:
        for s in range(job.num_servers):
            srv = ServerProcess(ServerConfig(scheduler=sched.address, shard_id=s, interceptors=(injectors[s],)))
            srv.start()
            servers.append(srv)
        yield sched.address, servers, injectors
    finally:
        for srv in servers:
            srv.drain()
        sched.drain()


def train(address: str, steps: int, fuse: bool = True, **cfg) -> tuple[list[dict], list[dict[int, int]]]:
    """One worker's steps (pull, a gradient of the pulled values, push): every pull's values
    and shard versions, the final pull's included."""
    c = ShardClient(ClientConfig(scheduler=address, name="w", retry_deadline_s=60, fuse=fuse, **cfg))
    c.join()
    try:
        c.wait_for_servers()
        init = {n: np.linspace(-1, 1, size).astype(np.float32) for n, size in SHAPES.items()}
        c.declare(init)
        out = {n: np.empty(size, np.float32) for n, size in SHAPES.items()}
        seen, versions = [], []
        for step in range(steps + 1):
            c.pull(out)
            seen.append({k: v.copy() for k, v in out.items()})
            versions.append(c.shard_versions())
            if step < steps:
                c.push(grad(step, out))
        assert c.clock == steps
        return seen, versions
    finally:
        c.leave()


JOB = JobSpec(optimizer=OptimizerConfig(kind="sgd", lr=LR), slice_bytes=1 << 30)


@pytest.mark.parametrize("num_servers", [1, 2])
def test_client_fused_steps_equal_separate_steps(num_servers):
    """The same worker with and without fusion computes on the same values, bit for bit, every
    step, on one shard and on two (each shard fuses on its own); only the fused run calls
    PushPullBatch, once a step per shard."""
    steps, job = 8, dataclasses.replace(JOB, num_servers=num_servers)
    runs = {}
    for fuse in (False, True):
        with counted_cluster(job) as (address, servers, injectors):
            runs[fuse] = train(address, steps, fuse=fuse)
            assert [i.counts().calls for i in injectors] == [steps * fuse] * num_servers
            assert all(srv.shard.pulls == steps + 1 for srv in servers)   # the fused halves count as pulls
    (plain, plain_v), (fused, fused_v) = runs[False], runs[True]
    assert plain_v == fused_v
    for step, (a, b) in enumerate(zip(plain, fused)):
        assert _same(a, b), step


def test_client_fused_push_is_exactly_once_under_lost_replies():
    """A third of the fused replies are dropped after the server ran them: the client retries
    the same bytes, each push applies once (one duplicate per lost reply), and the worker
    computes on exactly the values of a run without faults."""
    steps = 30
    with counted_cluster(JOB) as (address, _, _):
        clean, _ = train(address, steps)
    with counted_cluster(JOB, drop=0.33) as (address, servers, injectors):
        lossy, _ = train(address, steps)
        dropped = injectors[0].counts().dropped
        assert dropped > 0
        assert (servers[0].shard.version, servers[0].shard.duplicates) == (steps, dropped)
    for step, (a, b) in enumerate(zip(clean, lossy)):
        assert _same(a, b), step


@pytest.mark.parametrize("push_codec,pull_codec", [("bf16", "fp16"), ("fp16", "bf16"), ("topk:0.1", "fp32")])
def test_client_fused_codecs_on_both_halves(push_codec, pull_codec):
    """Compressed pushes (error feedback included) and a compressed pull half give the values
    the separate calls give, bit for bit (int8 rounds at random, so two runs differ anyway)."""
    job = dataclasses.replace(JOB, push_codec=CodecConfig.parse(push_codec),
                              pull_codec=CodecConfig.parse(pull_codec))
    runs = {}
    for fuse in (False, True):
        with counted_cluster(job) as (address, _, injectors):
            runs[fuse], _ = train(address, 6, fuse=fuse)
            assert injectors[0].counts().calls == 6 * fuse
    for step, (a, b) in enumerate(zip(runs[False], runs[True])):
        assert _same(a, b), step
    assert not _same(runs[True][0], runs[True][-1])


def test_a_fused_call_as_another_worker_is_refused_and_changes_nothing(cluster):
    """Member credentials: a PushPullBatch made as an honest worker without its credential is
    UNAUTHENTICATED before either half runs (no push applied, no values read)."""
    from shardps.pscommon import grpcutil
    from shardps.pscommon.wire.v1 import ps_pb2_grpc

    c = cluster(JobSpec(optimizer=OptimizerConfig(kind="sgd", lr=LR), heartbeat_timeout_s=300))
    honest = ShardClient(ClientConfig(scheduler=c.address, name="honest"))
    honest.join()
    try:
        honest.wait_for_servers()
        honest.declare({"w": np.zeros(8, np.float32)})
        out = {"w": np.empty(8, np.float32)}
        honest.pull(out)
        honest.push({"w": np.ones(8, np.float32)})
        me, fp = honest.identity, honest.shard_map.fingerprint
        with grpcutil.channel(c.servers[0].address) as ch:
            stub = ps_pb2_grpc.ParameterServerStub(ch)
            before = snapshot(stub, fp)
            for cred in (b"", b"x" * 32):
                code = _refused(lambda: push_pull(stub, fp, {"w": np.ones(8, np.float32)}, worker=me.worker_id,
                                                  incarnation=me.incarnation, step=me.clock, credential=cred))
                assert code == grpc.StatusCode.UNAUTHENTICATED
                assert snapshot(stub, fp) == before
        honest.pull(out)   # the honest worker's own fused step went through, and it trains on
        honest.push({"w": np.ones(8, np.float32)})
        assert c.servers[0].shard.version == 2
    finally:
        honest.leave()


def test_psclient_fuses_by_default_and_trains_the_same(cluster):
    """PSClient turns fusion on (a bare ShardClient does not): one worker training a torch
    model ends with the same parameters, bit for bit, with fuse on and off, and only the fused
    run's steps go as PushPullBatch (its pulls after the first are no calls of their own)."""
    import torch
    import torch.nn.functional as F

    from shardps import PSClient

    steps, finals = 10, {}
    for fuse in (True, False):
        c = cluster(JOB)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 8, generator=gen), torch.randint(3, (64,), generator=gen)
        kw = {} if fuse else {"fuse": False}
        with PSClient.connect(c.address, model, **kw) as ps:
            assert ps.client.cfg.fuse is fuse
            for step in range(steps):
                ps.pull()
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[step::8]), y[step::8]).backward()
                assert ps.push()
            ps.pull()
            pulls = c.servers[0].shard.pulls
        finals[fuse] = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert pulls == steps + 2   # connect's pull, the steps' and the last: fused or not, each counted once
    assert all(torch.equal(finals[True][n], finals[False][n]) for n in finals[True])
