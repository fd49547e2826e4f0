"""FaultInjector on a real shard server, and exactly-once pushes under dropped replies."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from shardps.pscommon import codecs, framing, grpcutil
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import InvalidArgument
from .faults import FaultCounts, FaultInjector, FaultPlan
from shardps.pscommon.sharding import Key
from shardps.pscommon.tensors import chunk_payload
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, tensor_pb2
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.psserver.servicer import ParameterServerServicer
from shardps.psserver.shard import Shard
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.worker.client import ClientConfig, ShardClient

FINGERPRINT = "fp-faults-test"
N = 16
KEY = Key("w", "w", tensor_pb2.DTYPE_FLOAT32, (N,), 0, N, 0)
CALL_TIMEOUT_S = 30.0
# A power of two: lr * grad is exact in float32, so the result cannot depend on push order.
LR = 0.125


class FaultyShard:
    """A shard server with a FaultInjector installed as its only interceptor."""

    def __init__(self, plan: FaultPlan, job: JobSpec):
        self.shard = Shard(0, job)
        self.faults = FaultInjector(plan)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="rpc"),
                                  interceptors=[self.faults], options=grpcutil.SERVER_OPTIONS)
        framing.add_parameter_server(ParameterServerServicer(self.shard), self.server)
        self.address = grpcutil.bind(self.server, "127.0.0.1:0")
        self.server.start()
        self.channel = grpcutil.channel(self.address)
        self.stub = ps_pb2_grpc.ParameterServerStub(self.channel)

    def close(self):
        self.channel.close()
        self.server.stop(0).wait()


@pytest.fixture
def faulty_shard():
    made = []

    def make(plan: FaultPlan, job: JobSpec | None = None) -> FaultyShard:
        s = FaultyShard(plan, job or JobSpec(optimizer=OptimizerConfig(kind="sgd", lr=LR)))
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def declare(stub, value: np.ndarray):
    def requests():
        yield ps_pb2.DeclareRequest(header=ps_pb2.DeclareHeader(
            model_fingerprint=FINGERPRINT, shard=0, keys=[KEY.to_proto()]))
        meta, payload = codecs.encode(KEY.key, value.astype(np.float32), tensor_pb2.DTYPE_FLOAT32)
        for chunk in chunk_payload(meta, payload):
            yield ps_pb2.DeclareRequest(chunk=chunk)
    return stub.Declare(requests(), timeout=CALL_TIMEOUT_S)


def push_messages(worker: int, step: int, grad: np.ndarray) -> list[ps_pb2.PushRequest]:
    """A whole Push as a list, so a retry can send exactly the same messages again."""
    msgs = [ps_pb2.PushRequest(header=ps_pb2.PushHeader(
        caller=ps_pb2.Caller(worker_id=worker, incarnation=1), shard=0, step=step,
        model_fingerprint=FINGERPRINT))]
    meta, payload = codecs.encode(KEY.key, grad, tensor_pb2.DTYPE_FLOAT32)
    msgs += [ps_pb2.PushRequest(chunk=c) for c in chunk_payload(meta, payload)]
    return msgs


def status(stub) -> ps_pb2.ShardStatusReply:
    return stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=CALL_TIMEOUT_S)


def values(shard: FaultyShard) -> np.ndarray:
    info = shard.stub.Inspect(ps_pb2.InspectRequest(sample=N), timeout=CALL_TIMEOUT_S)
    return np.array(info.keys[0].sample, dtype=np.float64)


def grad_for(worker: int, step: int) -> np.ndarray:
    # Small dyadic rationals: every product and partial sum is exact in float32.
    scale = ((worker + 1) * 7 + step % 13 + 1) / 1024
    return (scale * (1 + np.arange(N) % 4)).astype(np.float32)


def run_in_threads(fn, n: int, timeout_s: float) -> None:
    """fn(0) .. fn(n-1) in threads; fails on a thread still running at the deadline or on the
    first exception one raised."""
    errors: list[BaseException] = []

    def body(i):
        try:
            fn(i)
        except BaseException as exc:  # surfaced in the calling thread below
            errors.append(exc)
    threads = [threading.Thread(target=body, args=(i,), name=f"worker-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    assert not any(t.is_alive() for t in threads), "workers did not finish"
    assert not errors, errors


# -- the plan ------------------------------------------------------------------------------
def test_fault_plan_validates():
    with pytest.raises(InvalidArgument, match="unavailable_rate"):
        FaultPlan(unavailable_rate=1.5)
    with pytest.raises(InvalidArgument, match="delay_s"):
        FaultPlan(delay_s=-1)
    with pytest.raises(InvalidArgument, match="methods"):
        FaultPlan(methods="Push")
    plan = FaultPlan(methods=("Push", "/shardps.pscommon.wire.v1.ParameterServer/Pull"))
    assert plan.matches("/shardps.pscommon.wire.v1.ParameterServer/Push")
    assert plan.matches("/shardps.pscommon.wire.v1.ParameterServer/Pull")
    assert not plan.matches("/shardps.pscommon.wire.v1.ParameterServer/ShardStatus")


def test_same_seed_same_faults():
    def pattern(seed):
        inj = FaultInjector(FaultPlan(unavailable_rate=0.3, delay_rate=0.5, drop_response_after_apply=0.2,
                                      seed=seed))
        return [inj._decide() for _ in range(200)]
    assert pattern(7) == pattern(7)
    assert pattern(7) != pattern(8)


# -- on a server ---------------------------------------------------------------------------
def test_unavailable_before_the_handler_runs(faulty_shard):
    s = faulty_shard(FaultPlan(unavailable_rate=1, methods=("Push", "Declare")))
    with pytest.raises(grpc.RpcError) as exc_info:
        declare(s.stub, np.zeros(N))
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The handler never ran: nothing was declared. ShardStatus is outside `methods`.
    assert status(s.stub).keys == 0
    assert s.faults.counts() == FaultCounts(calls=1, unavailable=1)


def test_unavailable_on_unary_and_response_streaming_calls(faulty_shard):
    s = faulty_shard(FaultPlan(unavailable_rate=1))
    for fn in (lambda: status(s.stub),
               lambda: list(s.stub.Pull(ps_pb2.PullRequest(shard=0), timeout=CALL_TIMEOUT_S))):
        with pytest.raises(grpc.RpcError) as exc_info:
            fn()
        assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert s.shard.pulls == 0
    assert s.faults.counts().unavailable == 2


def test_dropped_reply_after_the_push_was_applied(faulty_shard):
    s = faulty_shard(FaultPlan(drop_response_after_apply=1, methods=("Push",)))
    declare(s.stub, np.zeros(N))
    before = status(s.stub)
    grad = grad_for(0, 0)
    with pytest.raises(grpc.RpcError) as exc_info:
        s.stub.Push(iter(push_messages(0, 0, grad)), timeout=CALL_TIMEOUT_S)
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    after = status(s.stub)
    assert after.pushes == before.pushes + 1 and after.shard_version == before.shard_version + 1
    np.testing.assert_allclose(values(s), -LR * grad, rtol=0, atol=1e-6)

    # The retry is recognised as a duplicate (and its reply is dropped too): not applied twice.
    with pytest.raises(grpc.RpcError):
        s.stub.Push(iter(push_messages(0, 0, grad)), timeout=CALL_TIMEOUT_S)
    again = status(s.stub)
    assert again.pushes == after.pushes and again.duplicates == after.duplicates + 1
    np.testing.assert_allclose(values(s), -LR * grad, rtol=0, atol=1e-6)
    assert s.faults.counts().dropped == 2


def test_dropped_reply_on_a_response_stream(faulty_shard):
    s = faulty_shard(FaultPlan(drop_response_after_apply=1, methods=("Pull",)))
    declare(s.stub, np.zeros(N))
    req = ps_pb2.PullRequest(caller=ps_pb2.Caller(observer=True), shard=0, model_fingerprint=FINGERPRINT)
    with pytest.raises(grpc.RpcError) as exc_info:
        list(s.stub.Pull(req, timeout=CALL_TIMEOUT_S))
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert s.faults.counts() == FaultCounts(calls=1, dropped=1)


def test_delay_is_injected_and_counted(faulty_shard):
    s = faulty_shard(FaultPlan(delay_rate=1, delay_s=0.01, methods=("ShardStatus",)))
    assert status(s.stub).shard == 0
    assert s.faults.counts() == FaultCounts(calls=1, delayed=1)


# -- exactly-once under lost replies -------------------------------------------------------------
def test_async_pushes_apply_exactly_once_when_replies_are_lost(faulty_shard):
    workers, steps = 2, 1000
    s = faulty_shard(FaultPlan(drop_response_after_apply=0.1, methods=("Push",), seed=1234))
    w0 = (np.arange(N) / 8).astype(np.float32)
    declare(s.stub, w0)
    stats = {w: {"attempts": 0, "retried_steps": 0, "duplicate_replies": 0} for w in range(workers)}

    def worker(w: int):
        stub = ps_pb2_grpc.ParameterServerStub(s.channel)
        for step in range(steps):
            msgs = push_messages(w, step, grad_for(w, step))
            tries = [0]

            def attempt():
                tries[0] += 1
                return grpcutil.call(stub.Push, iter(msgs), CALL_TIMEOUT_S)
            # Retries re-send the same (worker, incarnation, step): the shard's ledger
            # must turn every retry of an applied push into an acknowledged duplicate.
            reply = grpcutil.retry(attempt, deadline_s=120.0,
                                   backoff=grpcutil.Backoff(base_s=0.001, cap_s=0.01))
            stats[w]["attempts"] += tries[0]
            stats[w]["retried_steps"] += tries[0] > 1
            stats[w]["duplicate_replies"] += reply.duplicate
            assert reply.duplicate == (tries[0] > 1)
    run_in_threads(worker, workers, timeout_s=300)

    st = status(s.stub)
    faults = s.faults.counts()
    attempts = sum(v["attempts"] for v in stats.values())
    assert st.pushes == workers * steps              # one apply per unique (worker, step)
    assert st.shard_version == workers * steps
    # Every lost reply caused exactly one more attempt, and that attempt was a duplicate.
    assert st.duplicates == faults.dropped == attempts - workers * steps
    assert faults.calls == attempts
    # ~10% of 2,000+ calls: far from 0 and far from all (seeded, so stable).
    assert 100 < faults.dropped < 400
    assert sum(v["duplicate_replies"] for v in stats.values()) == sum(v["retried_steps"] for v in stats.values())

    reference = w0.astype(np.float64)
    for w in range(workers):
        for step in range(steps):
            reference -= LR * grad_for(w, step).astype(np.float64)
    np.testing.assert_allclose(values(s), reference, rtol=0, atol=1e-6)
    assert dict(st.clocks) == {w: steps for w in range(workers)}


# -- the same through the worker's own client, over both push RPCs ------------------------------
def test_shard_client_retries_lost_replies_exactly_once_over_push_and_push_batch():
    """ShardClient's retry path (backoff, re-resolving the shard, resending the same encoded
    bytes) under 10% lost replies: a tensor just past the one-message bound on one shard goes
    by the Push stream, a small one on the other by PushBatch; every push is applied once."""
    from shardps.pscommon.framing import BATCH_BYTES
    workers, steps, big_n = 2, 200, BATCH_BYTES // 4 + 1000
    job = JobSpec(num_servers=2, slice_bytes=2 * BATCH_BYTES, optimizer=OptimizerConfig(kind="sgd", lr=LR))
    sched = SchedulerProcess(SchedulerConfig(job=job))
    sched.start()
    injectors = [FaultInjector(FaultPlan(drop_response_after_apply=0.1, methods=("Push", "PushBatch"),
                                         seed=100 + s)) for s in range(2)]
    servers = []
    try:
        for s in range(2):
            srv = ServerProcess(ServerConfig(scheduler=sched.address, shard_id=s, interceptors=(injectors[s],)))
            srv.start()
            servers.append(srv)
        w0 = {"small": (np.arange(N) / 8).astype(np.float32), "big": np.ones(big_n, np.float32)}

        def grads(w, step):
            return {"small": grad_for(w, step), "big": np.full(big_n, grad_for(w, step)[0], np.float32)}

        clients = [ShardClient(ClientConfig(scheduler=sched.address, name=f"w{w}")) for w in range(workers)]
        for c in clients:
            c.join()
            c.wait_for_servers()
            c.declare(w0)
        smap = clients[0].shard_map
        (big_key,), (small_key,) = smap.keys_of_param("big"), smap.keys_of_param("small")
        assert {big_key.shard, small_key.shard} == {0, 1}
        assert not clients[0].fits_batch(big_key.shard) and clients[0].fits_batch(small_key.shard)
        def run(w):
            for step in range(steps):
                clients[w].push(grads(w, step))
        run_in_threads(run, workers, timeout_s=240)

        for srv, inj in zip(servers, injectors):
            counts = inj.counts()
            assert srv.shard.version == workers * steps, srv.shard.shard_id   # one apply per (worker, step)
            assert srv.shard.duplicates == counts.dropped                     # each lost reply: one duplicate
            assert workers * steps * 0.05 < counts.dropped < workers * steps * 0.2
        ref_small, ref_big = w0["small"].astype(np.float64), np.float64(1.0)
        for w in range(workers):
            for step in range(steps):
                g = grad_for(w, step).astype(np.float64)
                ref_small -= LR * g
                ref_big -= LR * g[0]
        out = {"small": np.empty(N, np.float32), "big": np.empty(big_n, np.float32)}
        clients[0].pull(out)
        np.testing.assert_allclose(out["small"], ref_small, rtol=0, atol=1e-6)
        np.testing.assert_allclose(out["big"], ref_big, rtol=0, atol=1e-6)
        for c in clients:
            c.leave()
    finally:
        for srv in servers:
            srv.drain()
        sched.drain()
