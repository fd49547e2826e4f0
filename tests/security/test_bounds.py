"""Attacks with values the caller controls: clocks beyond what JSON carries exactly, worker
names that are terminal escapes, declared models with impossible dtypes and shapes, ids that
were never issued. Each is refused at the scheduler's boundary with INVALID_ARGUMENT (or
NOT_FOUND) naming the value, nothing is stored, and the job goes on."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from shardps.pscommon.bounds import MAX_STEP_AHEAD
from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc
from shardps.pscommon.wire.v1 import scheduler_pb2 as spb
from shardps.pscommon.wire.v1 import tensor_pb2

from .helpers import Attacker, membership, trains, worker

SHAPES = {"w": 64, "b": 8}
F32 = tensor_pb2.DTYPE_FLOAT32
JSON_SAFE = 2**53 - 1


@pytest.fixture
def job(cluster):
    """A running job with one honest worker that has trained a step, and an attacker."""
    c = cluster(JobSpec(num_servers=2, slice_bytes=1 << 30))
    client = worker(c.address)
    client.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    attacker = Attacker(c.address)
    trains(client, SHAPES, attacker.stub)
    yield c, client, attacker
    attacker.close()
    client.leave()


def _worker_lease(attacker):
    """A worker of the attacker's own: clocks are only stored for workers."""
    return attacker.stub.JoinWorker(spb.JoinWorkerRequest(name="mallory", worker_id=-1), timeout=30).lease


@pytest.mark.parametrize("clock", [JSON_SAFE + 1, 2**63, 2**64 - 1])
def test_heartbeat_clock_beyond_json_is_refused_and_not_stored(job, clock):
    _, client, attacker = job
    lease = _worker_lease(attacker)
    before = membership(attacker.stub)
    err = attacker.refused("Heartbeat", spb.HeartbeatRequest(
        role=spb.ROLE_WORKER, member_id=lease.member_id, incarnation=lease.incarnation, clock=clock))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(clock) in err.details() and "clock" in err.details()
    assert membership(attacker.stub) == before
    # the largest exact value is still a clock
    attacker.stub.Heartbeat(spb.HeartbeatRequest(role=spb.ROLE_WORKER, member_id=lease.member_id,
                                                 incarnation=lease.incarnation, clock=JSON_SAFE,
                                                 credential=lease.credential), timeout=30)
    trains(client, SHAPES)


def test_leave_clock_beyond_json_is_refused_and_the_worker_stays(job):
    _, client, attacker = job
    lease = _worker_lease(attacker)
    before = membership(attacker.stub)
    err = attacker.refused("Leave", spb.LeaveRequest(
        role=spb.ROLE_WORKER, member_id=lease.member_id, incarnation=lease.incarnation, clock=2**64 - 1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(2**64 - 1) in err.details()
    assert membership(attacker.stub) == before   # still alive, clock unchanged
    trains(client, SHAPES)


@pytest.mark.parametrize("name", [
    "\x1b[2J\x1b[31mowned", "two\nlines", "nul\x00byte", "bell\x07", "tab\there", "del\x7f",
    "bidi\u202eoverride", "x" * 129])
def test_worker_name_must_be_printable_and_short(job, name):
    _, client, attacker = job
    before = membership(attacker.stub)
    err = attacker.refused("JoinWorker", spb.JoinWorkerRequest(name=name, worker_id=-1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in err.details()
    assert "\n" not in err.details() and "\x1b" not in err.details()
    assert membership(attacker.stub) == before
    # the boundary: 128 printable characters are a name
    attacker.stub.JoinWorker(spb.JoinWorkerRequest(name="ü" * 128, worker_id=-1), timeout=30)
    trains(client, SHAPES)


@pytest.mark.parametrize("worker_id", [999, 2**31 - 1])
def test_rejoin_as_an_id_never_issued_is_not_found(job, worker_id):
    _, client, attacker = job
    before = membership(attacker.stub)
    err = attacker.refused("JoinWorker", spb.JoinWorkerRequest(name="mallory", worker_id=worker_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert str(worker_id) in err.details()
    assert membership(attacker.stub) == before
    trains(client, SHAPES)


def test_rejoin_as_a_server_id_is_not_found(job):
    c, client, attacker = job
    server_id = c.servers[0].lease.member_id
    before = membership(attacker.stub)
    err = attacker.refused("JoinWorker", spb.JoinWorkerRequest(name="mallory", worker_id=server_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert membership(attacker.stub) == before
    trains(client, SHAPES)


def test_a_negative_worker_id_other_than_minus_one_is_invalid(job):
    _, client, attacker = job
    before = membership(attacker.stub)
    err = attacker.refused("JoinWorker", spb.JoinWorkerRequest(name="mallory", worker_id=-7))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "-7" in err.details()
    assert membership(attacker.stub) == before
    trains(client, SHAPES)


@pytest.mark.parametrize("address", ["\x1b[31m10.0.0.1:7100", "host:7100\n", "a b:7100", "h" * 300 + ":1"])
def test_server_address_must_be_printable_host_port(job, address):
    _, client, attacker = job
    before = membership(attacker.stub)
    err = attacker.refused("RegisterServer", spb.RegisterServerRequest(address=address, shard=0))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "address" in err.details()
    assert membership(attacker.stub) == before
    trains(client, SHAPES)


# -- DeclareModel ------------------------------------------------------------------------------
def _spec(name="w", dtype=F32, shape=(64,)):
    return spb.ParamSpec(name=name, dtype=dtype, shape=list(shape))


BAD_MODELS = {
    # an enum value no DType names: was INTERNAL (DType.Name raised ValueError)
    "unknown dtype": ([_spec(dtype=99)], ["'w'", "99"]),
    "negative dimension": ([_spec(shape=(8, -1))], ["'w'", "-1"]),
    # 0 elements, so it used to pass; a dimension this size is no model
    "absurd dimension": ([_spec(shape=(0, 2**62))], ["'w'", str(2**62)]),
    # 4 TiB of float32 in one dimension: over the per-dimension cap
    "dimension too large": ([_spec(shape=(2**40,))], ["'w'", str(2**40)]),
    # two parameters of 1 TiB each, every dimension within its cap: over the model's bytes
    "model too large": ([_spec(shape=(2**19, 2**19)), _spec(name="v", shape=(2**19, 2**19))],
                        ["'v'", "bytes"]),
    # 2**38 elements in dimensions each within the cap: over the per-parameter cap
    "parameter too large": ([_spec(shape=(2**20, 2**20))], ["'w'", "elements"]),
    "name not printable": ([_spec(name="w\x1b[2J")], ["name"]),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_declare_model_with_a_bad_parameter_is_invalid_argument(cluster, case):
    params, facts = BAD_MODELS[case]
    c = cluster(JobSpec(num_servers=2, slice_bytes=1 << 30))
    attacker = Attacker(c.address)
    try:
        before = membership(attacker.stub)
        err = attacker.refused("DeclareModel", spb.DeclareModelRequest(params=params))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        for fact in facts:
            assert fact in err.details(), (fact, err.details())
        assert membership(attacker.stub) == before   # no shard map was fixed
        # the job still takes its real model and trains
        client = worker(c.address)
        client.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
        trains(client, SHAPES)
        client.leave()
    finally:
        attacker.close()


def test_declare_model_with_astronomical_shapes_is_refused_before_any_work(job):
    """Dimensions whose product is 2**496 elements: the shard map is never sliced (slicing it
    would not finish), the declared model stays."""
    _, client, attacker = job
    before = membership(attacker.stub)
    err = attacker.refused("DeclareModel", spb.DeclareModelRequest(
        params=[_spec(shape=(2**62,) * 8)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'w'" in err.details()
    assert membership(attacker.stub) == before
    trains(client, SHAPES)


@pytest.mark.parametrize("call", ["push", "pull", "settle", "settled"])
def test_a_step_beyond_json_at_a_shard_is_refused_and_changes_nothing(job, call):
    """Even made as the member itself (its own credential), a step no checkpoint could carry
    exactly is refused at the shard's boundary before the gate or the ledger see it."""
    c, client, _ = job
    shard = c.servers[0].shard
    before = (dict(shard.ledger), dict(shard.gate.clocks), shard.version)
    me = ps_pb2.Caller(worker_id=client.worker_id, incarnation=client.incarnation,
                       credential=client.identity.credential)
    fp, big = client.shard_map.fingerprint, JSON_SAFE + 1
    with grpc.insecure_channel(c.servers[0].address) as ch:
        stub = ps_pb2_grpc.ParameterServerStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            if call == "push":
                stub.PushBatch(ps_pb2.PushBatchRequest(header=ps_pb2.PushHeader(
                    caller=me, shard=0, step=big, model_fingerprint=fp)), timeout=30)
            elif call == "pull":
                stub.PullBatch(ps_pb2.PullRequest(caller=me, shard=0, step=big, model_fingerprint=fp), timeout=30)
            elif call == "settle":
                stub.SettleStep(ps_pb2.SettleRequest(caller=me, shard=0, step=big, model_fingerprint=fp), timeout=30)
            else:
                me.settled.step = big
                stub.PullBatch(ps_pb2.PullRequest(caller=me, shard=0, step=1, model_fingerprint=fp), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(big) in err.value.details() and "clock" in err.value.details()
    assert (dict(shard.ledger), dict(shard.gate.clocks), shard.version) == before
    trains(client, SHAPES)


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_a_push_far_past_the_members_own_clock_is_refused(cluster, mode):
    """The member itself, with its own credential, names a step far past its clock: accepted,
    it would make each of its later pushes a "duplicate" (silently dropped) and move the tables'
    idle clock past every row. Refused before the gate or the ledger; the slack is allowed."""
    c = cluster(JobSpec(mode=mode, staleness=2 if mode == "ssp" else 0, num_servers=1))
    client = worker(c.address)
    client.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    trains(client, SHAPES)
    shard = c.servers[0].shard
    clock = shard.gate.clock_of(client.worker_id)
    before = (dict(shard.ledger), dict(shard.gate.clocks), shard.version)
    me = ps_pb2.Caller(worker_id=client.worker_id, incarnation=client.incarnation,
                       credential=client.identity.credential)
    far = clock + MAX_STEP_AHEAD + 1
    with grpc.insecure_channel(c.servers[0].address) as ch:
        stub = ps_pb2_grpc.ParameterServerStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.PushBatch(ps_pb2.PushBatchRequest(header=ps_pb2.PushHeader(
                caller=me, shard=0, step=far, model_fingerprint=client.shard_map.fingerprint)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"step {far}" in err.value.details() and f"clock {clock}" in err.value.details()
    assert (dict(shard.ledger), dict(shard.gate.clocks), shard.version) == before
    trains(client, SHAPES)
    client.leave()
