"""`psctl scheduler`: serves the Scheduler service and expires missed leases."""
from __future__ import annotations

import dataclasses
import logging
import threading

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec, StreamLimits
from shardps.pscommon.interceptors import StreamGuard
from shardps.pscommon.lifecycle import DaemonOptions, Telemetry, write_ready_file
from shardps.pscommon.wire.v1 import scheduler_pb2, scheduler_pb2_grpc
from shardps.scheduler.core import SchedulerCore
from shardps.scheduler.limits import MembershipLimits
from shardps.scheduler.metrics import SchedulerCollector
from shardps.scheduler.servicer import SchedulerServicer

log = logging.getLogger("shardps.scheduler")
SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    job: JobSpec
    listen: str = "127.0.0.1:0"
    state_dir: str | None = None
    ready_file: str | None = None
    reap_interval_s: float = 0.2
    drain_grace_s: float = 5.0
    options: DaemonOptions = DaemonOptions()
    limits: MembershipLimits = MembershipLimits()   # join rate per host, retention of dead workers
    streams: StreamLimits = StreamLimits()          # per-connection stream cap, health's own pool


class SchedulerProcess:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.core = SchedulerCore(cfg.job, cfg.state_dir, limits=cfg.limits)
        self.stop = threading.Event()
        self.telemetry = Telemetry(cfg.options, "scheduler")
        # last, so that it counts authenticated calls only; health and reflection run on its pool
        self.stream_guard = StreamGuard(cfg.streams)
        # watch streams hold a thread each: room for many servers and control calls
        self.grpc_server = grpcutil.make_server(max_workers=64, security=cfg.options.security,
                                                interceptors=self.telemetry.interceptors + (self.stream_guard,))
        self.health = grpcutil.add_health(self.grpc_server)
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(self.core), self.grpc_server)
        if cfg.options.reflection:
            grpcutil.enable_reflection(self.grpc_server, [SERVICE])
        self.address = grpcutil.bind(self.grpc_server, cfg.listen, cfg.options.security)

    def start(self) -> None:
        self.grpc_server.start()
        grpcutil.set_serving(self.health, SERVICE, True)
        threading.Thread(target=self._reap_loop, daemon=True, name="reaper").start()
        self.telemetry.start(SchedulerCollector(self.core))
        log.info("scheduler serving on %s: mode %s, %d servers; %s", self.address, self.core.job.mode,
                 self.core.job.num_servers, self.cfg.options.security.describe())
        write_ready_file(self.cfg.ready_file, self.address)

    def _reap_loop(self) -> None:
        while not self.stop.wait(self.cfg.reap_interval_s):
            self.core.reap()

    def drain(self) -> None:
        self.stop.set()
        grpcutil.set_serving(self.health, SERVICE, False)
        with self.core.cond:  # wake watch streams so they notice the shutdown
            self.core.cond.notify_all()
        self.grpc_server.stop(self.cfg.drain_grace_s).wait()
        self.stream_guard.close()
        self.telemetry.stop()


def run(cfg: SchedulerConfig, stop: threading.Event) -> int:
    proc = SchedulerProcess(cfg)
    proc.start()
    stop.wait()
    proc.drain()
    return 0
