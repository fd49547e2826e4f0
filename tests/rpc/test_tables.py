"""Embedding tables over a real ParameterServer: rows pulled by 64-bit id (created on first
touch), row gradients pushed beside the dense ones, in every mode, exactly once."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from shardps.pscommon.framing import BATCH_BYTES
from shardps.pscommon import tables
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tables import TableSpec
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2
from shardps.psserver.embeddings import TablePolicy

from .helpers import TIMEOUT_S, caller, declare_requests, members, push_header, shard_map, status, tensor_chunks

EMB = TableSpec("emb", 4, "normal", 0.1, 7)
SHAPES = {"w": (3,)}
SMAP = shard_map(SHAPES)
FP = SMAP.fingerprint
LR = 0.5
BF16 = tensor_pb2.DTYPE_BFLOAT16


def job(mode: str = "async", servers: int = 1) -> JobSpec:
    return JobSpec(mode=mode, staleness=1 if mode == "ssp" else 0, num_servers=servers,
                   optimizer=OptimizerConfig(kind="sgd", lr=LR))


def declare(srv, specs=(EMB,), shard: int = 0):
    dense = {"w": np.zeros(3, np.float32)} if shard == 0 else {}   # the one dense key is on shard 0
    reqs = list(declare_requests(FP, SMAP.keys_of(0) if shard == 0 else [], dense, shard))
    reqs[0].header.tables.extend(s.to_proto() for s in specs)
    return srv.stub.Declare(iter(reqs), timeout=TIMEOUT_S)


def pull_rows(srv, asks: dict[str, np.ndarray], worker=0, incarnation=1, step=0, observer=False, dtype=0,
              shard: int = 0) -> tuple[ps_pb2.PullHeader, dict[str, np.ndarray]]:
    req = ps_pb2.PullRowsRequest(caller=caller(worker, incarnation, observer), shard=shard, step=step,
                                 model_fingerprint=FP, dtype=dtype,
                                 rows=[ps_pb2.RowBlock(table=t, ids=tables.ids_to_bytes(i)) for t, i in asks.items()])
    header, got = None, {t: [] for t in asks}
    for reply in srv.stub.PullRows(req, timeout=TIMEOUT_S):
        if reply.WhichOneof("body") == "header":
            header = reply.header
            continue
        b = reply.rows
        n = len(b.ids) // 8
        got[b.table].append(tables.decode_rows(b.values, b.dtype, n, EMB.dim, "reply"))
    return header, {t: np.concatenate(v) for t, v in got.items()}


def push_rows(srv, rows: dict[str, tuple[np.ndarray, np.ndarray]], dense=None, worker=0, incarnation=1, step=0,
              dtype=tensor_pb2.DTYPE_FLOAT32, max_bytes=tables.ROW_BLOCK_BYTES):
    msgs = [push_header(FP, worker, incarnation, step)]
    for name, g in (dense or {}).items():
        msgs += [ps_pb2.PushRequest(chunk=c) for c in tensor_chunks(name, g)]
    for t, (ids, grads) in rows.items():
        msgs += [ps_pb2.PushRequest(rows=b) for b in tables.row_blocks(t, ids, grads, dtype, max_bytes)]
    return srv.stub.Push(iter(msgs), timeout=TIMEOUT_S)


def ids_of(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_rows_are_created_on_first_touch_and_updated_by_their_gradients_only(shard_server):
    srv = shard_server(job=job())
    declare(srv)
    ids = ids_of(3, -1, 2**62 + 5)
    _, got = pull_rows(srv, {"emb": ids})
    assert np.array_equal(got["emb"], tables.initial_rows(EMB, ids))   # the initializer's value, from the id
    g = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    # ids repeat inside one push: the row's gradients are summed
    reply = push_rows(srv, {"emb": (np.concatenate([ids, ids[:1]]), np.concatenate([g, g[:1]]))},
                      dense={"w": np.ones(3, np.float32)})
    assert not reply.duplicate and reply.shard_version == 1
    expect = tables.initial_rows(EMB, ids) - LR * g
    expect[0] -= LR * g[0]
    header, got = pull_rows(srv, {"emb": np.concatenate([ids, ids_of(99)])}, step=1)
    assert header.shard_version == 1
    np.testing.assert_allclose(got["emb"][:3], expect, rtol=0, atol=1e-7)
    assert np.array_equal(got["emb"][3], tables.initial_rows(EMB, ids_of(99))[0])   # untouched: as created
    assert srv.shard.tables.stores["emb"].stats().rows == 4
    (st,) = status(srv.stub).tables          # what psctl status and the metrics show
    assert (st.name, st.dim, st.rows, st.admitted) == ("emb", 4, 4, 4) and st.bytes > 4 * 4 * 4


def test_inspect_counts_each_tables_rows_served_and_updated(shard_server):
    srv = shard_server(job=job())
    declare(srv, specs=(EMB, TableSpec("other", 4, "zeros", 0.0, 0)))
    pull_rows(srv, {"emb": ids_of(1, 2, 3), "other": ids_of(4)})
    push_rows(srv, {"emb": (ids_of(1, 2, 1), np.ones((3, 4), np.float32)), "other": (ids_of(4), np.ones((1, 4)))})
    push_rows(srv, {"emb": (ids_of(1), np.ones((1, 4), np.float32))})               # a retry: applied once
    pull_rows(srv, {"emb": ids_of(1, 5)}, observer=True)                            # an observer's read is served too
    reply = srv.stub.Inspect(ps_pb2.InspectRequest(sample=0), timeout=TIMEOUT_S)
    counts = {t.status.name: (t.status.rows_served, t.status.rows_updated) for t in reply.tables}
    assert counts == {"emb": (5, 2), "other": (1, 1)}


def test_a_retried_push_applies_its_rows_once(shard_server):
    srv = shard_server(job=job())
    declare(srv)
    ids, g = ids_of(1, 2), np.ones((2, 4), np.float32)
    assert not push_rows(srv, {"emb": (ids, g)}).duplicate
    again = push_rows(srv, {"emb": (ids, g)})
    assert again.duplicate
    _, got = pull_rows(srv, {"emb": ids}, step=1)
    np.testing.assert_allclose(got["emb"], tables.initial_rows(EMB, ids) - LR * g, atol=1e-7)


def test_sync_averages_a_steps_row_gradients_over_its_workers(shard_server):
    srv = shard_server(job=job("sync"))
    declare(srv)
    srv.shard.set_view(1, members([0, 1]))
    a, b = ids_of(5), ids_of(5, 6)
    push_rows(srv, {"emb": (a, np.full((1, 4), 2.0, np.float32))}, worker=0)
    _, mid = pull_rows(srv, {"emb": ids_of(5)}, observer=True)
    assert np.array_equal(mid["emb"], tables.initial_rows(EMB, ids_of(5)))   # the step is not complete
    push_rows(srv, {"emb": (b, np.full((2, 4), 4.0, np.float32))}, worker=1)
    _, got = pull_rows(srv, {"emb": ids_of(5, 6)}, worker=0, step=1)
    init = tables.initial_rows(EMB, ids_of(5, 6))
    np.testing.assert_allclose(got["emb"][0], init[0] - LR * (2 + 4) / 2, atol=1e-6)
    np.testing.assert_allclose(got["emb"][1], init[1] - LR * 4 / 2, atol=1e-6)


def test_ssp_holds_a_row_pull_at_the_gate_like_a_dense_pull(shard_server):
    srv = shard_server(job=job("ssp"))
    declare(srv)
    srv.shard.set_view(1, members([0, 1]))
    push_rows(srv, {"emb": (ids_of(1), np.ones((1, 4), np.float32))}, worker=0, step=0)
    push_rows(srv, {"emb": (ids_of(1), np.ones((1, 4), np.float32))}, worker=0, step=1)
    req = ps_pb2.PullRowsRequest(caller=caller(0, 1), shard=0, step=2, model_fingerprint=FP,
                                 rows=[ps_pb2.RowBlock(table="emb", ids=tables.ids_to_bytes(ids_of(1)))])
    with pytest.raises(grpc.RpcError) as err:   # worker 1 is at clock 0: staleness 1 admits step 1 at most
        list(srv.stub.PullRows(req, timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    push_rows(srv, {}, worker=1, step=0)
    header, got = pull_rows(srv, {"emb": ids_of(1)}, step=2)
    assert header.shard_version == 2 and got["emb"].shape == (1, 4)   # an empty push applies nothing


def test_bf16_rows_both_ways_and_blocks_of_a_long_id_list(shard_server):
    srv = shard_server(job=job())
    declare(srv)
    ids = np.arange(20_000, dtype=np.int64) * 7919
    g = np.full((len(ids), 4), 0.5, np.float32)
    push_rows(srv, {"emb": (ids, g)}, dtype=BF16, max_bytes=4096)   # 103 row blocks in one push
    _, got = pull_rows(srv, {"emb": ids}, step=1, dtype=BF16)
    expect = tables.initial_rows(EMB, ids) - LR * g
    np.testing.assert_allclose(got["emb"], expect, rtol=1 / 128, atol=1e-6)   # bf16 keeps 8 bits


def test_a_second_shard_refuses_ids_that_live_elsewhere(shard_server):
    srv = shard_server(job=job(servers=2), shard_id=1)
    declare(srv, shard=1)
    ids = np.arange(64, dtype=np.int64)
    mine = ids[tables.shard_of(ids, 2) == 1]
    _, got = pull_rows(srv, {"emb": mine}, shard=1)
    assert got["emb"].shape == (len(mine), 4)
    with pytest.raises(grpc.RpcError) as err:
        pull_rows(srv, {"emb": ids}, shard=1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "belongs to shard 0 of 2" in err.value.details()


@pytest.mark.parametrize("bad, code, text", [
    (lambda b: setattr(b, "ids", b.ids[:-3]), grpc.StatusCode.INVALID_ARGUMENT, "not a whole number of 8-byte ids"),
    (lambda b: setattr(b, "values", b.values[:-4]), grpc.StatusCode.INVALID_ARGUMENT, "value bytes for 2 ids of dim 4"),
    (lambda b: setattr(b, "table", "nope"), grpc.StatusCode.NOT_FOUND, "table 'nope' is not declared"),
    (lambda b: setattr(b, "dtype", tensor_pb2.DTYPE_INT8), grpc.StatusCode.INVALID_ARGUMENT, "not DTYPE_INT8"),
])
def test_malformed_row_pushes_are_refused_and_change_nothing(shard_server, bad, code, text):
    srv = shard_server(job=job())
    declare(srv)
    ids = ids_of(1, 2)
    _, before = pull_rows(srv, {"emb": ids})
    block = tables.row_blocks("emb", ids, np.ones((2, 4), np.float32), tensor_pb2.DTYPE_FLOAT32)[0]
    bad(block)
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Push(iter([push_header(FP), ps_pb2.PushRequest(chunk=next(iter(tensor_chunks("w", np.ones(3, np.float32))))),
                            ps_pb2.PushRequest(rows=block)]), timeout=TIMEOUT_S)
    assert err.value.code() == code and text in err.value.details(), err.value.details()
    _, after = pull_rows(srv, {"emb": ids})
    assert np.array_equal(before["emb"], after["emb"]) and srv.shard.version == 0 and not srv.shard.ledger


def test_a_table_redeclared_with_another_spec_is_refused_and_nothing_is_created(shard_server):
    srv = shard_server(job=job())
    assert declare(srv).created == 1
    other = TableSpec("emb", 8, "zeros", 0.0, 0)
    with pytest.raises(grpc.RpcError) as err:
        declare(srv, (TableSpec("new", 2, "zeros", 0.0, 0), other))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "exists with another spec" in err.value.details()
    assert sorted(srv.shard.tables.specs) == ["emb"]
    declare(srv)   # the same spec again is a no-op


def test_momentum_has_no_sparse_form(shard_server):
    srv = shard_server(job=JobSpec(optimizer=OptimizerConfig(kind="momentum", lr=0.1)))
    with pytest.raises(grpc.RpcError) as err:
        declare(srv)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no sparse form" in err.value.details()
    assert not srv.shard.entries and not srv.shard.tables.specs


def test_admission_stores_an_id_from_its_nth_lookup_and_drops_gradients_before(shard_server):
    srv = shard_server(job=job(), table_policy=TablePolicy(admit_after=2))
    declare(srv)
    ids, g = ids_of(1, 2), np.ones((2, 4), np.float32)
    _, first = pull_rows(srv, {"emb": ids})                     # first touch: not stored
    assert np.array_equal(first["emb"], tables.initial_rows(EMB, ids))
    push_rows(srv, {"emb": (ids, g)}, step=0)                   # dropped: no row yet
    (st,) = status(srv.stub).tables
    assert (st.rows, st.dropped_gradients, st.unadmitted_lookups) == (0, 2, 2)
    _, second = pull_rows(srv, {"emb": ids_of(1)}, step=1)     # id 1's second lookup: admitted
    assert np.array_equal(second["emb"], tables.initial_rows(EMB, ids_of(1)))
    push_rows(srv, {"emb": (ids, g)}, step=1)                   # id 1 applied, id 2 dropped
    _, after = pull_rows(srv, {"emb": ids}, step=2, observer=True)
    np.testing.assert_allclose(after["emb"][0], tables.initial_rows(EMB, ids_of(1))[0] - LR, atol=1e-7)
    assert np.array_equal(after["emb"][1], tables.initial_rows(EMB, ids_of(2))[0])
    (st,) = status(srv.stub).tables
    assert (st.rows, st.admitted, st.dropped_gradients) == (1, 1, 3)


def test_rows_idle_for_n_steps_are_evicted_and_come_back_as_new(shard_server):
    srv = shard_server(job=job(), table_policy=TablePolicy(evict_idle_steps=4))
    declare(srv)
    hot, cold = ids_of(1), ids_of(2)
    push_rows(srv, {"emb": (np.concatenate([hot, cold]), np.ones((2, 4), np.float32))}, step=0)
    for step in range(1, 8):                                    # only the hot row is touched
        pull_rows(srv, {"emb": hot}, step=step)
        push_rows(srv, {"emb": (hot, np.ones((1, 4), np.float32))}, step=step)
    (st,) = status(srv.stub).tables
    assert (st.rows, st.evicted_idle) == (1, 1)
    _, got = pull_rows(srv, {"emb": cold}, step=8)             # created again: its update is gone
    assert np.array_equal(got["emb"], tables.initial_rows(EMB, cold))


def test_the_row_cap_evicts_the_least_recently_used(shard_server):
    srv = shard_server(job=job(), table_policy=TablePolicy(max_rows=100))
    declare(srv)
    for step in range(3):
        ids = np.arange(step * 80, step * 80 + 80, dtype=np.int64)
        pull_rows(srv, {"emb": ids}, step=step)
        push_rows(srv, {"emb": (ids, np.ones((80, 4), np.float32))}, step=step)
    (st,) = status(srv.stub).tables
    assert st.rows <= 101 and st.evicted_lru >= 140 and st.rows + st.evicted_lru == 240


def test_a_bad_policy_is_refused():
    for bad in (dict(admit_after=0), dict(evict_idle_steps=0), dict(max_rows=-1), dict(admit_after=True)):
        with pytest.raises(InvalidArgument, match="must be an integer >= 1"):
            TablePolicy(**bad)


def test_one_message_row_calls_match_the_streams(shard_server):
    """PushBatch carries row blocks as Push does (the same update, once); PullRowsBatch
    answers as PullRows, and refuses before the gate a reply that could pass one message."""
    srv = shard_server(job=job())
    declare(srv)
    ids, g = ids_of(3, 4, 3), np.ones((3, 4), np.float32)
    batch = ps_pb2.PushBatchRequest(header=push_header(FP).header,
                                    rows=tables.row_blocks("emb", ids, g, tensor_pb2.DTYPE_FLOAT32))
    assert not srv.stub.PushBatch(batch, timeout=TIMEOUT_S).duplicate
    assert srv.stub.PushBatch(batch, timeout=TIMEOUT_S).duplicate          # a retry: applied once
    req = ps_pb2.PullRowsRequest(caller=caller(0, 1), shard=0, step=1, model_fingerprint=FP,
                                 rows=[ps_pb2.RowBlock(table="emb", ids=tables.ids_to_bytes(ids_of(3, 4)))])
    one = srv.stub.PullRowsBatch(req, timeout=TIMEOUT_S)
    got = tables.decode_rows(one.rows[0].values, one.rows[0].dtype, 2, EMB.dim, "reply")
    _, streamed = pull_rows(srv, {"emb": ids_of(3, 4)}, step=1)
    assert np.array_equal(got, streamed["emb"])
    init = tables.initial_rows(EMB, ids_of(3, 4))
    np.testing.assert_allclose(got, init - LR * np.array([[2.0] * 4, [1.0] * 4], np.float32), atol=1e-7)
    big = ps_pb2.PullRowsRequest(caller=caller(0, 1), shard=0, step=1, model_fingerprint=FP,
                                 rows=[ps_pb2.RowBlock(table="emb", ids=tables.ids_to_bytes(
                                     np.arange(BATCH_BYTES // (8 + 4 * EMB.dim) + 1000)))])
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.PullRowsBatch(big, timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "use PullRows" in err.value.details()
    assert srv.shard.tables.stores["emb"].stats().rows == 2               # the refused pull created nothing
