"""Declare / Pull / Push / Inspect / ShardStatus on one real shard over real gRPC."""
import grpc
import numpy as np
import pytest

from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.wire.v1 import job_pb2, ps_pb2, tensor_pb2

from .helpers import (declare, initial_values, inspect, pull, push, push_requests, shard_map, status,
                      tensor_chunks,
                      values)

SHAPES = {"w": (4, 3), "b": (5,), "emb": (7, 2, 2)}
LR = 0.25


@pytest.fixture
def srv(shard_server):
    return shard_server(JobSpec(optimizer=OptimizerConfig(kind="sgd", lr=LR)))


def test_declared_values_pull_back_bit_exact(srv):
    smap = shard_map(SHAPES)
    init = initial_values(smap, seed=1)
    reply = declare(srv.stub, smap, init)
    assert (reply.created, reply.existing) == (3, 0)

    header, got, _ = pull(srv.stub, smap.fingerprint)
    assert header.shard_version == 0 and header.next_step == 0
    assert sorted(got) == sorted(init)
    for key, value in init.items():
        assert got[key].tobytes() == value.tobytes(), key

    # a subset of keys, in the order asked
    _, some, _ = pull(srv.stub, smap.fingerprint, keys=["emb", "b"])
    assert list(some) == ["emb", "b"]
    assert some["emb"].tobytes() == init["emb"].tobytes()


def test_push_applies_exactly_p_minus_lr_g_and_versions_rise(srv):
    smap = shard_map(SHAPES)
    init = initial_values(smap, seed=2)
    declare(srv.stub, smap, init)
    rng = np.random.default_rng(3)
    expected = {k: v.copy() for k, v in init.items()}
    key_versions = {k: 0 for k in init}
    for step in range(3):
        # the second push touches only two of the three keys
        names = sorted(init) if step != 1 else ["b", "w"]
        grads = {k: rng.standard_normal(init[k].size).astype(np.float32) for k in names}
        reply = push(srv.stub, smap.fingerprint, grads, step=step, base_version=step)
        assert reply.shard_version == step + 1
        assert not reply.duplicate
        assert reply.staleness == 0
        for k, g in grads.items():
            expected[k] = expected[k] - np.float32(LR) * g
            key_versions[k] += 1
        got = values(srv.stub, smap.fingerprint)
        for k in init:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
        info = inspect(srv.stub)
        assert {k: info[k].version for k in info} == key_versions

    assert key_versions == {"w": 3, "b": 3, "emb": 2}
    header, _, _ = pull(srv.stub, smap.fingerprint, step=3)
    assert header.shard_version == 3


def test_push_reports_staleness_from_base_version(srv):
    smap = shard_map({"w": (6,)})
    declare(srv.stub, smap, initial_values(smap))
    g = {"w": np.ones(6, np.float32)}
    push(srv.stub, smap.fingerprint, g, worker=0, step=0, base_version=0)
    push(srv.stub, smap.fingerprint, g, worker=0, step=1, base_version=1)
    # worker 1 computed on version 0; two pushes were applied since
    reply = push(srv.stub, smap.fingerprint, g, worker=1, step=0, base_version=0)
    assert reply.shard_version == 3 and reply.staleness == 2
    hist = status(srv.stub).staleness
    assert hist.total == 3 and hist.max == 2 and hist.sum == 2


def test_inspect_returns_spec_version_norm_and_sample(srv):
    smap = shard_map(SHAPES)
    init = initial_values(smap, seed=4)
    declare(srv.stub, smap, init)
    push(srv.stub, smap.fingerprint, {"w": np.full(12, 2.0, np.float32)})
    now = values(srv.stub, smap.fingerprint)

    info = inspect(srv.stub, sample=5)
    assert sorted(info) == sorted(SHAPES)
    for key, shape in SHAPES.items():
        ki = info[key]
        assert ki.spec.key == key and ki.spec.param == key
        assert tuple(ki.spec.param_shape) == shape
        assert ki.spec.dtype == tensor_pb2.DTYPE_FLOAT32
        assert ki.spec.length == int(np.prod(shape)) and ki.spec.offset == 0 and ki.spec.shard == 0
        assert ki.version == (1 if key == "w" else 0)
        assert ki.norm == pytest.approx(float(np.linalg.norm(now[key].astype(np.float64))), rel=1e-12)
        np.testing.assert_array_equal(np.array(ki.sample, np.float32), now[key][:5])

    # a sample larger than the tensor gives the whole tensor; a key subset gives those keys
    reply = srv.stub.Inspect(ps_pb2.InspectRequest(keys=["b"], sample=50), timeout=30)
    assert [k.spec.key for k in reply.keys] == ["b"] and reply.shard == 0
    np.testing.assert_array_equal(np.array(reply.keys[0].sample, np.float32), now["b"])


def test_shard_status_counters(srv):
    smap = shard_map(SHAPES)
    init = initial_values(smap)
    declare(srv.stub, smap, init)
    st = status(srv.stub)
    assert st.keys == 3
    assert st.bytes == 4 * sum(v.size for v in init.values())
    assert (st.shard_version, st.pushes, st.pulls, st.duplicates) == (0, 0, 0, 0)
    assert st.mode == job_pb2.MODE_ASYNC

    g = {k: np.ones(v.size, np.float32) for k, v in init.items()}
    push(srv.stub, smap.fingerprint, g, worker=7, step=0)
    push(srv.stub, smap.fingerprint, g, worker=7, step=1)
    push(srv.stub, smap.fingerprint, g, worker=7, step=1)  # a retry
    pull(srv.stub, smap.fingerprint, worker=7, step=2)
    pull(srv.stub, smap.fingerprint, worker=9, step=0)

    st = status(srv.stub)
    assert (st.shard_version, st.pushes, st.duplicates, st.pulls) == (2, 2, 1, 2)
    assert dict(st.clocks) == {7: 2}
    traffic = {t.key: t for t in st.push_traffic}
    assert sorted(traffic) == sorted(init)
    for k, v in init.items():
        # two applied pushes of raw fp32: logical == wire == 2 * nbytes
        assert traffic[k].logical_bytes == traffic[k].wire_bytes == 2 * v.nbytes
        assert traffic[k].codec_seconds > 0        # decode time of the two applied pushes
    pulled = {t.key: t.logical_bytes for t in st.pull_traffic}
    assert pulled == {k: 2 * v.nbytes for k, v in init.items()}
    assert st.uptime_s >= 0


def test_tensor_above_grpc_message_limit_round_trips_in_chunks(srv):
    n = 3_000_000  # 12 MB of float32: above gRPC's 4 MiB default and our 8 MiB message cap
    smap = shard_map({"big": (n,), "small": (3,)})
    assert [k.key for k in smap.keys if k.param == "big"] == ["big"]  # one key, not sliced
    rng = np.random.default_rng(5)
    init = {"big": rng.standard_normal(n).astype(np.float32), "small": np.arange(3, dtype=np.float32)}
    assert len(tensor_chunks("big", init["big"])) > 4  # the request really is chunked
    assert declare(srv.stub, smap, init).created == 2

    _, got, chunks = pull(srv.stub, smap.fingerprint)
    assert chunks > 4
    assert got["big"].tobytes() == init["big"].tobytes()
    assert got["small"].tobytes() == init["small"].tobytes()

    g = rng.standard_normal(n).astype(np.float32)
    push(srv.stub, smap.fingerprint, {"big": g})
    _, got, _ = pull(srv.stub, smap.fingerprint, keys=["big"])
    np.testing.assert_array_equal(got["big"], init["big"] - np.float32(LR) * g)


# -- the one-message forms: PullBatch and PushBatch ---------------------------------------------
def batch_push(stub, fingerprint: str, grads: dict, step: int, worker: int = 0) -> ps_pb2.PushReply:
    msgs = list(push_requests(fingerprint, grads, worker=worker, step=step, base_version=step))
    return stub.PushBatch(ps_pb2.PushBatchRequest(header=msgs[0].header, chunks=[m.chunk for m in msgs[1:]]),
                          timeout=10)


def batch_pull(stub, fingerprint: str, step: int = 0) -> tuple[ps_pb2.PullHeader, dict]:
    reply = stub.PullBatch(ps_pb2.PullRequest(caller=ps_pb2.Caller(worker_id=0, incarnation=1), step=step,
                                              model_fingerprint=fingerprint), timeout=10)
    out = {}
    for chunk in reply.chunks:
        out[chunk.meta.name] = np.frombuffer(chunk.data, np.float32).copy()
    return reply.header, out


def test_batch_methods_match_the_streams_and_apply_exactly_once(srv):
    smap = shard_map(SHAPES)
    init = initial_values(smap, seed=4)
    declare(srv.stub, smap, init)
    g = {k: np.full(v.size, 0.5, np.float32) for k, v in init.items()}
    assert not batch_push(srv.stub, smap.fingerprint, g, step=0).duplicate
    again = batch_push(srv.stub, smap.fingerprint, g, step=0)   # a retry: acknowledged, not applied
    assert again.duplicate and again.shard_version == 1
    stream = push(srv.stub, smap.fingerprint, g, step=0)       # the same push as a stream: a duplicate too
    assert stream.duplicate

    header, got = batch_pull(srv.stub, smap.fingerprint, step=1)
    streamed_header, streamed, _ = pull(srv.stub, smap.fingerprint, step=1)
    assert header.shard_version == streamed_header.shard_version == 1
    for k, v in init.items():
        expected = v - np.float32(LR) * g[k]
        np.testing.assert_array_equal(got[k], expected)
        assert got[k].tobytes() == streamed[k].tobytes()
    st = status(srv.stub)
    assert (st.pushes, st.duplicates) == (1, 2)


def test_pull_batch_too_big_for_one_message_is_refused_before_the_gate(shard_server):
    from shardps.pscommon.framing import BATCH_BYTES
    from shardps.pscommon.tensors import CHUNK_BYTES
    srv = shard_server(JobSpec(mode="sync"))   # a gated pull would wait: the refusal comes first
    smap = shard_map({"big": (BATCH_BYTES // 4 + 1,)})
    declare(srv.stub, smap, initial_values(smap))
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.PullBatch(ps_pb2.PullRequest(caller=ps_pb2.Caller(worker_id=0, incarnation=1), step=5,
                                              model_fingerprint=smap.fingerprint), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "use Pull" in err.value.details()
    assert status(srv.stub).pulls == 0
    _, got, chunks = pull(srv.stub, smap.fingerprint, observer=True)   # the stream carries it
    assert got["big"].size == BATCH_BYTES // 4 + 1 and chunks == -(-(BATCH_BYTES + 4) // CHUNK_BYTES)


def test_push_batch_without_a_header_is_invalid_argument(srv):
    smap = shard_map(SHAPES)
    declare(srv.stub, smap, initial_values(smap))
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.PushBatch(ps_pb2.PushBatchRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in err.value.details()
    assert status(srv.stub).pushes == 0
