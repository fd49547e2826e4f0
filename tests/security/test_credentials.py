"""Acting as another member: its id and incarnation are public (`psctl status`), its credential
is not. A heartbeat, leave, rejoin, partition call or push made as an honest worker by anyone
else (a stranger, or a member of the job with its own valid credential) is refused with
UNAUTHENTICATED (reason BAD_CREDENTIAL), nothing changes, and the honest worker trains on.
Each of these calls was accepted before member credentials."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, scheduler_pb2 as spb

from rpc.helpers import snapshot, tensor_chunks

from .helpers import Attacker, error_info, membership, trains, worker

SHAPES = {"w": 64, "b": 8}


@pytest.fixture
def job(cluster):
    """A running job with an honest worker that trained a step, and an attacker who joined as
    a worker of its own (so it holds a valid credential, for itself only)."""
    # the attacker's own worker never heartbeats: a lease longer than any test keeps the
    # membership still unless an attack moves it
    c = cluster(JobSpec(num_servers=2, slice_bytes=1 << 30, heartbeat_timeout_s=300))
    honest = worker(c.address)
    honest.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    attacker = Attacker(c.address)
    own = attacker.stub.JoinWorker(spb.JoinWorkerRequest(name="mallory", worker_id=-1), timeout=30).lease
    trains(honest, SHAPES, attacker.stub)
    yield c, honest, attacker, own
    attacker.close()
    honest.leave()


def _bad_credential(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
    info = error_info(err)
    assert info is not None and info.reason == "BAD_CREDENTIAL", err.details()


@pytest.mark.parametrize("credential", ["none", "the attacker's own"])
def test_scheduler_calls_as_another_worker_are_refused(job, credential):
    _, honest, attacker, own = job
    me = honest.identity
    cred = b"" if credential == "none" else own.credential
    before = membership(attacker.stub)
    calls = [
        ("Heartbeat", spb.HeartbeatRequest(role=spb.ROLE_WORKER, member_id=me.worker_id, incarnation=me.incarnation,
                                           clock=me.clock, credential=cred)),
        ("Leave", spb.LeaveRequest(role=spb.ROLE_WORKER, member_id=me.worker_id, incarnation=me.incarnation,
                                   credential=cred)),
        ("JoinWorker", spb.JoinWorkerRequest(name="mallory", worker_id=me.worker_id, incarnation=me.incarnation,
                                             credential=cred)),
        ("AcquirePartition", spb.AcquirePartitionRequest(worker_id=me.worker_id, incarnation=me.incarnation,
                                                         num_partitions=4, max_epochs=1, credential=cred)),
        ("CompletePartition", spb.CompletePartitionRequest(worker_id=me.worker_id, incarnation=me.incarnation,
                                                           epoch=1, partition=0, credential=cred)),
    ]
    for method, request in calls:
        _bad_credential(attacker.refused(method, request))
    assert membership(attacker.stub) == before and honest.identity == me   # not evicted, not replaced
    trains(honest, SHAPES)


def test_a_server_cannot_be_dropped_by_a_stranger(job):
    c, honest, attacker, own = job
    before = membership(attacker.stub)
    s = before["servers"][0]
    err = attacker.refused("Leave", spb.LeaveRequest(role=spb.ROLE_SERVER, member_id=s[2], incarnation=s[3],
                                                     credential=own.credential))
    _bad_credential(err)
    assert membership(attacker.stub) == before
    trains(honest, SHAPES)


def test_a_push_as_another_worker_is_refused_and_changes_nothing(job):
    c, honest, attacker, own = job
    me = honest.identity
    srv = c.servers[0]
    ps = ps_pb2_grpc.ParameterServerStub(grpcutil.channel(srv.address))
    fp = honest.shard_map.fingerprint
    before = snapshot(ps, fp)
    for cred in (b"", own.credential):
        # step 2**62 would poison the honest worker's ledger (its real pushes acknowledged as duplicates)
        msgs = [ps_pb2.PushRequest(header=ps_pb2.PushHeader(
                    caller=ps_pb2.Caller(worker_id=me.worker_id, incarnation=me.incarnation, credential=cred),
                    shard=0, step=2**62, base_version=0, model_fingerprint=fp))]
        msgs += [ps_pb2.PushRequest(chunk=ch) for k in honest.shard_map.keys_of(0)
                 for ch in tensor_chunks(k.key, np.full(k.length, np.nan, np.float32))]
        with pytest.raises(grpc.RpcError) as err:
            ps.Push(iter(msgs), timeout=30)
        _bad_credential(err.value)
    assert snapshot(ps, fp) == before
    assert srv.shard.ledger[me.worker_id].last_step < 2**62   # the honest worker's ledger is its own
    trains(honest, SHAPES)
