"""Shared fixtures: real gRPC servers in-process on port 0, and a polling helper."""
from __future__ import annotations

import time

import grpc
import pytest

from shardps.pscommon import framing, grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import ps_pb2_grpc
from shardps.psserver.servicer import Limits, ParameterServerServicer
from shardps.psserver.shard import Shard


def poll(predicate, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Poll until `predicate()` is truthy; fail the test at the deadline. Returns the value."""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class ShardServer:
    """One ParameterServer shard on 127.0.0.1:0, no scheduler; tests drive membership directly."""

    def __init__(self, job: JobSpec, shard_id: int = 0, limits: Limits = Limits(), table_policy=None):
        self.shard = Shard(shard_id, job) if table_policy is None else Shard(shard_id, job, table_policy=table_policy)
        self.server = grpcutil.make_server()
        framing.add_parameter_server(ParameterServerServicer(self.shard, limits), self.server)
        self.address = grpcutil.bind(self.server, "127.0.0.1:0")
        self.server.start()
        self.channel = grpcutil.channel(self.address)
        self.stub = ps_pb2_grpc.ParameterServerStub(self.channel)

    def close(self):
        self.channel.close()
        self.server.stop(0).wait()


@pytest.fixture
def shard_server():
    """Factory: shard_server(job=JobSpec(...), shard_id=0) -> ShardServer, stopped after the test."""
    made = []

    def make(job: JobSpec | None = None, shard_id: int = 0, limits: Limits = Limits(), table_policy=None):
        s = ShardServer(job or JobSpec(), shard_id, limits, table_policy)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


class InProcessCluster:
    """A scheduler and S servers in this process (real gRPC on port 0, real membership)."""

    def __init__(self, job: JobSpec, state_dir: str | None = None):
        from shardps.psserver.daemon import ServerConfig, ServerProcess
        from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess

        self.scheduler = SchedulerProcess(SchedulerConfig(job=job, state_dir=state_dir))
        self.scheduler.start()
        self.address = self.scheduler.address
        self.servers = []
        for shard in range(job.num_servers):
            srv = ServerProcess(ServerConfig(scheduler=self.address, shard_id=shard))
            srv.start()
            self.servers.append(srv)

    def close(self):
        for srv in self.servers:
            srv.drain()
        self.scheduler.drain()


@pytest.fixture
def cluster():
    """Factory: cluster(JobSpec(...)) -> InProcessCluster, drained after the test."""
    made = []

    def make(job: JobSpec | None = None, **kw):
        c = InProcessCluster(job or JobSpec(), **kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def rpc_code(exc_info) -> grpc.StatusCode:
    return exc_info.value.code()
