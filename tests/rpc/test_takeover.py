"""A shard taken over: a second server registers for shard 0 while the first still runs (the
first was paused past its lease and an operator started a replacement, say). The first learns
it was replaced at its next heartbeat and steps down, instead of registering again and passing
the shard back and forth; training goes on against the successor."""
from __future__ import annotations

import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import scheduler_pb2 as spb
from shardps.psserver.daemon import SERVICE, ServerConfig, ServerProcess
from shardps.worker.client import ClientConfig, ShardClient

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


def test_replaced_server_writes_no_checkpoint_over_its_successors(cluster, tmp_path):
    """The replaced server has not heard yet (heartbeats 10 s apart) and still takes pushes on
    the old route, so it has changes to checkpoint: it must not write them into the directory
    its successor restored from, neither on its timer nor when drained."""
    ckpt = tmp_path / "ckpt"
    c = cluster(JobSpec(num_servers=1, heartbeat_timeout_s=30))
    c.servers[0].drain()   # the cluster's own server has no checkpoint dir: replace it
    first = ServerProcess(ServerConfig(scheduler=c.address, shard_id=0, checkpoint_dir=str(ckpt),
                                       checkpoint_every_s=0.1))
    first.start()
    c.servers[0] = first
    client = ShardClient(ClientConfig(scheduler=c.address, name="w"))
    client.join()
    client.wait_for_servers()
    client.declare({"w": np.zeros(8, np.float32)})
    client.push({"w": np.ones(8, np.float32)})
    poll(lambda: first.checkpointer.last_version == 1, TIMEOUT_S, what="the first checkpoint")

    second = ServerProcess(ServerConfig(scheduler=c.address, shard_id=0, checkpoint_dir=str(ckpt),
                                        checkpoint_every_s=3600))
    second.start()                      # restores version 1 from the shared directory
    c.servers.append(second)
    assert second.shard.version == 1
    files = sorted(p.name for p in (ckpt / "shard-0").iterdir())
    # a worker still on the old route: the stale copy moves on
    client.push({"w": np.ones(8, np.float32)})
    assert first.shard.version == 2 and second.shard.version == 1
    poll(lambda: first.skipped_checkpoints > 0, TIMEOUT_S, what="the stale server to skip a checkpoint")
    first.drain()
    assert not first.stepped_down.is_set()          # it never heard; the directory is safe anyway
    assert sorted(p.name for p in (ckpt / "shard-0").iterdir()) == files
    client.leave()
