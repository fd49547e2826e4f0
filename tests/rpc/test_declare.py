"""Idempotent declaration: the same spec keeps trained values, a different one is refused."""
import grpc
import numpy as np
import pytest

from shardps.pscommon import grpcutil, sharding
from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import scheduler_pb2, scheduler_pb2_grpc, tensor_pb2
from shardps.worker.client import ClientConfig, ShardClient

from .helpers import (F32, TIMEOUT_S, Background, declare, declare_requests, initial_values, push,
                      shard_map, snapshot, values)

SHAPES = {"w": (4, 3), "b": (5,)}


def scheduler_stub(address: str) -> scheduler_pb2_grpc.SchedulerStub:
    """Raw calls to the scheduler, beside the client under test."""
    return scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(address))


def trained_shard(shard_server):
    srv = shard_server()
    smap = shard_map(SHAPES)
    init = initial_values(smap, seed=0)
    declare(srv.stub, smap, init)
    push(srv.stub, smap.fingerprint, {"w": np.ones(12, np.float32), "b": np.ones(5, np.float32)})
    return srv, smap, init


def test_same_spec_again_keeps_trained_values(shard_server):
    srv, smap, init = trained_shard(shard_server)
    trained = values(srv.stub, smap.fingerprint)
    assert not np.array_equal(trained["w"], init["w"])  # the push changed something

    other_init = initial_values(smap, seed=99)
    reply = declare(srv.stub, smap, other_init)
    assert (reply.created, reply.existing) == (0, 2)
    after = values(srv.stub, smap.fingerprint)
    for k in trained:
        assert after[k].tobytes() == trained[k].tobytes(), k


def test_declaring_in_parts_creates_each_key_once(shard_server):
    srv = shard_server()
    smap = shard_map(SHAPES)
    init = initial_values(smap)
    w_key = [k for k in smap.keys if k.key == "w"]
    assert (declare(srv.stub, smap, {"w": init["w"]}, keys=w_key).created) == 1
    reply = declare(srv.stub, smap, init)
    assert (reply.created, reply.existing) == (1, 1)
    got = values(srv.stub, smap.fingerprint)
    assert got["b"].tobytes() == init["b"].tobytes()


def test_different_fingerprint_is_failed_precondition_and_state_unchanged(shard_server):
    srv, smap, _ = trained_shard(shard_server)
    before = snapshot(srv.stub, smap.fingerprint)
    other = shard_map({"w": (4, 3), "b": (6,)})  # another parameter set
    assert other.fingerprint != smap.fingerprint
    with pytest.raises(grpc.RpcError) as err:
        declare(srv.stub, other, initial_values(other, seed=5))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert smap.fingerprint in err.value.details()
    assert snapshot(srv.stub, smap.fingerprint) == before


def test_same_key_with_different_shape_is_failed_precondition(shard_server):
    srv, smap, _ = trained_shard(shard_server)
    before = snapshot(srv.stub, smap.fingerprint)
    # same fingerprint, but key "b" now claims another shape (and length)
    bad = sharding.Key("b", "b", F32, (2, 3), 0, 6, 0)
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Declare(declare_requests(smap.fingerprint, [bad], {"b": np.zeros(6, np.float32)}),
                         timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'b'" in err.value.details()
    assert snapshot(srv.stub, smap.fingerprint) == before


def test_mismatch_in_one_key_creates_none_of_the_others(shard_server):
    srv, smap, _ = trained_shard(shard_server)
    before = snapshot(srv.stub, smap.fingerprint)
    keys = [sharding.Key("new", "new", F32, (3,), 0, 3, 0), sharding.Key("b", "b", F32, (2, 3), 0, 6, 0)]
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Declare(declare_requests(smap.fingerprint, keys,
                                          {"new": np.ones(3, np.float32), "b": np.zeros(6, np.float32)}),
                         timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert snapshot(srv.stub, smap.fingerprint) == before


def test_keys_of_another_shard_are_invalid_argument(shard_server):
    srv = shard_server(shard_id=0)
    smap = shard_map({"a": (100,), "b": (50,), "c": (10,)}, num_shards=2)
    mine = smap.keys_of(0)
    theirs = smap.keys_of(1)
    assert mine and theirs
    init = initial_values(smap)
    # header says shard 0, but lists keys that the map puts on shard 1
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Declare(declare_requests(smap.fingerprint, mine + theirs, init, shard=0),
                         timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(theirs[0].key) in err.value.details()
    assert srv.shard.entries == {} and srv.shard.fingerprint == ""
    # a stream addressed to shard 1 reaching shard 0: the caller's map is out of date
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Declare(declare_requests(smap.fingerprint, theirs, init, shard=1), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # the right keys are accepted
    assert declare(srv.stub, smap, init, shard=0).created == len(mine)


def test_concurrent_declarations_create_each_key_once_from_one_declarer(shard_server):
    srv = shard_server()
    smap = shard_map({f"p{i}": (64,) for i in range(8)})
    inits = [initial_values(smap, seed=s) for s in range(4)]
    calls = [Background(declare, srv.stub, smap, init) for init in inits]
    replies = [c.join() for c in calls]
    assert sum(r.created for r in replies) == 8
    assert all(r.created + r.existing == 8 for r in replies)
    got = values(srv.stub, smap.fingerprint)
    # all keys come from the same declarer: declarations are atomic
    winners = [i for i, init in enumerate(inits) if all(got[k].tobytes() == init[k].tobytes() for k in got)]
    assert len(winners) == 1


# -- through the scheduler -----------------------------------------------------------------
def _param_specs(shapes):
    return [scheduler_pb2.ParamSpec(name=n, dtype=tensor_pb2.DTYPE_FLOAT32, shape=s) for n, s in shapes.items()]


def test_declare_model_through_scheduler(cluster):
    c = cluster(JobSpec(num_servers=2))
    client = ShardClient(ClientConfig(scheduler=c.address))
    try:
        client.join()
        client.wait_for_servers()
        init = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones(5, np.float32)}
        smap = client.declare(init)
        # the same set again: the same map, the same fingerprint
        info = scheduler_stub(c.address).DeclareModel(scheduler_pb2.DeclareModelRequest(params=_param_specs(
            {"w": (4, 3), "b": (5,)})), timeout=TIMEOUT_S)
        assert info.shard_map.fingerprint == smap.fingerprint
        assert len(info.shard_map.keys) == 2 and {k.shard for k in info.shard_map.keys} == {0, 1}

        # a different parameter set is refused, and the job keeps its map
        for shapes in ({"w": (4, 3)}, {"w": (4, 3), "b": (6,)}, {"w": (4, 3), "b": (5,), "c": (1,)}):
            with pytest.raises(grpc.RpcError) as err:
                scheduler_stub(c.address).DeclareModel(scheduler_pb2.DeclareModelRequest(params=_param_specs(shapes)),
                                          timeout=TIMEOUT_S)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, shapes
        job = scheduler_stub(c.address).GetJob(scheduler_pb2.GetJobRequest(), timeout=TIMEOUT_S)
        assert job.shard_map.fingerprint == smap.fingerprint

        # train one step; a second declarer with other initial values keeps the trained ones
        flat = {k: v.reshape(-1).copy() for k, v in init.items()}
        client.pull(flat)
        client.push({"w": np.ones(12, np.float32), "b": np.ones(5, np.float32)})
        trained = {k: np.empty_like(v) for k, v in flat.items()}
        client.pull(trained)
        second = ShardClient(ClientConfig(scheduler=c.address))
        try:
            second.join()
            second.wait_for_servers()
            second.declare({"w": np.full((4, 3), 7.0, np.float32), "b": np.full(5, 7.0, np.float32)})
            again = {k: np.empty_like(v) for k, v in flat.items()}
            second.pull(again)
        finally:
            second.leave()
        for k in trained:
            assert again[k].tobytes() == trained[k].tobytes(), k
        np.testing.assert_array_equal(trained["b"], np.float32(1) - np.float32(0.1) * np.ones(5, np.float32))
    finally:
        client.leave()


def test_declare_model_with_invalid_params_is_invalid_argument(cluster):
    c = cluster(JobSpec())
    bad_sets = [
        [],
        [scheduler_pb2.ParamSpec(name="w", dtype=tensor_pb2.DTYPE_INT32, shape=[3])],
        [scheduler_pb2.ParamSpec(name="w#0", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3])],
        [scheduler_pb2.ParamSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-3])],
        _param_specs({"w": (3,)}) * 2,
    ]
    for params in bad_sets:
        with pytest.raises(grpc.RpcError) as err:
            scheduler_stub(c.address).DeclareModel(scheduler_pb2.DeclareModelRequest(params=params), timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, params
    job = scheduler_stub(c.address).GetJob(scheduler_pb2.GetJobRequest(), timeout=TIMEOUT_S)
    assert job.shard_map.fingerprint == ""  # nothing was fixed
