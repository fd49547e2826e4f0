"""A worker's membership in the job: join, heartbeats, rejoin, partition assignments, leave.

The session is the one owner of the worker's identity. It publishes it as an immutable
`Identity` swapped whole under a lock, so the heartbeat thread, the training thread and the
push/pull threads each read one consistent (worker id, incarnation, view, clock) without a
lock of their own, and no thread ever writes another's fields.

Every wait here has a way out: once `interrupt()` is called (the worker must stop: SIGTERM,
SIGINT) each retry's pause and each `wait_view` ends with `Stopped`, and no retry starts.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import FailedPrecondition, PSError, StaleIncarnation, Unavailable
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.wire.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("shardps.worker")
# a worker counts toward --min-workers once it has joined, until it is declared dead
_JOINED = frozenset({scheduler_pb2.MEMBER_STATE_ALIVE, scheduler_pb2.MEMBER_STATE_LEFT})


class Stopped(Exception):
    """The worker was asked to stop (SIGTERM, SIGINT) while it waited: for the scheduler, a
    shard, a gate or a retry's pause. Not a PSError: no handler of failed calls may take it for
    one and retry or log it away; the training loop ends on it and the worker leaves."""


@dataclasses.dataclass(frozen=True)
class SessionConfig:
    scheduler: str
    name: str = ""
    control_timeout_s: float = grpcutil.CONTROL_TIMEOUT_S
    connect_timeout_s: float = 120.0   # waiting for the scheduler and all servers
    retry_deadline_s: float = 120.0    # retrying one control call on a retryable error
    security: Security = NO_SECURITY


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who this worker is right now. `worker_id` -1: not joined (or attached read-only)."""

    worker_id: int = -1
    incarnation: int = 0
    view: int = 0      # the membership view number last seen
    clock: int = 0     # the next step this worker computes
    observer: bool = False
    credential: bytes = b""   # the lease's: shown on every call made as this worker


class Session:
    def __init__(self, cfg: SessionConfig):
        self.cfg = cfg
        self._sched = scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(cfg.scheduler, cfg.security))
        # writers of _identity and _job (readers take the reference); notified when the view
        # rises and on interrupt(), for wait_view and the retries' pauses
        self._lock = threading.Condition()
        self._identity = Identity()
        self._job: JobSpec | None = None
        self._refused: int | None = None    # the incarnation the scheduler last refused
        self._rejoin_lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._interrupted = False
        self._view_listeners: list[Callable[[int], None]] = []

    # -- what other parts read -----------------------------------------------------------
    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def job(self) -> JobSpec:
        if self._job is None:
            raise FailedPrecondition("not joined or attached to a job yet")
        return self._job

    @property
    def refused_incarnation(self) -> int | None:
        """The incarnation a heartbeat was refused for (declared dead): rejoin before the next
        call. None while the current incarnation stands."""
        refused = self._refused
        return refused if refused == self._identity.incarnation else None

    def _swap(self, **changes) -> Identity:
        with self._lock:
            self._identity = dataclasses.replace(self._identity, **changes)
            return self._identity

    # -- waiting, and the way out of every wait -------------------------------------------
    def interrupt(self) -> None:
        """The worker is stopping: every wait here ends with Stopped, now and from now on."""
        with self._lock:
            self._interrupted = True
            self._lock.notify_all()

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    def check_interrupted(self) -> None:
        if self._interrupted:
            raise Stopped("the worker is stopping")

    def wait_view(self, after: int, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the membership view to pass `after` (a server registered,
        a worker joined or went); the view now. Stopped when the worker is stopping."""
        with self._lock:
            self._lock.wait_for(lambda: self._interrupted or self._identity.view > after, timeout=timeout_s)
            self.check_interrupted()
            return self._identity.view

    def _pause(self, seconds: float) -> None:
        """A retry's pause between attempts, cut short only by interrupt() (Stopped)."""
        with self._lock:
            self._lock.wait_for(lambda: self._interrupted, timeout=seconds)
        self.check_interrupted()

    def _retry(self, fn, deadline_s: float, **kwargs):
        """grpcutil.retry with a way out: no attempt starts, and no pause goes on, once the
        worker is stopping."""
        def attempt():
            self.check_interrupted()
            return fn()
        return grpcutil.retry(attempt, deadline_s, sleep=self._pause, **kwargs)

    def on_view_change(self, listener: Callable[[int], None]) -> None:
        """Call `listener(view)` (on the heartbeat thread; keep it short) whenever the membership
        view rises: a server registered (perhaps at a new address), a member joined or went."""
        self._view_listeners.append(listener)

    def _saw_view(self, view: int, incarnation: int) -> None:
        with self._lock:
            if self._identity.incarnation != incarnation or view <= self._identity.view:
                return
            self._identity = dataclasses.replace(self._identity, view=view)
            self._lock.notify_all()
        for listener in list(self._view_listeners):
            try:
                listener(view)
            except Exception:  # noqa: BLE001 - a listener must not end the heartbeats
                log.exception("membership view listener failed")

    def advance_clock(self, clock: int) -> None:
        """The clock only moves forward: a pull may move it past a step completed without us."""
        with self._lock:
            if clock > self._identity.clock:
                self._identity = dataclasses.replace(self._identity, clock=clock)

    # -- membership ----------------------------------------------------------------------
    def join(self) -> Identity:
        self._join(worker_id=-1)
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat")
            self._heartbeat.start()
        return self._identity

    def rejoin(self, stale_incarnation: int | None = None) -> Identity:
        """Join again under the same id and a new incarnation (after being declared dead).

        With `stale_incarnation`, only if that is still ours: the heartbeat thread and a
        refused push may both notice the same expiry, and one rejoin is enough.
        """
        with self._rejoin_lock:
            if stale_incarnation is not None and stale_incarnation != self._identity.incarnation:
                return self._identity
            identity = self._join(worker_id=self._identity.worker_id)
        log.warning("worker %d rejoined as incarnation %d at clock %d", identity.worker_id,
                    identity.incarnation, identity.clock)
        return identity

    def _join(self, worker_id: int) -> Identity:
        me = self._identity   # a rejoin proves it is this worker with its last credential
        req = scheduler_pb2.JoinWorkerRequest(name=self.cfg.name, worker_id=worker_id,
                                              incarnation=me.incarnation if worker_id > 0 else 0,
                                              credential=me.credential if worker_id > 0 else b"")
        reply = self._retry(lambda: grpcutil.call(self._sched.JoinWorker, req, self.cfg.control_timeout_s),
                            self.cfg.connect_timeout_s, waiting=self._waiting_for("the scheduler at "
                                                                                  + self.cfg.scheduler))
        with self._lock:
            self._job = JobSpec.from_proto(reply.job)
            current = self._identity
            self._identity = Identity(worker_id=reply.lease.member_id, incarnation=reply.lease.incarnation,
                                      view=reply.view, clock=max(current.clock, reply.start_clock),
                                      credential=reply.lease.credential)
            self._lock.notify_all()
            return self._identity

    def attach(self) -> scheduler_pb2.JobInfo:
        """Read-only access (operators, evaluation, export): learn the job without joining."""
        info = self.job_info()
        with self._lock:
            self._job = JobSpec.from_proto(info.job)
            self._identity = Identity(observer=True)
        return info

    def _heartbeat_loop(self) -> None:
        # at least once a second: the scheduler's view of clocks (status, joiners) stays fresh
        while not self._stop.wait(min(1.0, self.job.heartbeat_timeout_s / 3)):
            me = self._identity
            req = scheduler_pb2.HeartbeatRequest(role=scheduler_pb2.ROLE_WORKER, member_id=me.worker_id,
                                                 incarnation=me.incarnation, clock=me.clock,
                                                 credential=me.credential)
            try:
                view = grpcutil.call(self._sched.Heartbeat, req, self.cfg.control_timeout_s).view
            except StaleIncarnation as exc:
                log.warning("heartbeat refused: %s", exc)
                self._refused = me.incarnation
                continue
            except PSError as exc:  # the scheduler is away: keep training on the last view
                log.debug("heartbeat failed: %s", exc)
                continue
            self._saw_view(view, me.incarnation)

    def leave(self) -> None:
        self._stop.set()
        me = self._identity
        if me.worker_id < 0:
            return
        req = scheduler_pb2.LeaveRequest(role=scheduler_pb2.ROLE_WORKER, member_id=me.worker_id,
                                         incarnation=me.incarnation, clock=me.clock, credential=me.credential)
        try:
            grpcutil.call(self._sched.Leave, req, self.cfg.control_timeout_s)
        except PSError as exc:
            log.warning("leave failed: %s", exc)

    # -- the job and its servers ---------------------------------------------------------
    def job_info(self) -> scheduler_pb2.JobInfo:
        return grpcutil.call(self._sched.GetJob, scheduler_pb2.GetJobRequest(), self.cfg.control_timeout_s)

    def live_servers(self, info: scheduler_pb2.JobInfo | None = None) -> dict[int, str]:
        """shard -> address of every shard's live server."""
        info = info or self.job_info()
        return {s.shard: s.address for s in info.servers if s.state == scheduler_pb2.MEMBER_STATE_ALIVE}

    def wait_for_servers(self) -> dict[int, str]:
        """Block until every shard has a live server (deadline: connect_timeout_s)."""
        def ready():
            info = self.job_info()
            alive = self.live_servers(info)
            missing = sorted(set(range(info.job.num_servers)) - set(alive))
            if missing:
                raise Unavailable(f"no live server for shard{'s' if len(missing) > 1 else ''} "
                                  f"{', '.join(map(str, missing))} ({len(alive)} of {info.job.num_servers} "
                                  "registered)")
            return alive
        return self._retry(ready, self.cfg.connect_timeout_s, backoff=grpcutil.Backoff(0.05, 0.5),
                           waiting=self._waiting_for("the servers"))

    def _waiting_for(self, what: str):
        def say(exc: PSError, waited_s: float) -> None:
            log.warning("waiting for %s: %s (%.0f s so far, giving up after %.0f s; --connect-timeout)",
                        what, exc, waited_s, self.cfg.connect_timeout_s)
        return say

    def wait_for_workers(self, n: int) -> None:
        """Block until at least `n` workers have joined: alive, or already left after their
        steps (a start gate, so a sync job's first steps are not taken by whoever connected
        first; a fast worker may finish and leave before a slow one looks)."""
        def ready():
            st = grpcutil.call(self._sched.Status, scheduler_pb2.StatusRequest(), self.cfg.control_timeout_s)
            joined = sum(1 for w in st.workers if w.state in _JOINED)
            if joined < n:
                raise Unavailable(f"{joined} of {n} workers joined")
        self._retry(ready, self.cfg.connect_timeout_s, backoff=grpcutil.Backoff(0.05, 0.5),
                    waiting=self._waiting_for(f"{n} workers to join (--min-workers)"))

    def declare_model(self, request: scheduler_pb2.DeclareModelRequest) -> scheduler_pb2.JobInfo:
        return grpcutil.call(self._sched.DeclareModel, request, self.cfg.control_timeout_s)

    # -- partition assignments ------------------------------------------------------------------
    def acquire_partition(self, num_partitions: int, max_epochs: int) -> tuple[int, int, int]:
        """(AssignmentStatus, data epoch, partition) from the scheduler."""
        me = self._identity
        req = scheduler_pb2.AcquirePartitionRequest(worker_id=me.worker_id, incarnation=me.incarnation,
                                                    num_partitions=num_partitions, max_epochs=max_epochs,
                                                    credential=me.credential)
        reply = self._retry(lambda: grpcutil.call(self._sched.AcquirePartition, req, self.cfg.control_timeout_s),
                            self.cfg.retry_deadline_s)
        return reply.status, reply.epoch, reply.partition

    def complete_partition(self, epoch: int, partition: int) -> None:
        me = self._identity
        req = scheduler_pb2.CompletePartitionRequest(worker_id=me.worker_id, incarnation=me.incarnation,
                                                     epoch=epoch, partition=partition, credential=me.credential)
        self._retry(lambda: grpcutil.call(self._sched.CompletePartition, req, self.cfg.control_timeout_s),
                    self.cfg.retry_deadline_s)
