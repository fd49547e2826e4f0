"""Embedding rows in the fused call (PushPullBatch's pull_rows): a push carries the next step's
row ids and its reply their rows, read under the shard's lock right after the push. A step
computes on exactly the rows a push then a PullRows give; the push half is exactly-once under
lost replies; ssp outside its bound answers without rows and the worker pulls them; malformed
ids are refused before anything applies; asks other than the prefetched ids go to PullRows.
Real servers on port 0 (raw stubs) and real in-process clusters (ShardClient)."""
from __future__ import annotations

import contextlib

import grpc
import numpy as np
import pytest

from shardps.pscommon.framing import BATCH_BYTES
from shardps.pscommon import tables
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.tables import TableSpec
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.worker.client import ClientConfig, ShardClient

from .faults import FaultInjector, FaultPlan
from .helpers import TIMEOUT_S, Background, caller, declare_requests, members, poll, shard_map, status

LR = 0.25
PER_FIELD = (TableSpec("f0", 4, "uniform", 0.1, 3), TableSpec("f1", 8, "normal", 0.1, 5))
SHARED = (TableSpec("emb", 4, "uniform", 0.1, 3),)
DENSE = {"bias": 3}   # rides along in the shared-table model: both pull halves in one call


def asks_of(step: int, specs: tuple[TableSpec, ...], worker: int = 0) -> dict[str, np.ndarray]:
    """A step's ids per table: repeats, negative and 64-bit ids, spread over the shards."""
    rng = np.random.default_rng(100 * worker + step)
    return {t.name: np.concatenate([rng.integers(0, 40, 24), rng.integers(-2**62, 2**62, 4)]).astype(np.int64)
            for t in specs}


def row_grads(asks: dict, got: dict, step: int) -> dict:
    """Depends on the rows, so a step computed on other rows shows."""
    return {t: (ids, got[t] * np.float32(0.5) + np.float32(0.01 * (step + 1))) for t, ids in asks.items()}


@contextlib.contextmanager
def counted_cluster(job: JobSpec, drop: float = 0.0):
    """A scheduler and job.num_servers servers in this process; each server counts its
    PushPullBatch calls (dropping that share of their replies after they ran) and its
    PullRowsBatch calls."""
    sched = SchedulerProcess(SchedulerConfig(job=job))
    sched.start()
    fused = [FaultInjector(FaultPlan(drop_response_after_apply=drop, methods=("PushPullBatch",), seed=11 + s))
             for s in range(job.num_servers)]
    pulls = [FaultInjector(FaultPlan(methods=("PullRowsBatch",))) for _ in range(job.num_servers)]
    servers = []
    try:
        for s in range(job.num_servers):
            srv = ServerProcess(ServerConfig(scheduler=sched.address, shard_id=s, interceptors=(fused[s], pulls[s])))
            srv.start()
            servers.append(srv)
        yield sched.address, servers, fused, pulls
    finally:
        for srv in servers:
            srv.drain()
        sched.drain()


def client(address: str, name: str, fuse: bool) -> ShardClient:
    c = ShardClient(ClientConfig(scheduler=address, name=name, retry_deadline_s=60, fuse=fuse))
    c.join()
    c.wait_for_servers()
    return c


def train(address: str, steps: int, specs, dense: dict[str, int], fuse: bool) -> list[dict]:
    """One worker's steps (rows of the step's ids, gradients of them, a push carrying the
    next step's ids when fused): every step's rows and dense values, the final step's included."""
    c = client(address, "w", fuse)
    try:
        c.declare({n: np.linspace(-1, 1, size).astype(np.float32) for n, size in dense.items()}, specs)
        out = {n: np.empty(size, np.float32) for n, size in dense.items()}
        seen = []
        for step in range(steps + 1):
            asks = asks_of(step, specs)
            if dense:
                c.pull(out)
            got = c.pull_rows(asks)
            seen.append({**{t: v.copy() for t, v in got.items()}, **{n: v.copy() for n, v in out.items()}})
            if step < steps:
                c.push({n: v * np.float32(0.5) for n, v in out.items()}, row_grads=row_grads(asks, got, step),
                       next_rows=asks_of(step + 1, specs))
        return seen
    finally:
        c.leave()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def _calls(injectors) -> list[int]:
    return [i.counts().calls for i in injectors]


JOB = JobSpec(optimizer=OptimizerConfig(kind="adagrad", lr=LR))


@pytest.mark.parametrize("layout", ["per-field", "shared"])
@pytest.mark.parametrize("num_servers", [1, 2])
def test_fused_rows_equal_a_push_then_a_pull_rows(num_servers, layout):
    """The same worker with and without fusion reads the same rows (and dense values), bit for
    bit, every step; the fused run makes one PushPullBatch a step per shard and pulls rows only
    for its first step, the others coming in the fused replies."""
    steps = 6
    specs, dense = (PER_FIELD, {}) if layout == "per-field" else (SHARED, DENSE)
    job = JobSpec(num_servers=num_servers, optimizer=JOB.optimizer)
    runs = {}
    for fuse in (False, True):
        with counted_cluster(job) as (address, servers, fused, pulls):
            runs[fuse] = train(address, steps, specs, dense, fuse)
            assert _calls(fused) == [steps * fuse] * num_servers
            assert _calls(pulls) == [1 if fuse else steps + 1] * num_servers   # every step's ids reach every shard
            runs[fuse, "served"] = [sum(srv.shard.tables.rows_served.values()) for srv in servers]
    assert runs[False, "served"] == runs[True, "served"]   # a fused lookup is a lookup, counted once
    for step, (a, b) in enumerate(zip(runs[False], runs[True])):
        assert _same(a, b), step


def test_fused_rows_are_exactly_once_under_lost_replies():
    """A third of the fused replies are dropped after the server ran them: the retry's push is a
    duplicate, its rows are read again, and the worker reads exactly the rows of a clean run."""
    steps, job = 20, JobSpec(num_servers=2, optimizer=JOB.optimizer)
    with counted_cluster(job) as (address, _, _, _):
        clean = train(address, steps, PER_FIELD, {}, True)
    with counted_cluster(job, drop=0.33) as (address, servers, fused, _):
        lossy = train(address, steps, PER_FIELD, {}, True)
        dropped = [i.counts().dropped for i in fused]
        assert sum(dropped) > 0
        assert [(s.shard.version, s.shard.duplicates) for s in servers] == [(steps, d) for d in dropped]
    for step, (a, b) in enumerate(zip(clean, lossy)):
        assert _same(a, b), step


def test_ssp_outside_the_bound_answers_without_rows_and_the_worker_pulls():
    """ssp(1), workers a and b: a's push of step 0 brings step 1's rows; its push of step 1
    may not read step 2 (a is 2 ahead of b), so the reply has none and a's pull_rows of step 2
    calls PullRows, which waits at the gate until b pushes, then reads b's push applied."""
    job = JobSpec(mode="ssp", staleness=1, num_servers=2, optimizer=JOB.optimizer)
    with counted_cluster(job) as (address, servers, _, pulls):
        a, b = client(address, "a", True), client(address, "b", True)
        try:
            a.declare({}, SHARED)
            b.declare({}, SHARED)
            poll(lambda: all(len(s.shard.gate.live) == 2 for s in servers), what="both workers on every shard")
            for step in range(2):
                asks = asks_of(step, SHARED)
                got = a.pull_rows(asks)
                a.push({}, row_grads=row_grads(asks, got, step), next_rows=asks_of(step + 1, SHARED))
            assert _calls(pulls) == [1, 1]   # step 1's rows came with the push of step 0
            waiting = Background(a.pull_rows, asks_of(2, SHARED))
            # held at the gate (b is 2 steps behind), not answered from anything a push brought
            poll(lambda: any(s.shard.waiting_pulls for s in servers), what="a's row pull waiting at a gate")
            assert not waiting.done.is_set()
            b_asks = asks_of(0, SHARED, worker=1)
            b.push({}, row_grads=row_grads(b_asks, b.pull_rows(b_asks), 0))
            got = waiting.join()
            assert _calls(pulls)[0] >= 3 and _calls(pulls)[1] >= 3   # b's pull and a's, on each shard
            ref = ShardClient(ClientConfig(scheduler=address, name="observer"))
            ref.attach()
            assert _same(got, ref.pull_rows(asks_of(2, SHARED)))   # the rows after b's push
        finally:
            a.leave()
            b.leave()


def test_asks_other_than_the_prefetched_ids_go_to_pull_rows():
    """A push carried step 1's ids; the worker asks for other ids (a permutation, a table
    fewer): those are pulled with PullRows, and the rows equal an unfused worker's."""
    job = JobSpec(num_servers=2, optimizer=JOB.optimizer)
    results = {}
    for fuse in (False, True):
        with counted_cluster(job) as (address, _, _, pulls):
            c = client(address, "w", fuse)
            try:
                c.declare({}, PER_FIELD)
                asks = asks_of(0, PER_FIELD)
                got = c.pull_rows(asks)
                c.push({}, row_grads=row_grads(asks, got, 0), next_rows=asks_of(1, PER_FIELD))
                before = _calls(pulls)
                other = {t: ids[::-1] for t, ids in asks_of(1, PER_FIELD).items()}
                results[fuse] = c.pull_rows(other)
                assert [n - m for n, m in zip(_calls(pulls), before)] == [1, 1]
                # the prefetched rows were dropped, not kept for later: asking the same ids again calls too
                results[fuse, "again"] = c.pull_rows(asks_of(1, PER_FIELD))
                assert [n - m for n, m in zip(_calls(pulls), before)] == [2, 2]
            finally:
                c.leave()
    assert _same(results[False], results[True])
    assert _same(results[False, "again"], results[True, "again"])


# -- the RPC on a bare shard -----------------------------------------------------------------
SMAP = shard_map({"w": (3,)})
FP = SMAP.fingerprint
EMB = SHARED[0]


def _declare(srv):
    reqs = list(declare_requests(FP, SMAP.keys_of(0), {"w": np.zeros(3, np.float32)}, 0))
    reqs[0].header.tables.extend([EMB.to_proto()])
    srv.stub.Declare(iter(reqs), timeout=TIMEOUT_S)


def _on_shard(shard: int, n: int) -> np.ndarray:
    """The first n ids (from 1) that live on `shard` of two."""
    ids = np.arange(1, 64 * n + 1, dtype=np.uint64)
    return ids[tables.shard_of(ids, 2) == shard][:n]


MINE = _on_shard(0, 2)


def _fused(srv, step: int, pull_rows: list, dtype: int = 0) -> ps_pb2.PushPullReply:
    grads = tables.row_blocks("emb", MINE, np.ones((2, EMB.dim), np.float32),
                              tensor_pb2.DTYPE_FLOAT32)
    req = ps_pb2.PushPullRequest(
        header=ps_pb2.PushHeader(caller=caller(0, 1), shard=0, step=step, model_fingerprint=FP),
        rows=list(grads), pull_rows=pull_rows, pull_rows_dtype=dtype)
    return srv.stub.PushPullBatch(req, timeout=TIMEOUT_S)


def _state(srv) -> tuple:
    st = status(srv.stub)
    t = st.tables[0]
    return st.shard_version, st.pushes, st.pulls, dict(st.clocks), t.rows, t.rows_served, t.rows_updated


def test_malformed_next_step_ids_are_refused_and_change_nothing(shard_server):
    """Every check of the rows half runs before the push applies: ids not a whole number of
    8 bytes, values sent with the ids, an undeclared table, an id of another shard, a row dtype
    that is not float, a reply past one message. Each is refused with its code, the shard as
    before (no push, no clock, no row created)."""
    srv = shard_server(JobSpec(num_servers=2, optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    _declare(srv)
    srv.shard.set_view(1, members([0]))
    mine = MINE
    first = _fused(srv, 0, [ps_pb2.RowBlock(table="emb", ids=tables.ids_to_bytes(mine))])
    assert first.HasField("header") and len(first.rows) == 1
    np.testing.assert_array_equal(
        tables.decode_rows(first.rows[0].values, first.rows[0].dtype, 2, EMB.dim, "reply"),
        tables.initial_rows(EMB, mine) - np.float32(LR))
    before = _state(srv)
    foreign = _on_shard(1, 1)[0]
    many = _on_shard(0, BATCH_BYTES // (8 + 4 * EMB.dim) + 1000)   # ids and their rows: past one message
    cases = {
        "ids not 8-byte": ([ps_pb2.RowBlock(table="emb", ids=b"\x01" * 7)], 0, grpc.StatusCode.INVALID_ARGUMENT),
        "values with ids": ([ps_pb2.RowBlock(table="emb", ids=tables.ids_to_bytes(mine), values=b"\0" * 32)], 0,
                            grpc.StatusCode.INVALID_ARGUMENT),
        "undeclared table": ([ps_pb2.RowBlock(table="nope", ids=tables.ids_to_bytes(mine))], 0,
                             grpc.StatusCode.NOT_FOUND),
        "foreign id": ([ps_pb2.RowBlock(table="emb", ids=tables.ids_to_bytes(np.array([foreign], np.uint64)))], 0,
                       grpc.StatusCode.INVALID_ARGUMENT),
        "int8 rows": ([ps_pb2.RowBlock(table="emb", ids=tables.ids_to_bytes(mine))], tensor_pb2.DTYPE_INT8,
                      grpc.StatusCode.INVALID_ARGUMENT),
        "past one message": ([ps_pb2.RowBlock(table="emb", ids=tables.ids_to_bytes(many))], 0,
                             grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    for what, (blocks, dtype, code) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            _fused(srv, 1, blocks, dtype)
        assert err.value.code() == code, what
        assert _state(srv) == before, what
    assert srv.shard.ledger[0].last_step == 0


def _psclient_losses(address: str, fuse: bool, steps: int) -> list[float]:
    """A torch model of one ShardedEmbeddingBag through PSClient and EmbeddingClient, each push
    handing over the next batch's ids (EmbeddingClient.asks)."""
    import torch

    from shardps import PSClient
    from shardps.worker.embedding import EmbeddingClient, ShardedEmbeddingBag, sharded_embeddings

    model = torch.nn.Module()
    model.bag = ShardedEmbeddingBag("items", 4, mode="sum", initializer="uniform", scale=0.1, seed=1)
    batches = [torch.from_numpy(asks_of(s, SHARED)["emb"]) for s in range(steps + 1)]
    offsets = torch.tensor([0, 10, 20])
    losses = []
    with PSClient.connect(address, model, fuse=fuse) as ps:
        rows = EmbeddingClient(ps.client, sharded_embeddings(model))
        for step in range(steps):
            ps.pull()
            rows.fetch({model.bag: batches[step]})
            loss = ((model.bag(batches[step], offsets) - 1.0) ** 2).mean()
            loss.backward()
            assert ps.push(row_grads=rows.row_grads(), next_rows=rows.asks({model.bag: batches[step + 1]}))
            losses.append(loss.item())
        rows.close()
    return losses


def test_psclient_hands_the_next_batchs_ids_to_its_push():
    """PSClient.push(next_rows=EmbeddingClient.asks(next batch)): fused, the next fetch takes
    the rows from the push's replies (one PullRows, the first step's); the losses are the
    unfused run's, bit for bit."""
    steps = 5
    job = JobSpec(num_servers=2, optimizer=JOB.optimizer)
    got = {}
    for fuse in (False, True):
        with counted_cluster(job) as (address, _, fused, pulls):
            got[fuse] = _psclient_losses(address, fuse, steps)
            assert _calls(pulls) == [1 if fuse else steps] * 2
            assert _calls(fused) == [steps * fuse] * 2
    assert got[True] == got[False]
