"""Attacks on membership by churn: a loop of joins, and joins and leaves without end.

Before: every JoinWorker was accepted (8,800 in two minutes cost the scheduler 96 s of CPU),
and dead and departed workers stayed in the membership forever, so every join, status and
state-file write grew with them.

Now (scheduler/limits.py): JoinWorker and RegisterServer share a token bucket per caller
host (not per connection), refused beyond it with RESOURCE_EXHAUSTED naming the limit; and
dead or departed workers are pruned after a retention period (or beyond a count), while
their ids stay refused as stale and are never given to anyone else.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import scheduler_pb2 as spb
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.scheduler.limits import MembershipLimits

from .helpers import TIMEOUT_S, Attacker, error_info, membership, poll, trains, worker

SHAPES = {"w": 64, "b": 8}


class Job:
    """A scheduler with the given limits, one server, and an honest worker that has trained."""

    def __init__(self, limits: MembershipLimits, state_dir: str | None = None):
        self.limits, self.state_dir = limits, state_dir
        self.scheduler = self._scheduler()
        self.server = ServerProcess(ServerConfig(scheduler=self.scheduler.address, shard_id=0, drain_grace_s=1.0))
        self.server.start()
        self.client = worker(self.scheduler.address)
        self.client.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
        self.attacker = Attacker(self.scheduler.address)
        trains(self.client, SHAPES)

    def _scheduler(self, listen: str = "127.0.0.1:0") -> SchedulerProcess:
        proc = SchedulerProcess(SchedulerConfig(job=JobSpec(), listen=listen, state_dir=self.state_dir,
                                                limits=self.limits, drain_grace_s=1.0))
        proc.start()
        return proc

    def restart_scheduler(self) -> None:
        """The scheduler again on the same port, from its state file."""
        port = self.scheduler.address.rpartition(":")[2]
        self.scheduler.drain()
        self.scheduler = self._scheduler(f"127.0.0.1:{port}")

    def close(self):
        self.attacker.close()
        try:
            self.client.leave()
        finally:
            self.server.drain()
            self.scheduler.drain()


@pytest.fixture
def job():
    made = []

    def make(limits: MembershipLimits, **kw) -> Job:
        j = Job(limits, **kw)
        made.append(j)
        return j
    yield make
    for j in made:
        j.close()


def members(attacker: Attacker) -> dict:
    """Who is in the job (helpers.membership without the workers' clocks, which the honest
    worker's heartbeats move on their own)."""
    m = membership(attacker.stub)
    m["workers"] = [w[:3] + w[4:] for w in m["workers"]]
    return m


def _join(attacker: Attacker, worker_id: int = -1, lease=None):
    """A join, or with the worker's last `lease` a rejoin under its id (only it may)."""
    proof = {"incarnation": lease.incarnation, "credential": lease.credential} if lease is not None else {}
    return attacker.stub.JoinWorker(spb.JoinWorkerRequest(name="churn", worker_id=worker_id, **proof),
                                    timeout=TIMEOUT_S)


def _first_refusal(attacker: Attacker, attempts: int) -> grpc.RpcError:
    """Join until refused; fails the test if `attempts` joins all go through."""
    for _ in range(attempts):
        try:
            _join(attacker)
        except grpc.RpcError as err:
            return err
    pytest.fail(f"{attempts} joins in a row were all accepted")


def test_a_join_flood_from_one_host_is_refused_and_changes_nothing(job):
    # one token a second: the refusal comes within the burst, however slow the machine
    j = job(MembershipLimits(join_rate=1.0, join_burst=10))
    err = _first_refusal(j.attacker, attempts=10 + 30)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "JoinWorker from 127.0.0.1" in err.details() and "--join-rate" in err.details(), err.details()
    info = error_info(err)
    assert info is not None and info.reason == "RESOURCE_EXHAUSTED"
    assert info.metadata["limit"] == "join_rate" and info.metadata["join_burst"] == "10"
    assert 0 < float(info.metadata["retry_after_s"]) <= 1.0

    before = members(j.attacker)
    # per host, not per connection: a new connection (another port) has no budget of its own
    other = Attacker(j.scheduler.address)
    try:
        again = other.refused("JoinWorker", spb.JoinWorkerRequest(name="churn", worker_id=-1))
        assert again.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # registrations share the bucket: refused before the shard is even looked at
        reg = other.refused("RegisterServer", spb.RegisterServerRequest(address="127.0.0.66:6666", shard=0))
        assert reg.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "RegisterServer" in reg.details()
    finally:
        other.close()
    assert members(j.attacker) == before

    # members go on: pulls, pushes, and heartbeats (the worker's own thread) that report them
    trains(j.client, SHAPES, j.attacker.stub)
    # and the bucket refills: a join goes through again (at most a second later)
    def joined():
        try:
            return _join(j.attacker)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return None
    lease = poll(joined, what="the join bucket to refill").lease
    assert lease.member_id > max(w[0] for w in before["workers"])


def _churn(attacker: Attacker, cycles: int) -> list:
    """Join and leave `cycles` times; the leases, in order."""
    leases = []
    for _ in range(cycles):
        lease = _join(attacker).lease
        attacker.stub.Leave(spb.LeaveRequest(role=spb.ROLE_WORKER, member_id=lease.member_id,
                                             incarnation=lease.incarnation, credential=lease.credential),
                            timeout=TIMEOUT_S)
        leases.append(lease)
    return leases


def _workers(attacker: Attacker) -> dict:
    return {w.worker_id: w for w in attacker.stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S).workers}


def _answers(attacker: Attacker) -> bool:
    try:
        attacker.stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return False
    return True


def _stale(attacker: Attacker, lease) -> None:
    """The pruned (id, incarnation) is refused with the typed stale error, heartbeat and leave."""
    for method, request in (
            ("Heartbeat", spb.HeartbeatRequest(role=spb.ROLE_WORKER, member_id=lease.member_id,
                                               incarnation=lease.incarnation, clock=1,
                                               credential=lease.credential)),
            ("Leave", spb.LeaveRequest(role=spb.ROLE_WORKER, member_id=lease.member_id,
                                       incarnation=lease.incarnation, credential=lease.credential))):
        err = attacker.refused(method, request)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (method, err)
        info = error_info(err)
        assert info is not None and info.reason == "STALE_INCARNATION", (method, err.details())


def test_departed_workers_are_pruned_and_their_ids_stay_refused(job, tmp_path):
    j = job(MembershipLimits(join_rate=0, dead_retention_s=0.0), state_dir=str(tmp_path))
    live = _workers(j.attacker)
    view = j.attacker.stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S).view
    leases = _churn(j.attacker, 40)

    # membership goes back to the live workers: it does not grow with every join
    poll(lambda: _workers(j.attacker).keys() == live.keys(), what="the departed workers to be pruned")
    # pruning changes no live set: the view is where the leaves left it
    assert j.attacker.stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S).view == view + 2 * len(leases)
    for lease in (leases[0], leases[-1]):
        _stale(j.attacker, lease)
    # ids are never given out again
    fresh = _join(j.attacker).lease
    assert fresh.member_id > max(lease.member_id for lease in leases)
    trains(j.client, SHAPES)

    # the state file holds the pruned membership; a restarted scheduler still refuses the
    # old ids and keeps counting past them
    j.restart_scheduler()
    poll(lambda: _answers(j.attacker), what="the restarted scheduler to answer")
    assert _workers(j.attacker).keys() == live.keys() | {fresh.member_id}
    _stale(j.attacker, leases[0])
    assert _join(j.attacker).lease.member_id > fresh.member_id
    trains(j.client, SHAPES)


def test_a_worker_pruned_while_away_rejoins_under_its_id(job):
    j = job(MembershipLimits(join_rate=0, dead_retention_s=0.0))
    (lease,) = _churn(j.attacker, 1)
    poll(lambda: lease.member_id not in _workers(j.attacker), what="the departed worker to be pruned")
    back = _join(j.attacker, worker_id=lease.member_id, lease=lease).lease
    assert back.member_id == lease.member_id and back.incarnation > lease.incarnation
    _stale(j.attacker, lease)   # its old incarnation stays stale
    # an id never issued is still unknown
    err = j.attacker.refused("JoinWorker", spb.JoinWorkerRequest(name="x", worker_id=back.member_id + 1000))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_dead_workers_beyond_the_count_are_pruned_oldest_first(job):
    j = job(MembershipLimits(join_rate=0, dead_retention_s=600.0, max_dead_workers=5))
    live = _workers(j.attacker)
    leases = _churn(j.attacker, 20)
    kept = {lease.member_id for lease in leases[-5:]}
    poll(lambda: _workers(j.attacker).keys() == live.keys() | kept, what="all but the newest 5 departed pruned")
    _stale(j.attacker, leases[0])
    trains(j.client, SHAPES)
