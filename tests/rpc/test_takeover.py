"""A shard taken over: a second server registers for shard 0 while the first still runs (the
first was paused past its lease and an operator started a replacement, say). The first learns
it was replaced at its next heartbeat and steps down, instead of registering again and passing
the shard back and forth; training goes on against the successor."""
from __future__ import annotations

import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pscommon import grpcutil
from pscommon.config import JobSpec
from pscommon.wire.v1 import scheduler_pb2 as spb
from psserver.daemon import SERVICE, ServerConfig, ServerProcess
from worker.client import ClientConfig, ShardClient

from .helpers import TIMEOUT_S, poll
from .test_api import scheduler_status


def serving_status(address: str) -> int:
    with grpcutil.channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                    timeout=TIMEOUT_S).status


def test_replaced_server_steps_down_and_training_goes_on(cluster):
    c = cluster(JobSpec(num_servers=1, heartbeat_timeout_s=1.5))   # heartbeats every 0.5 s
    first = c.servers[0]
    second = ServerProcess(ServerConfig(scheduler=c.address, shard_id=0))
    second.start()
    c.servers.append(second)   # drained with the cluster
    poll(first.stepped_down.is_set, TIMEOUT_S, what="the replaced server to step down")
    assert serving_status(first.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not second.stepped_down.is_set()
    first.drain()
    # the successor keeps the shard: the one that stepped down did not register again
    (srv,) = scheduler_status(c.address).servers
    assert (srv.address, srv.incarnation, srv.state) == (
        second.address, second.lease.incarnation, spb.MEMBER_STATE_ALIVE)
    assert second.lease.incarnation > first.lease.incarnation

    client = ShardClient(ClientConfig(scheduler=c.address, name="w"))
    client.join()
    client.wait_for_servers()
    client.declare({"w": np.zeros(8, np.float32)})
    client.push({"w": np.ones(8, np.float32)})
    out = {"w": np.empty(8, np.float32)}
    client.pull(out)
    client.leave()
    assert second.shard.version == 1 and first.shard.version == 0
    assert (out["w"] != 0).all()
