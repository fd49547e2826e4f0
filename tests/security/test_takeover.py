"""Attack: take over a live shard by registering another address for it.

Before: RegisterServer(shard=0, address=elsewhere) while shard 0's server was alive and
heartbeating replaced it; the real server found its lease refused and stepped down, and
workers were sent to the attacker's address. Now the registration is refused while the
holder's lease runs (FAILED_PRECONDITION, reason SHARD_HELD, naming the holder and when its
lease lapses) and nothing changes.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import scheduler_pb2 as spb
from shardps.psserver.daemon import SERVICE

from .helpers import TIMEOUT_S, Attacker, error_info, membership, poll, trains, worker

SHAPES = {"w": 64, "b": 8}
HEARTBEAT_S = 1.5   # servers heartbeat every 0.5 s: a renewal comes soon after the attack


@pytest.mark.parametrize("address", ["127.0.0.66:6666", "REAL"])
def test_registering_for_a_live_shard_is_refused_and_changes_nothing(cluster, address):
    c = cluster(JobSpec(num_servers=2, heartbeat_timeout_s=HEARTBEAT_S))
    client = worker(c.address)
    client.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    attacker = Attacker(c.address)
    try:
        trains(client, SHAPES, attacker.stub)
        before = membership(attacker.stub)
        holder = next(s for s in attacker.stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S).servers
                      if s.shard == 0)
        # "REAL": the holder's own address, as a forger who read it from Status would send it
        forged = holder.address if address == "REAL" else address
        err = attacker.refused("RegisterServer", spb.RegisterServerRequest(address=forged, shard=0))

        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(err)
        assert info is not None and info.reason == "SHARD_HELD"
        for fact in (f"member {holder.member_id}", f"incarnation {holder.incarnation}", holder.address):
            assert fact in err.details(), (fact, err.details())
        assert info.metadata["member"] == str(holder.member_id)
        assert info.metadata["incarnation"] == str(holder.incarnation)
        assert info.metadata["address"] == holder.address
        assert 0 < float(info.metadata["retry_after_s"]) <= HEARTBEAT_S
        assert membership(attacker.stub) == before

        # the real server keeps its lease past a whole timeout after the attack (it would be
        # dead by then had it lost it), keeps serving, and training goes on through it
        attacked_at = attacker.stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S).uptime_s
        poll(lambda: attacker.stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S).uptime_s
             > attacked_at + 2 * HEARTBEAT_S, what="two heartbeat timeouts after the attack")
        assert membership(attacker.stub) == before
        assert not c.servers[0].stepped_down.is_set()
        with grpcutil.channel(c.servers[0].address) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                          timeout=TIMEOUT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        trains(client, SHAPES)
    finally:
        attacker.close()
        client.leave()


def test_register_any_shard_when_all_are_held_is_refused_and_changes_nothing(cluster):
    c = cluster(JobSpec(num_servers=2, heartbeat_timeout_s=HEARTBEAT_S))
    attacker = Attacker(c.address)
    try:
        before = membership(attacker.stub)
        err = attacker.refused("RegisterServer", spb.RegisterServerRequest(address="127.0.0.66:6666", shard=-1))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert membership(attacker.stub) == before
    finally:
        attacker.close()
