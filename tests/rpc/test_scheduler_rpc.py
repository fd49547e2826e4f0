"""The Scheduler service over real gRPC: registration, joins, leases, leaves, watch streams."""
import queue
import threading
import time

import grpc
import pytest

from shardps.pscommon import credentials, grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import job_pb2, ps_pb2, ps_pb2_grpc, scheduler_pb2 as pb, scheduler_pb2_grpc, tensor_pb2
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess

from .helpers import TIMEOUT_S, poll

ALIVE, DEAD, LEFT = pb.MEMBER_STATE_ALIVE, pb.MEMBER_STATE_DEAD, pb.MEMBER_STATE_LEFT


class Sched:
    def __init__(self, job: JobSpec):
        self.proc = SchedulerProcess(SchedulerConfig(job=job))
        self.proc.start()
        self.channel = grpcutil.channel(self.proc.address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    def cred(self, member, incarnation, role=pb.ROLE_WORKER) -> bytes:
        """The member's credential, as its lease carried it (the test holds the job key)."""
        return credentials.issue(self.proc.core.member_key, "server" if role == pb.ROLE_SERVER else "worker",
                                 member, incarnation)

    def join(self, name="", worker_id=-1, incarnation=0):
        cred = self.cred(worker_id, incarnation) if worker_id > 0 else b""
        return self.stub.JoinWorker(pb.JoinWorkerRequest(name=name, worker_id=worker_id, incarnation=incarnation,
                                                         credential=cred), timeout=TIMEOUT_S)

    def heartbeat(self, member, incarnation, clock=0, role=pb.ROLE_WORKER):
        return self.stub.Heartbeat(pb.HeartbeatRequest(role=role, member_id=member, incarnation=incarnation,
                                                       clock=clock, credential=self.cred(member, incarnation, role)),
                                   timeout=TIMEOUT_S)

    def leave(self, member, incarnation, role=pb.ROLE_WORKER):
        return self.stub.Leave(pb.LeaveRequest(role=role, member_id=member, incarnation=incarnation,
                                               credential=self.cred(member, incarnation, role)), timeout=TIMEOUT_S)

    def status(self):
        return self.stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S)

    def workers(self):
        return {w.worker_id: w for w in self.status().workers}

    def close(self):
        self.channel.close()
        self.proc.drain()


@pytest.fixture
def sched():
    made = []

    def make(job: JobSpec | None = None):
        s = Sched(job or JobSpec())
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def code_of(fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value.code()


class Watch:
    """Reads a WatchMembership stream in a thread; views land in a queue."""

    def __init__(self, stub, after_view=0):
        self.views: queue.Queue = queue.Queue()
        self.stream = stub.WatchMembership(pb.WatchMembershipRequest(after_view=after_view), timeout=60)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for view in self.stream:
                self.views.put(view)
        except grpc.RpcError as err:
            self.views.put(err)

    def next_matching(self, predicate, timeout_s=20.0):
        """The first view satisfying predicate, within the deadline."""
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                pytest.fail("no matching membership view before the deadline")
            try:
                view = self.views.get(timeout=left)
            except queue.Empty:
                continue
            assert not isinstance(view, grpc.RpcError), view
            if predicate(view):
                return view

    def close(self):
        self.stream.cancel()
        self.thread.join(10)


def test_register_servers_and_get_job(sched):
    job = JobSpec(num_servers=2, mode="ssp", staleness=3)
    s = sched(job)
    r0 = s.stub.RegisterServer(pb.RegisterServerRequest(address="127.0.0.1:7001", shard=-1), timeout=TIMEOUT_S)
    r1 = s.stub.RegisterServer(pb.RegisterServerRequest(address="127.0.0.1:7002", shard=-1), timeout=TIMEOUT_S)
    assert (r0.shard, r1.shard) == (0, 1)
    assert r1.view == r0.view + 1
    assert r1.lease.incarnation > r0.lease.incarnation
    assert r0.lease.ttl_s == job.heartbeat_timeout_s
    assert JobSpec.from_proto(r0.job) == job
    # every shard has a server; bad requests are refused
    assert code_of(s.stub.RegisterServer, pb.RegisterServerRequest(address="127.0.0.1:7003", shard=-1),
                   timeout=TIMEOUT_S) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(s.stub.RegisterServer, pb.RegisterServerRequest(address="127.0.0.1:7003", shard=2),
                   timeout=TIMEOUT_S) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(s.stub.RegisterServer, pb.RegisterServerRequest(address="no-port", shard=0),
                   timeout=TIMEOUT_S) == grpc.StatusCode.INVALID_ARGUMENT

    info = s.stub.GetJob(pb.GetJobRequest(), timeout=TIMEOUT_S)
    assert [(x.shard, x.address, x.state) for x in info.servers] == [
        (0, "127.0.0.1:7001", ALIVE), (1, "127.0.0.1:7002", ALIVE)]
    assert info.job.mode == job_pb2.MODE_SSP and info.job.staleness == 3
    assert info.shard_map.fingerprint == ""

    # shard 0's server holds a live lease: nobody else gets the shard (tests/security)
    assert code_of(s.stub.RegisterServer, pb.RegisterServerRequest(address="127.0.0.1:7009", shard=0),
                   timeout=TIMEOUT_S) == grpc.StatusCode.FAILED_PRECONDITION
    # once it has left, shard 0 restarts elsewhere: same member id, new incarnation, old one stale
    s.leave(r0.lease.member_id, r0.lease.incarnation, role=pb.ROLE_SERVER)
    again = s.stub.RegisterServer(pb.RegisterServerRequest(address="127.0.0.1:7009", shard=0), timeout=TIMEOUT_S)
    assert again.lease.member_id == r0.lease.member_id and again.lease.incarnation > r1.lease.incarnation
    assert code_of(s.heartbeat, r0.lease.member_id, r0.lease.incarnation, role=pb.ROLE_SERVER) == \
        grpc.StatusCode.FAILED_PRECONDITION
    s.heartbeat(again.lease.member_id, again.lease.incarnation, role=pb.ROLE_SERVER)
    info = s.stub.GetJob(pb.GetJobRequest(), timeout=TIMEOUT_S)
    assert info.servers[0].address == "127.0.0.1:7009"

    # DeclareModel fixes the shard map; Status reports it
    params = [pb.ParamSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[10, 10]),
              pb.ParamSpec(name="b", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[10])]
    declared = s.stub.DeclareModel(pb.DeclareModelRequest(params=params), timeout=TIMEOUT_S)
    st = s.status()
    assert st.model_fingerprint == declared.shard_map.fingerprint != ""
    assert st.keys == 2 and len(st.servers) == 2 and st.uptime_s >= 0


def test_join_heartbeat_leave_and_status(sched):
    s = sched()
    a = s.join("host-a")
    b = s.join("host-b")
    assert a.lease.member_id != b.lease.member_id
    assert b.lease.incarnation > a.lease.incarnation and b.view == a.view + 1
    assert (a.start_clock, b.start_clock) == (0, 0)
    ida, idb = a.lease.member_id, b.lease.member_id

    # heartbeats carry clocks and do not move the view
    assert s.heartbeat(ida, a.lease.incarnation, clock=7).view == b.view
    s.heartbeat(idb, b.lease.incarnation, clock=4)
    ws = s.workers()
    assert {(w.name, w.clock, w.state) for w in ws.values()} == {("host-a", 7, ALIVE), ("host-b", 4, ALIVE)}
    assert all(w.lease_age_s >= 0 for w in ws.values())

    # a joiner starts at the slowest live clock
    c = s.join("host-c")
    assert c.start_clock == 4
    # leave: immediate, bumps the view; the old lease is no longer accepted
    left = s.leave(idb, b.lease.incarnation)
    assert left.view == c.view + 1
    assert s.workers()[idb].state == LEFT
    assert code_of(s.heartbeat, idb, b.lease.incarnation) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(s.leave, idb, b.lease.incarnation) == grpc.StatusCode.FAILED_PRECONDITION
    # rejoin under the same id: a new incarnation; the old one is stale
    back = s.join("host-b", worker_id=idb)
    assert back.lease.member_id == idb and back.lease.incarnation > c.lease.incarnation
    assert code_of(s.heartbeat, idb, b.lease.incarnation) == grpc.StatusCode.FAILED_PRECONDITION
    s.heartbeat(idb, back.lease.incarnation, clock=9)
    assert s.workers()[idb].state == ALIVE

    assert code_of(s.heartbeat, 999, 1) == grpc.StatusCode.NOT_FOUND
    assert code_of(s.join, "x", worker_id=999) == grpc.StatusCode.NOT_FOUND
    assert code_of(s.join, "x" * 300) == grpc.StatusCode.INVALID_ARGUMENT
    assert s.status().view == back.view


def test_heartbeat_from_stale_incarnation_is_failed_precondition(sched):
    s = sched()
    first = s.join("w")
    wid = first.lease.member_id
    second = s.join("w", worker_id=wid)
    assert second.lease.incarnation > first.lease.incarnation
    view = s.status().view
    assert code_of(s.heartbeat, wid, first.lease.incarnation) == grpc.StatusCode.FAILED_PRECONDITION
    assert s.heartbeat(wid, second.lease.incarnation).view == view
    assert s.status().view == view  # the refused heartbeat changed nothing


def test_watch_delivers_views_on_join_and_leave(sched):
    s = sched()
    watch = Watch(s.stub)
    try:
        first = watch.next_matching(lambda v: True)
        assert first.view == 0 and list(first.workers) == []
        joined = s.join("watcher-test")
        wid, inc = joined.lease.member_id, joined.lease.incarnation
        view = watch.next_matching(lambda v: v.view >= joined.view)
        assert view.view == joined.view
        assert [(w.worker_id, w.incarnation, w.state) for w in view.workers] == [(wid, inc, ALIVE)]
        left = s.leave(wid, inc)
        view = watch.next_matching(lambda v: v.view >= left.view)
        assert view.view == left.view
        assert [(w.worker_id, w.state) for w in view.workers] == [(wid, LEFT)]
    finally:
        watch.close()


def test_silent_worker_is_marked_dead_and_the_view_increases(sched):
    s = sched(JobSpec(heartbeat_timeout_s=1.5))
    live = s.join("keeps-beating")
    silent = s.join("goes-quiet")
    view = s.status().view
    watch = Watch(s.stub, after_view=view)
    stop = threading.Event()
    refused = []

    def beat():  # well inside the lease, even on a loaded machine
        while not stop.wait(0.1):
            try:
                s.heartbeat(live.lease.member_id, live.lease.incarnation, clock=1)
            except grpc.RpcError as err:
                refused.append(err)
                return
    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        def dead():
            st = s.status()
            ws = {w.worker_id: w for w in st.workers}
            return st.view > view and ws[silent.lease.member_id].state == DEAD and st
        st = poll(dead, timeout_s=30, what="the silent worker to be marked dead")
        assert st.view == view + 1
        ws = {w.worker_id: w for w in st.workers}
        assert ws[live.lease.member_id].state == ALIVE and ws[live.lease.member_id].clock == 1
        seen = watch.next_matching(lambda v: v.view > view)
        assert {w.worker_id: w.state for w in seen.workers} == {
            live.lease.member_id: ALIVE, silent.lease.member_id: DEAD}
        # the dead member must rejoin
        assert code_of(s.heartbeat, silent.lease.member_id, silent.lease.incarnation) == \
            grpc.StatusCode.FAILED_PRECONDITION
        back = s.join("goes-quiet", worker_id=silent.lease.member_id)
        assert back.view == view + 2 and back.start_clock == 1
    finally:
        stop.set()
        beater.join(10)
        watch.close()
    assert not refused, refused


def test_servers_follow_membership_through_the_watch(cluster):
    c = cluster(JobSpec(num_servers=1))
    srv = c.servers[0]
    stub = scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(c.address))
    ps = srv.shard
    joined = stub.JoinWorker(pb.JoinWorkerRequest(name="w", worker_id=-1), timeout=TIMEOUT_S)
    wid, inc = joined.lease.member_id, joined.lease.incarnation
    poll(lambda: ps.view >= joined.view, what="the shard to adopt the join")
    assert ps.gate.live == {wid: inc}
    left = stub.Leave(pb.LeaveRequest(role=pb.ROLE_WORKER, member_id=wid, incarnation=inc,
                                      credential=joined.lease.credential), timeout=TIMEOUT_S)
    poll(lambda: ps.view >= left.view, what="the shard to adopt the leave")
    assert ps.gate.live == {}
    # the shard reports the view it follows
    ps_stub = ps_pb2_grpc.ParameterServerStub(grpcutil.channel(srv.address))
    st = ps_stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=TIMEOUT_S)
    assert st.membership_view == left.view
