"""`psctl server`: a shard process. Registers with the scheduler, follows membership through
a watch stream, heartbeats, serves the ParameterServer service, drains on SIGTERM."""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
import time

import grpc
from google.protobuf import json_format

from shardps.pscommon import framing, grpcutil
from shardps.pscommon.config import JobSpec, StreamLimits
from shardps.pscommon.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, PSError, ShardHeld,
                                      Superseded, Unavailable, from_rpc_error)
from shardps.pscommon.interceptors import StreamGuard
from shardps.pscommon.lifecycle import DaemonOptions, Telemetry, write_ready_file
from shardps.pscommon.wire.v1 import ps_pb2, scheduler_pb2, scheduler_pb2_grpc
from shardps.psserver import checkpoint
from shardps.psserver.checkpoint import Checkpointer, CheckpointStore
from shardps.psserver.embeddings import TablePolicy
from shardps.psserver.metrics import ShardCollector
from shardps.psserver.servicer import Limits, ParameterServerServicer
from shardps.psserver.shard import Shard, WorkerView

log = logging.getLogger("shardps.server")
SERVICE = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    scheduler: str
    listen: str = "127.0.0.1:0"
    advertise: str = ""            # address workers use; default: the bound address
    shard_id: int = -1
    ready_file: str | None = None
    register_timeout_s: float = 60.0
    drain_grace_s: float = 10.0
    limits: Limits = Limits()
    tables: TablePolicy = TablePolicy()      # admission, idle eviction, row cap of embedding tables
    streams: StreamLimits = StreamLimits()   # per-connection stream cap, idle timeout, health's pool
    checkpoint_dir: str | None = None
    checkpoint_every_s: float = 30.0
    # every checkpoint in checkpoint_dir refused: start the shard empty instead of refusing to start
    start_empty_if_unreadable: bool = False
    options: DaemonOptions = DaemonOptions()
    interceptors: tuple = ()       # extra grpc.ServerInterceptors, after the built-in ones (tests: faults)

    def __post_init__(self):
        if self.checkpoint_every_s <= 0:
            raise InvalidArgument(f"checkpoint interval {self.checkpoint_every_s} must be > 0 seconds")


def checkpoint_job(job) -> dict:
    """The job-spec fields a checkpoint must agree on: what defines the parameters and the
    optimizer state (not timeouts or codecs, which may change across a restart)."""
    full = json_format.MessageToDict(job)
    return {k: full[k] for k in ("mode", "staleness", "optimizer", "numServers", "sliceBytes") if k in full}


EXIT_REPLACED = 3  # another server took this shard over while we were away
HELD_LOG_EVERY_S = 5.0  # how often a server waiting for its shard says what it waits for


class Interrupted(Exception):
    """Stopped (SIGINT, SIGTERM) while waiting to register: nothing was served."""


def successor(servers, shard: int, incarnation: int):
    """The live server that took `shard` over from our `incarnation`, or None. Registering
    again is right when we were only declared dead (a pause past the lease, a scheduler that
    lost us): we still hold the shard's state. It is wrong once a newer server serves the
    shard: that one restored or rebuilt it and has taken updates since, and two servers
    re-registering in turn would pass the shard back and forth."""
    for s in servers:
        if s.shard == shard and s.state == scheduler_pb2.MEMBER_STATE_ALIVE and s.incarnation > incarnation:
            return s
    return None


class ServerProcess:
    """The running server: gRPC server + shard + background threads."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.stop = threading.Event()
        self.interrupt = threading.Event()   # a stop signal while registering (run() passes the CLI's)
        self.stepped_down = threading.Event()   # replaced by a newer server for our shard
        self.on_step_down = lambda: None        # run() wakes its wait with this
        self.skipped_checkpoints = 0            # refused lease: a successor may own the directory
        self.telemetry = Telemetry(cfg.options, "server")
        # last, so that it counts authenticated calls only; health and reflection run on its pool
        self.stream_guard = StreamGuard(cfg.streams)
        self.grpc_server = grpcutil.make_server(
            security=cfg.options.security,
            interceptors=self.telemetry.interceptors + tuple(cfg.interceptors) + (self.stream_guard,))
        self.health = grpcutil.add_health(self.grpc_server)
        self.address = grpcutil.bind(self.grpc_server, cfg.listen, cfg.options.security)
        self.sched = scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(cfg.scheduler, cfg.options.security))
        self.shard: Shard | None = None
        self.checkpointer: Checkpointer | None = None
        self.lease = None

    def _pause(self, seconds: float) -> None:
        """A retry's pause that a stop signal ends at once."""
        if self.interrupt.wait(seconds):
            raise Interrupted()

    def _waiting(self, exc: PSError, waited_s: float) -> None:
        log.warning("waiting for the scheduler at %s to register for shard %d: %s (%.0f s so far, giving up "
                    "after %g s; --connect-timeout)", self.cfg.scheduler, self.cfg.shard_id, exc, waited_s,
                    self.cfg.register_timeout_s)

    def _register(self) -> scheduler_pb2.RegisterServerReply:
        """Register for our shard, retrying until `register_timeout_s`. At start a ShardHeld
        refusal is waited out: the holder is most often this server's own predecessor, crashed
        and restarted at once, whose lease lapses within a heartbeat timeout. Once we have held
        the shard (registering again after our lease was refused) it means a successor holds
        it: no waiting, the heartbeat loop finds the successor and steps down."""
        advertise = self.cfg.advertise or self.address
        shard = self.shard.shard_id if self.shard else self.cfg.shard_id
        req = scheduler_pb2.RegisterServerRequest(address=advertise, shard=shard)
        end = time.monotonic() + self.cfg.register_timeout_s
        logged_at = None
        while True:
            try:
                return grpcutil.retry(
                    lambda: grpcutil.call(self.sched.RegisterServer, req, grpcutil.CONTROL_TIMEOUT_S),
                    max(0.0, end - time.monotonic()), sleep=self._pause, waiting=self._waiting)
            except (Unavailable, DeadlineExceeded) as exc:
                raise type(exc)(f"could not register with the scheduler at {self.cfg.scheduler} within "
                                f"{self.cfg.register_timeout_s:g} s (--connect-timeout): {exc}") from None
            except ShardHeld as exc:
                now = time.monotonic()
                if self.lease is not None or now >= end:
                    raise
                if logged_at is None or now - logged_at >= HELD_LOG_EVERY_S:
                    log.warning("%s; waiting", exc)
                    logged_at = now
                try:
                    lapse = float(exc.metadata.get("retry_after_s", 0.0))
                except ValueError:
                    lapse = 0.0
                # past the lapse by a reaper's tick; never longer than a second, so that a
                # holder that leaves (drains) early frees the shard for us at once
                self._pause(min(max(lapse, 0.0) + 0.05, 1.0, max(0.0, end - now)))

    def start(self) -> None:
        reply = self._register()
        self.lease = reply.lease
        job = JobSpec.from_proto(reply.job)
        self.shard = Shard(reply.shard, job, table_policy=self.cfg.tables)
        if self.cfg.checkpoint_dir:
            self._restore(reply)
            self.checkpointer.claim(reply.lease.incarnation)   # from here our predecessor writes nothing
        self.servicer = ParameterServerServicer(self.shard, self.cfg.limits, self.checkpointer,
                                                member_key=reply.member_key)
        framing.add_parameter_server(self.servicer, self.grpc_server)
        if self.cfg.options.reflection:
            grpcutil.enable_reflection(self.grpc_server, [SERVICE])
        self._initial_view()  # sync gates must know the live workers before the first push
        self.grpc_server.start()
        self.telemetry.start(ShardCollector(self.shard, self.checkpointer))
        grpcutil.set_serving(self.health, SERVICE, True)
        log.info("shard %d serving on %s (mode %s, member %d incarnation %d; %s)", reply.shard,
                 self.address, job.mode, reply.lease.member_id, reply.lease.incarnation,
                 self.cfg.options.security.describe())
        loops = [self._heartbeat_loop, self._watch_loop] + ([self._checkpoint_loop] if self.checkpointer else [])
        for target in loops:
            threading.Thread(target=target, daemon=True, name=target.__name__).start()
        write_ready_file(self.cfg.ready_file, self.address)

    def _restore(self, reply) -> None:
        """Adopt this shard's newest good checkpoint, if any (checkpoint.choose_restore decides);
        refuse one from another job, and a folder where every checkpoint is unusable."""
        job_json = checkpoint_job(reply.job)
        store = CheckpointStore(self.cfg.checkpoint_dir, reply.shard)
        self.checkpointer = Checkpointer(self.shard, store, job_json)
        found, refused = store.newest()
        snap = checkpoint.choose_restore(found, refused, job_json, self.cfg.start_empty_if_unreadable, store.dir)
        if snap is None:
            if refused:
                log.warning("%s; starting shard %d empty, as --start-empty-if-unreadable asks",
                            checkpoint.unusable_message(store.dir, refused), reply.shard)
            return
        for r in refused:
            log.error("checkpoint %s refused: %s; restoring an older one", r.path, r.why)
        try:
            self.shard.restore(snap)
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"checkpoint {snap.path}: {exc}") from None
        self.checkpointer.last_version = snap.shard_version
        self.checkpointer.last_path = pathlib.Path(snap.path)
        # its age is the file's (psctl status shows it), not "none yet" until the next write
        age = max(0.0, time.time() - self.checkpointer.last_path.stat().st_mtime)
        self.checkpointer.last_time = self.checkpointer.now() - age
        rows = "".join(f", table {name} {len(store.arrays['ids'])} rows" for name, (_, store) in sorted(snap.tables.items()))
        log.info("shard %d restored from %s: version %d, %d keys%s", reply.shard, snap.path,
                 snap.shard_version, len(snap.keys), rows)

    def _checkpoint_loop(self) -> None:
        """Runs until stop, whatever a checkpoint raises: a failed one leaves due() true, so the
        next interval tries again; a full disk costs checkpoints, never the shard."""
        while not self.stop.wait(self.cfg.checkpoint_every_s):
            try:
                if self.checkpointer.due() and self._lease_holds():
                    self.checkpointer.write()
            except Superseded as exc:
                self._step_down(str(exc))
                return
            except PSError:
                pass   # the checkpointer logged the cause and counted it
            except Exception:  # noqa: BLE001 - a bug here must not end the timer either
                log.exception("checkpoint timer: unexpected error; trying again in %.1fs",
                              self.cfg.checkpoint_every_s)

    def _heartbeat(self, incarnation: int) -> PSError | None:
        """One heartbeat: the scheduler's refusal of our lease, or None (also when it cannot
        be reached: then we keep serving on the last view)."""
        req = scheduler_pb2.HeartbeatRequest(role=scheduler_pb2.ROLE_SERVER, member_id=self.lease.member_id,
                                             incarnation=incarnation, credential=self.lease.credential)
        try:
            grpcutil.call(self.sched.Heartbeat, req, grpcutil.CONTROL_TIMEOUT_S)
        except (FailedPrecondition, NotFound) as exc:
            return exc
        except PSError as exc:
            log.debug("heartbeat failed: %s", exc)
        return None

    def _lease_holds(self) -> bool:
        """False when the scheduler refuses our lease: after a pause a successor may own the
        shard (and this directory), and a checkpoint of our stale copy would become the newest
        one there. The heartbeat loop decides between registering again and stepping down."""
        refused = self._heartbeat(self.lease.incarnation)
        if refused is not None:
            log.warning("checkpoint skipped: %s", refused)
            self.skipped_checkpoints += 1
        return refused is None

    def _heartbeat_loop(self) -> None:
        interval = self.shard.job.heartbeat_timeout_s / 3
        while not self.stop.wait(interval):
            incarnation = self.lease.incarnation
            refused = self._heartbeat(incarnation)
            if refused is None:
                continue
            if self._replaced(incarnation):
                return
            log.warning("scheduler no longer holds this server's lease (%s); registering again", refused)
            try:
                reply = self._register()
                self.lease = reply.lease
                self.servicer.member_key = reply.member_key   # a scheduler restarted without its state has a new one
            except PSError as exc:
                log.warning("re-registration failed: %s", exc)

    def _replaced(self, incarnation: int) -> bool:
        try:
            st = grpcutil.call(self.sched.Status, scheduler_pb2.StatusRequest(), grpcutil.CONTROL_TIMEOUT_S)
        except PSError as exc:
            log.warning("cannot tell whether this shard was taken over (%s); trying again", exc)
            return False
        new = successor(st.servers, self.shard.shard_id, incarnation)
        if new is None:
            return False
        self._step_down(f"shard {self.shard.shard_id} was taken over by the server at {new.address} "
                        f"(incarnation {new.incarnation})")
        return True

    def _step_down(self, why: str) -> None:
        log.error("%s; stepping down without a checkpoint: this process's copy is stale", why)
        self.stepped_down.set()
        self.stop.set()       # no more checkpoints either: they would hide the successor's
        grpcutil.set_serving(self.health, SERVICE, False)
        self.on_step_down()

    def _adopt(self, view) -> None:
        self.shard.set_view(view.view, [
            WorkerView(w.worker_id, w.incarnation, w.state == scheduler_pb2.MEMBER_STATE_ALIVE, w.clock)
            for w in view.workers])

    def _initial_view(self) -> None:
        """The shard admits only the members of a view it adopted, and a view-less shard checks
        no one: so no serving before the first view. Waits as long as registering may."""
        def first_view():
            stream = self.sched.WatchMembership(scheduler_pb2.WatchMembershipRequest(after_view=0),
                                                timeout=grpcutil.CONTROL_TIMEOUT_S)
            try:
                return next(iter(stream))
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            except StopIteration:
                raise Unavailable("the membership watch ended before its first view") from None
            finally:
                stream.cancel()
        try:
            view = grpcutil.retry(first_view, self.cfg.register_timeout_s)
        except PSError as exc:
            raise Unavailable(f"no membership view from the scheduler at {self.cfg.scheduler} within "
                              f"{self.cfg.register_timeout_s:g}s ({exc}); not serving") from None
        self._adopt(view)

    def _watch_loop(self) -> None:
        backoff, attempt = grpcutil.Backoff(cap_s=2.0), 0
        while not self.stop.is_set():
            try:
                stream = self.sched.WatchMembership(
                    scheduler_pb2.WatchMembershipRequest(after_view=0), timeout=3600)
                for view in stream:
                    attempt = 0
                    self._adopt(view)
                    if self.stop.is_set():
                        stream.cancel()
                        return
            except grpc.RpcError as err:
                if self.stop.is_set():
                    return
                log.debug("membership watch broke: %s", from_rpc_error(err))
            self.stop.wait(backoff.delay(attempt))
            attempt += 1

    def drain(self) -> bool:
        """NOT_SERVING, refuse new calls, let in-flight ones finish, write the final checkpoint,
        leave. False when the final checkpoint failed (the checkpointer logged why): the shard
        leaves all the same, since holding it would only delay the restart that recovers it."""
        self.stop.set()
        grpcutil.set_serving(self.health, SERVICE, False)
        stopped = self.grpc_server.stop(self.cfg.drain_grace_s)   # new calls are refused from here
        if self.shard is not None:
            self.shard.close_gates()   # waiting pulls return UNAVAILABLE now, not CANCELLED at the grace's end
        stopped.wait()
        self.stream_guard.close()
        if self.stepped_down.is_set():
            self.telemetry.stop()      # our lease and our copy of the shard are someone else's now
            return True
        saved = True
        if self.checkpointer is not None and self._lease_holds():
            try:
                self.checkpointer.write(final=True)  # nothing applied is lost
            except Superseded as exc:
                self._step_down(str(exc))
                self.telemetry.stop()
                return True
            except PSError:
                saved = False
        self._leave()
        self.telemetry.stop()
        log.info("shard %d drained", self.shard.shard_id if self.shard else -1)
        return saved

    def _leave(self) -> None:
        if self.lease is None:
            return
        req = scheduler_pb2.LeaveRequest(role=scheduler_pb2.ROLE_SERVER, member_id=self.lease.member_id,
                                         incarnation=self.lease.incarnation, credential=self.lease.credential)
        try:
            grpcutil.call(self.sched.Leave, req, 2.0)
        except PSError as exc:
            log.debug("leave failed: %s", exc)


EXIT_CHECKPOINT_FAILED = 1  # drained, but the final checkpoint could not be written


def run(cfg: ServerConfig, stop: threading.Event) -> int:
    proc = ServerProcess(cfg)
    proc.on_step_down = stop.set
    proc.interrupt = stop
    try:
        proc.start()
    except Interrupted:
        log.info("stopped before registering for shard %d; nothing served", cfg.shard_id)
        proc.grpc_server.stop(0)
        proc.stream_guard.close()
        proc.telemetry.stop()
        return 0
    except BaseException:
        # registered but refusing to serve (an unusable checkpoint folder, another job's
        # checkpoint): leave, so the shard is not held by a member that will never answer
        proc.stop.set()
        proc.grpc_server.stop(0)
        proc.stream_guard.close()
        proc.telemetry.stop()
        proc._leave()
        raise
    stop.wait()
    saved = proc.drain()
    if proc.stepped_down.is_set():
        return EXIT_REPLACED
    return 0 if saved else EXIT_CHECKPOINT_FAILED
