"""Restarts with persisted state, over real gRPC and real files in tmp_path.

The scheduler: its state file under --state-dir brings back membership (epoch, members,
incarnations), the shard map and data progress; a new process on the same address lets
live members carry on with their old incarnations, and reaps the ones that stay silent.

A server: checkpoints under --checkpoint-dir bring back values, versions and the dedupe
ledger; it re-registers under a new incarnation and a worker that was pushing re-resolves
its address and carries on. A checkpoint of another job spec is refused.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import threading

import grpc
import numpy as np
import pytest

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import FailedPrecondition, Unavailable
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, scheduler_pb2 as pb, scheduler_pb2_grpc, tensor_pb2
from shardps.psserver.checkpoint import CheckpointStore
from shardps.psserver import daemon
from shardps.psserver.daemon import ServerConfig, ServerProcess, run
from shardps.psserver.metrics import ShardCollector
from shardps.scheduler.core import STATE_FILE
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.worker.client import ClientConfig, ShardClient

from .helpers import TIMEOUT_S, Background, poll

ALIVE, DEAD, LEFT = pb.MEMBER_STATE_ALIVE, pb.MEMBER_STATE_DEAD, pb.MEMBER_STATE_LEFT
F32 = tensor_pb2.DTYPE_FLOAT32


# -- scheduler restarts ----------------------------------------------------------------------
class Heartbeats:
    """Keeps chosen members' leases alive from a thread, as their processes would, through a
    scheduler restart (a fresh channel after every failure, so reconnecting is immediate)."""

    def __init__(self, address: str, interval_s: float = 0.25):
        self.address = address
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.members: dict[int, tuple[int, int]] = {}   # member id -> (role, incarnation)
        self.failures: list[grpc.StatusCode] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="test-heartbeats")
        self.thread.start()

    def keep(self, role: int, lease: pb.Lease) -> None:
        with self.lock:
            self.members[lease.member_id] = (role, lease.incarnation, lease.credential)

    def drop(self, member_id: int) -> None:
        with self.lock:
            self.members.pop(member_id, None)

    def _run(self) -> None:
        channel = grpcutil.channel(self.address)
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        while not self.stop.wait(self.interval_s):
            with self.lock:
                members = list(self.members.items())
            for member_id, (role, incarnation, credential) in members:
                try:
                    stub.Heartbeat(pb.HeartbeatRequest(role=role, member_id=member_id, incarnation=incarnation,
                                                       clock=0, credential=credential), timeout=2.0)
                except grpc.RpcError as err:
                    with self.lock:
                        self.failures.append(err.code())
                    channel.close()
                    channel = grpcutil.channel(self.address)
                    stub = scheduler_pb2_grpc.SchedulerStub(channel)
                    break
        channel.close()

    def refused(self) -> list[grpc.StatusCode]:
        """Failures other than the scheduler being away."""
        with self.lock:
            return [c for c in self.failures
                    if c not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(TIMEOUT_S)


class Client:
    """A channel to a scheduler address, closed by the test's cleanup."""

    def __init__(self, address: str):
        self.channel = grpcutil.channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    def status(self) -> pb.StatusReply:
        return self.stub.Status(pb.StatusRequest(), timeout=TIMEOUT_S, wait_for_ready=True)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def closing():
    """Collects things with close()/drain() and closes them, newest first."""
    things = []
    yield things.append
    for t in reversed(things):
        (getattr(t, "drain", None) or t.close)()


def _members(status: pb.StatusReply) -> dict:
    """Everything about each member that must survive a restart (lease ages excluded)."""
    return {
        "workers": {w.worker_id: (w.incarnation, w.state, w.name) for w in status.workers},
        "servers": {s.member_id: (s.shard, s.address, s.incarnation, s.state) for s in status.servers},
    }


def _data(progress: pb.DataProgress) -> tuple:
    return (progress.epoch, progress.max_epochs, progress.partitions, progress.done, progress.assigned,
            progress.queued, progress.finished,
            {r.epoch: dict(r.completed_by) for r in progress.history})


def _declare(stub) -> pb.JobInfo:
    return stub.DeclareModel(pb.DeclareModelRequest(params=[
        pb.ParamSpec(name="w", dtype=F32, shape=[300, 200]), pb.ParamSpec(name="b", dtype=F32, shape=[200])]),
        timeout=TIMEOUT_S)


def _acquire(stub, member, partitions=2, epochs=3) -> pb.AcquirePartitionReply:
    return stub.AcquirePartition(pb.AcquirePartitionRequest(
        worker_id=member.member_id, incarnation=member.incarnation, num_partitions=partitions,
        max_epochs=epochs, credential=member.credential), timeout=TIMEOUT_S)


def _complete(stub, member, epoch, partition) -> pb.CompletePartitionReply:
    return stub.CompletePartition(pb.CompletePartitionRequest(
        worker_id=member.member_id, incarnation=member.incarnation, epoch=epoch, partition=partition,
        credential=member.credential), timeout=TIMEOUT_S)


def test_scheduler_restart_restores_state_and_members_carry_on(tmp_path, closing):
    job = JobSpec(num_servers=2, heartbeat_timeout_s=5.0, slice_bytes=64 << 10)
    state_dir = str(tmp_path / "scheduler")
    first = SchedulerProcess(SchedulerConfig(job=job, state_dir=state_dir))
    first.start()
    closing(first)
    address = first.address
    port = int(address.rsplit(":", 1)[1])
    beats = Heartbeats(address)
    closing(beats)
    c1 = Client(address)
    closing(c1)

    servers = [c1.stub.RegisterServer(pb.RegisterServerRequest(address=f"127.0.0.1:{7100 + s}", shard=s),
                                      timeout=TIMEOUT_S).lease for s in range(2)]
    workers = [c1.stub.JoinWorker(pb.JoinWorkerRequest(name=f"w{i}", worker_id=-1), timeout=TIMEOUT_S).lease
               for i in range(3)]
    for lease in servers:
        beats.keep(pb.ROLE_SERVER, lease)
    for lease in workers:
        beats.keep(pb.ROLE_WORKER, lease)
    a, b, gone = workers
    beats.drop(gone.member_id)
    c1.stub.Leave(pb.LeaveRequest(role=pb.ROLE_WORKER, member_id=gone.member_id, incarnation=gone.incarnation,
                                  credential=gone.credential),
                  timeout=TIMEOUT_S)
    info = _declare(c1.stub)
    assert info.shard_map.fingerprint and len(info.shard_map.keys) > 2

    # data: epoch 0 finished by a and b; in epoch 1 each holds one partition
    for w in (a, b):
        r = _acquire(c1.stub, w)
        assert r.status == pb.ASSIGNMENT_STATUS_ASSIGNED
        _complete(c1.stub, w, r.epoch, r.partition)
    held = {w.member_id: _acquire(c1.stub, w) for w in (a, b)}
    assert {r.epoch for r in held.values()} == {1}
    assert {r.partition for r in held.values()} == {0, 1}

    before = c1.status()
    assert before.data.epoch == 1 and before.data.assigned == 2 and len(before.data.history) == 1
    job_before = c1.stub.GetJob(pb.GetJobRequest(), timeout=TIMEOUT_S)
    assert (tmp_path / "scheduler" / STATE_FILE).is_file()

    # the scheduler goes away (no member leaves) and a new process takes over the same address
    first.drain()
    second = SchedulerProcess(SchedulerConfig(job=job, listen=f"127.0.0.1:{port}", state_dir=state_dir))
    second.start()
    closing(second)
    assert second.address == address
    c2 = Client(address)
    closing(c2)

    after = c2.status()
    assert after.view == before.view
    assert _members(after) == _members(before)
    assert after.model_fingerprint == before.model_fingerprint and after.keys == before.keys
    assert _data(after.data) == _data(before.data)
    job_after = c2.stub.GetJob(pb.GetJobRequest(), timeout=TIMEOUT_S)
    assert job_after.shard_map == job_before.shard_map and job_after.job == job_before.job
    # the same model declared again is still a no-op; another one is still refused
    assert _declare(c2.stub).shard_map.fingerprint == info.shard_map.fingerprint
    with pytest.raises(grpc.RpcError) as err:
        c2.stub.DeclareModel(pb.DeclareModelRequest(params=[pb.ParamSpec(name="w", dtype=F32, shape=[3])]),
                             timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # live members carry on with their old incarnations
    # (with the credentials c1 issued: the job key is kept in the state dir)
    reply = c2.stub.Heartbeat(pb.HeartbeatRequest(role=pb.ROLE_WORKER, member_id=a.member_id,
                                                  incarnation=a.incarnation, clock=3, credential=a.credential),
                              timeout=TIMEOUT_S)
    assert reply.view == before.view
    again = _acquire(c2.stub, a)                   # a retried acquire: the same assignment as before
    assert (again.status, again.epoch, again.partition) == (pb.ASSIGNMENT_STATUS_ASSIGNED, 1,
                                                            held[a.member_id].partition)
    done = _complete(c2.stub, a, 1, held[a.member_id].partition).data
    assert (done.epoch, done.done, done.assigned) == (1, 1, 1)
    # a newcomer gets a fresh id and an incarnation above every one handed out before
    newcomer = c2.stub.JoinWorker(pb.JoinWorkerRequest(name="late"), timeout=TIMEOUT_S).lease
    assert newcomer.member_id > max(w.member_id for w in workers + servers)
    assert newcomer.incarnation > max(w.incarnation for w in workers + servers)
    beats.keep(pb.ROLE_WORKER, newcomer)

    # b falls silent: it is reaped after the timeout and its partition goes back to the queue
    view = c2.status().view
    beats.drop(b.member_id)
    poll(lambda: {w.worker_id: w.state for w in c2.status().workers}[b.member_id] == DEAD,
         timeout_s=90, what="the silent worker to be reaped")
    final = c2.status()
    assert final.view == view + 1
    states = {w.worker_id: w.state for w in final.workers}
    assert states == {a.member_id: ALIVE, b.member_id: DEAD, gone.member_id: LEFT, newcomer.member_id: ALIVE}
    assert all(s.state == ALIVE for s in final.servers)          # their heartbeats kept them
    assert (final.data.epoch, final.data.done, final.data.assigned, final.data.queued) == (1, 1, 0, 1)
    with pytest.raises(grpc.RpcError) as err:
        c2.stub.Heartbeat(pb.HeartbeatRequest(role=pb.ROLE_WORKER, member_id=b.member_id,
                                              incarnation=b.incarnation, credential=b.credential), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    released = _acquire(c2.stub, newcomer)
    assert (released.status, released.partition) == (pb.ASSIGNMENT_STATUS_ASSIGNED, held[b.member_id].partition)
    assert beats.refused() == []   # only "scheduler away" failures, never a refused lease


def test_scheduler_restart_keeps_the_saved_job_spec(tmp_path, closing):
    state_dir = str(tmp_path / "scheduler")
    saved = JobSpec(mode="ssp", staleness=2, optimizer=OptimizerConfig(kind="adam", lr=0.003))
    first = SchedulerProcess(SchedulerConfig(job=saved, state_dir=state_dir))
    first.start()
    c = Client(first.address)
    closing(c)
    c.stub.JoinWorker(pb.JoinWorkerRequest(name="w"), timeout=TIMEOUT_S)
    first.drain()
    second = SchedulerProcess(SchedulerConfig(job=JobSpec(mode="async"), state_dir=state_dir))
    second.start()
    closing(second)
    assert second.core.job == saved
    with grpcutil.channel(second.address) as ch:
        job = scheduler_pb2_grpc.SchedulerStub(ch).GetJob(pb.GetJobRequest(), timeout=TIMEOUT_S).job
    assert JobSpec.from_proto(job) == saved


def test_scheduler_refuses_an_unreadable_state_file(tmp_path):
    state_dir = tmp_path / "scheduler"
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_text('{"job": {"mode": "MODE_ASY')
    with pytest.raises(FailedPrecondition, match="unreadable"):
        SchedulerProcess(SchedulerConfig(job=JobSpec(), state_dir=str(state_dir)))


# -- server restarts -------------------------------------------------------------------------
SHAPES = {"w": (32, 16), "b": (16,)}
JOB = JobSpec(mode="async", optimizer=OptimizerConfig(kind="adam", lr=0.01), heartbeat_timeout_s=5.0)


def _grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(int(np.prod(s))).astype(np.float32) for n, s in SHAPES.items()}


def _shard_state(proc: ServerProcess) -> dict:
    s = proc.shard
    with s.cond:
        return {"values": {k: e.value.tobytes() for k, e in s.entries.items()},
                "optimizer": {k: {n: a.tobytes() for n, a in e.state.items()} for k, e in s.entries.items()},
                "versions": {k: e.version for k, e in s.entries.items()},
                "shard_version": s.version, "ledger": dict(s.ledger), "fingerprint": s.fingerprint}


class ServerCluster:
    """A scheduler, one checkpointing server for shard 0, and a worker's ShardClient."""

    def __init__(self, tmp_path, job: JobSpec = JOB, checkpoint_every_s: float = 3600):
        self.job = job
        self.checkpoint_every_s = checkpoint_every_s
        self.ckpt_dir = str(tmp_path / "ckpt")
        self.scheduler = SchedulerProcess(SchedulerConfig(job=job))
        self.scheduler.start()
        self.servers = [self.start_server()]
        self.client = ShardClient(ClientConfig(scheduler=self.scheduler.address, name="w",
                                               retry_deadline_s=TIMEOUT_S * 2, connect_timeout_s=TIMEOUT_S))
        self.client.join()
        self.client.wait_for_servers()
        rng = np.random.default_rng(0)
        self.client.declare({n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()})
        self.channels = []
        self.closed = False

    def start_server(self) -> ServerProcess:
        proc = ServerProcess(ServerConfig(scheduler=self.scheduler.address, shard_id=0,
                                          checkpoint_dir=self.ckpt_dir,
                                          checkpoint_every_s=self.checkpoint_every_s))
        proc.start()
        return proc

    def stub(self, proc: ServerProcess) -> ps_pb2_grpc.ParameterServerStub:
        ch = grpcutil.channel(proc.address)
        self.channels.append(ch)
        return ps_pb2_grpc.ParameterServerStub(ch)

    def step(self, seed: int):
        return self.client.push(_grads(seed))

    def server_member(self) -> pb.ServerInfo:
        with grpcutil.channel(self.scheduler.address) as ch:
            info = scheduler_pb2_grpc.SchedulerStub(ch).GetJob(pb.GetJobRequest(), timeout=TIMEOUT_S)
        return {s.shard: s for s in info.servers}[0]

    def close(self):
        if self.closed:
            return
        self.closed = True
        for ch in self.channels:
            ch.close()
        self.client.leave()
        for proc in self.servers:
            if not proc.stop.is_set():
                proc.drain()
        self.scheduler.drain()


def _crash(proc: ServerProcess) -> None:
    """Stop a server as kill -9 would, as far as its peers can tell: no final checkpoint, no leave."""
    proc.stop.set()
    proc.grpc_server.stop(0).wait()
    proc.telemetry.stop()


def _unavailable_retries(caplog) -> int:
    return sum(1 for r in caplog.records if r.name == "shardps.pscommon.grpcutil" and r.args
               and isinstance(r.args[0], Unavailable))


def test_server_restart_from_its_checkpoint_and_the_worker_carries_on(tmp_path, closing, caplog):
    caplog.set_level(logging.DEBUG, logger="shardps.pscommon.grpcutil")
    c = ServerCluster(tmp_path)
    closing(c)
    old = c.servers[0]
    for step in range(3):
        c.step(step)
    reply = c.stub(old).Checkpoint(ps_pb2.CheckpointRequest(), timeout=TIMEOUT_S)
    assert reply.shard == 0 and reply.shard_version == 3 and reply.path.endswith("ckpt-00000001.json")
    for step in range(3, 5):
        c.step(step)
    state = _shard_state(old)
    assert state["shard_version"] == 5 and state["ledger"][c.client.worker_id].last_step == 4
    old_member = c.server_member()
    assert (old_member.member_id, old_member.incarnation) == (old.lease.member_id, old.lease.incarnation)

    old.drain()                                   # the final checkpoint holds every applied push
    store = CheckpointStore(c.ckpt_dir, 0)
    final = store.latest()
    assert final.shard_version == 5 and final.versions == state["versions"]
    assert c.server_member().state == LEFT

    # the worker pushes its next step while the shard is down: it retries on UNAVAILABLE ...
    pushing = Background(c.step, 5)
    poll(lambda: _unavailable_retries(caplog) > 0, timeout_s=60, what="the push to be retried on UNAVAILABLE")
    assert not pushing.done.is_set()
    # ... until a new process for the shard restores the checkpoint and registers again
    new = c.start_server()
    c.servers.append(new)
    assert new.address != old.address
    assert new.lease.member_id == old.lease.member_id and new.lease.incarnation > old.lease.incarnation
    replies = pushing.join(TIMEOUT_S * 3)
    assert len(replies) == 1 and not replies[0].duplicate and replies[0].shard_version == 6
    restored = _shard_state(new)
    assert restored["shard_version"] == 6 and set(restored["versions"].values()) == {6}
    assert restored["ledger"][c.client.worker_id].last_step == 5
    member = c.server_member()
    assert (member.address, member.incarnation, member.state) == (new.address, new.lease.incarnation, ALIVE)
    # the client now talks to the new address; the next steps need no retry
    retries = _unavailable_retries(caplog)
    c.step(6)
    assert _unavailable_retries(caplog) == retries
    assert new.shard.version == 7


def test_a_drained_server_restarts_with_exactly_its_state(tmp_path, closing, caplog):
    caplog.set_level(logging.DEBUG, logger="shardps.pscommon.grpcutil")
    c = ServerCluster(tmp_path)
    closing(c)
    old = c.servers[0]
    for step in range(4):
        c.step(step)
    state = _shard_state(old)
    old.drain()
    new = c.start_server()
    c.servers.append(new)
    assert _shard_state(new) == state        # values, adam state, versions, ledger, model
    # a retried push of the last step (its reply lost in the restart) is a duplicate
    fp = c.client.shard_map.fingerprint
    stub = c.stub(new)
    header = ps_pb2.PushRequest(header=ps_pb2.PushHeader(
        caller=ps_pb2.Caller(worker_id=c.client.worker_id, incarnation=c.client.incarnation,
                             credential=c.client.identity.credential),
        shard=0, step=3, base_version=3, model_fingerprint=fp))
    dup = stub.Push(iter([header]), timeout=TIMEOUT_S)
    assert dup.duplicate and dup.shard_version == 4
    # the worker's next step reaches the new process after re-resolving its address
    replies = c.step(4)
    assert not replies[0].duplicate and replies[0].shard_version == 5
    assert _unavailable_retries(caplog) >= 1
    status = stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=TIMEOUT_S)
    assert status.shard_version == 5 and status.checkpoint_version == 4


def test_a_crashed_server_loses_at_most_what_came_after_its_last_checkpoint(tmp_path, closing):
    c = ServerCluster(tmp_path)
    closing(c)
    old = c.servers[0]
    for step in range(3):
        c.step(step)
    c.stub(old).Checkpoint(ps_pb2.CheckpointRequest(), timeout=TIMEOUT_S)
    at_checkpoint = _shard_state(old)
    for step in range(3, 5):
        c.step(step)
    _crash(old)                                   # no final checkpoint, no leave
    new = c.start_server()
    c.servers.append(new)
    assert new.lease.incarnation > old.lease.incarnation
    restored = _shard_state(new)
    assert restored == at_checkpoint and restored["shard_version"] == 3
    # the worker's next step (its clock is 5) is new to the restored ledger: applied
    replies = c.step(5)
    assert not replies[0].duplicate and replies[0].shard_version == 4
    assert new.shard.ledger[c.client.worker_id].last_step == 5


def test_the_checkpoint_timer_writes_what_changed(tmp_path, closing):
    c = ServerCluster(tmp_path, checkpoint_every_s=0.2)
    closing(c)
    store = CheckpointStore(c.ckpt_dir, 0)
    for step in range(3):
        c.step(step)
    snap = poll(lambda: (lambda s: s if s and s.shard_version == 3 else None)(store.latest()),
                what="a timed checkpoint at version 3")
    assert snap.ledger == {str(c.client.worker_id): [c.client.incarnation, 2]}
    c.step(3)
    poll(lambda: store.latest().shard_version == 4, what="a timed checkpoint at version 4")
    status = c.stub(c.servers[0]).ShardStatus(ps_pb2.ShardStatusRequest(), timeout=TIMEOUT_S)
    assert status.checkpoint_version == 4 and status.checkpoint_age_s >= 0


def test_a_checkpoint_of_another_job_spec_is_refused(tmp_path, closing):
    c = ServerCluster(tmp_path)
    closing(c)
    for step in range(2):
        c.step(step)
    c.close()                                      # drains: a final checkpoint of this job
    files = sorted(p.name for p in (tmp_path / "ckpt" / "shard-0").iterdir())
    assert "ckpt-00000001.json" in files

    other = JobSpec(mode="async", optimizer=OptimizerConfig(kind="adam", lr=0.5), heartbeat_timeout_s=5.0)
    sched = SchedulerProcess(SchedulerConfig(job=other))
    sched.start()
    closing(sched)
    proc = ServerProcess(ServerConfig(scheduler=sched.address, shard_id=0, checkpoint_dir=str(tmp_path / "ckpt"),
                                      checkpoint_every_s=3600))
    try:
        with pytest.raises(FailedPrecondition) as err:
            proc.start()
    finally:
        proc.stop.set()
        proc.grpc_server.stop(0).wait()
    message = str(err.value)
    assert "another job spec" in message and "\n" not in message
    assert str(tmp_path / "ckpt" / "shard-0" / "ckpt-00000001.json") in message
    assert "optimizer.lr: checkpoint 0.01, job 0.5" in message
    # nothing was served from it and the checkpoint is left as it was
    assert sorted(p.name for p in (tmp_path / "ckpt" / "shard-0").iterdir()) == files


# -- checkpoints that never stop, stall or lie ---------------------------------------------------
def _break_directory(path) -> None:
    """The checkpoint folder is replaced by a file: every write into it fails with ENOTDIR, a
    real filesystem error (root ignores permission bits, so chmod would not do)."""
    shutil.rmtree(path)
    path.write_text("not a directory")


def _mend_directory(path) -> None:
    path.unlink()
    path.mkdir()


def test_a_failing_disk_never_stops_the_checkpoint_timer(tmp_path, closing, caplog):
    caplog.set_level(logging.INFO, logger="shardps")
    c = ServerCluster(tmp_path, checkpoint_every_s=0.2)
    closing(c)
    proc = c.servers[0]
    store = CheckpointStore(c.ckpt_dir, 0)
    c.step(0)
    poll(lambda: (store.latest() or None) and store.latest().shard_version == 1, what="a first checkpoint")
    _break_directory(store.dir)
    c.step(1)
    # every interval tries again, fails, says why and counts it; the shard keeps serving
    poll(lambda: proc.checkpointer.failures >= 3, what="three failed checkpoint attempts")
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and "checkpoint" in r.getMessage() and "Not a directory [ENOTDIR]" in r.getMessage()]
    assert len(failures) >= 3 and all(str(store.dir) in m for m in failures)
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("shardps"))
    c.step(2)
    assert proc.shard.version == 3
    family = {s.name: s.value for f in ShardCollector(proc.shard, proc.checkpointer).collect() for s in f.samples}
    assert family["shardps_server_checkpoint_failures_total"] >= 3
    # the disk comes back: the next interval writes what was missed
    _mend_directory(store.dir)
    snap = poll(lambda: (lambda s: s if s and s.shard_version == 3 else None)(store.latest()),
                what="a checkpoint at version 3 once the folder is back")
    assert snap.ledger == {str(c.client.worker_id): [c.client.incarnation, 2]}


def test_a_drain_without_its_final_checkpoint_still_leaves_and_exits_1(tmp_path, closing, caplog):
    caplog.set_level(logging.INFO, logger="shardps")
    sched = SchedulerProcess(SchedulerConfig(job=JOB))
    sched.start()
    closing(sched)
    client = Client(sched.address)
    closing(client)
    ready, stop = tmp_path / "server.addr", threading.Event()
    cfg = ServerConfig(scheduler=sched.address, shard_id=0, ready_file=str(ready),
                       checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=3600, drain_grace_s=1.0)
    running = Background(run, cfg, stop)
    try:
        poll(ready.exists, what="the server to be ready")
        assert [s.state for s in client.status().servers] == [ALIVE]
        _break_directory(tmp_path / "ckpt" / "shard-0")
    finally:
        stop.set()
    assert running.join(TIMEOUT_S) == daemon.EXIT_CHECKPOINT_FAILED == 1
    assert [s.state for s in client.status().servers] == [LEFT]
    lines = [r for r in caplog.records if "final checkpoint" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR and not lines[0].exc_info
    assert "Not a directory [ENOTDIR]" in lines[0].getMessage() and "\n" not in lines[0].getMessage()


def _unreadable_checkpoints(shard_dir) -> None:
    shard_dir.mkdir(parents=True)
    (shard_dir / "ckpt-00000001.json").write_text('{"format": "shardps-shard-checkp')
    (shard_dir / "ckpt-00000002.json").write_text('{"format": "shardps-shard-checkpoint/1", "extra": 1}')


def test_a_directory_of_unreadable_checkpoints_refuses_to_start_unless_told(tmp_path, closing, caplog):
    sched = SchedulerProcess(SchedulerConfig(job=JOB))
    sched.start()
    closing(sched)
    client = Client(sched.address)
    closing(client)
    shard_dir = tmp_path / "ckpt" / "shard-0"
    _unreadable_checkpoints(shard_dir)
    cfg = ServerConfig(scheduler=sched.address, shard_id=0, checkpoint_dir=str(tmp_path / "ckpt"),
                       checkpoint_every_s=3600)
    stop = threading.Event()
    refused = Background(run, cfg, stop)
    try:
        with pytest.raises(FailedPrecondition) as err:
            refused.join(TIMEOUT_S)
    finally:
        stop.set()
    message = str(err.value)
    assert "\n" not in message and str(shard_dir) in message
    assert re.search(r"ckpt-00000002\.json: .+ckpt-00000001\.json: unreadable", message), message
    assert "--start-empty-if-unreadable" in message
    # it registered before it looked at the folder: it leaves rather than hold the shard dead
    assert [s.state for s in client.status().servers] == [LEFT]
    assert sorted(p.name for p in shard_dir.iterdir()) == ["ckpt-00000001.json", "ckpt-00000002.json"]

    caplog.set_level(logging.WARNING, logger="shardps")
    proc = ServerProcess(dataclasses.replace(cfg, start_empty_if_unreadable=True))
    proc.start()
    closing(proc)
    assert proc.shard.entries == {} and proc.shard.version == 0
    warned = [r.getMessage() for r in caplog.records if "--start-empty-if-unreadable" in r.getMessage()]
    assert len(warned) == 1 and "ckpt-00000001.json" in warned[0] and "ckpt-00000002.json" in warned[0]
    assert [s.state for s in client.status().servers] == [ALIVE]
