"""--reflection: grpcurl-style discovery over real daemons in this process. With the flag each
daemon lists its own service and the health service, and hands out their descriptors; without
it, reflection is not there at all."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.lifecycle import DaemonOptions
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
SCHEDULER = "shardps.pscommon.wire.v1.Scheduler"
PARAMETER_SERVER = "shardps.pscommon.wire.v1.ParameterServer"


@pytest.fixture
def daemons():
    """factory(reflection) -> (scheduler address, server address); all drained after the test."""
    made = []

    def make(reflection: bool):
        opts = DaemonOptions(reflection=reflection)
        sched = SchedulerProcess(SchedulerConfig(job=JobSpec(), options=opts))
        sched.start()
        made.append(sched)
        srv = ServerProcess(ServerConfig(scheduler=sched.address, shard_id=0, options=opts))
        srv.start()
        made.insert(0, srv)
        return sched.address, srv.address
    yield make
    for d in made:
        d.drain()


def services(address: str) -> list[str]:
    with grpcutil.channel(address) as ch:
        return sorted(ProtoReflectionDescriptorDatabase(ch).get_services())


def test_reflection_lists_each_daemons_services(daemons):
    sched, srv = daemons(reflection=True)
    assert services(sched) == sorted([SCHEDULER, HEALTH, REFLECTION])
    assert services(srv) == sorted([PARAMETER_SERVER, HEALTH, REFLECTION])


def test_reflection_hands_out_method_descriptors(daemons):
    _, srv = daemons(reflection=True)
    with grpcutil.channel(srv) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        pool = DescriptorPool(db)
        methods = {m.name for m in pool.FindServiceByName(PARAMETER_SERVER).methods}
        check = pool.FindServiceByName(HEALTH).methods_by_name["Check"]
    assert {"Declare", "Pull", "Push", "PullBatch", "PushBatch", "Inspect"} <= methods
    assert check.input_type.full_name == "grpc.health.v1.HealthCheckRequest"


def test_no_reflection_without_the_flag(daemons):
    sched, srv = daemons(reflection=False)
    for address in (sched, srv):
        with pytest.raises(grpc.RpcError) as exc:
            services(address)
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
