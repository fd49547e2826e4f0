"""A shard taken over: the first server is cut off from the scheduler (paused, partitioned)
past its lease, and a replacement registers for shard 0 while the first still runs; a shard
whose server holds a live lease is not given away (tests/security/test_takeover.py). The
first learns it was replaced when it reaches the scheduler again and steps down, instead of
registering again and passing the shard back and forth; training goes on against the
successor."""
from __future__ import annotations

import collections
import socket
import threading

import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.wire.v1 import scheduler_pb2 as spb
from shardps.psserver.daemon import SERVICE, ServerConfig, ServerProcess
from shardps.worker.client import ClientConfig, ShardClient

from .helpers import TIMEOUT_S, poll
from .test_api import scheduler_status


class Link:
    """A TCP relay between one server and the scheduler that the test can hold: while held,
    bytes in both directions wait in the relay, as for a paused process or a partition. Calls
    made meanwhile get their answers on release (within their deadlines)."""

    def __init__(self, target: str):
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.flowing = threading.Condition()
        self.held = False
        self.held_bytes = 0      # bytes from the server that wait in the relay
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [conn, upstream]
            threading.Thread(target=self._pump, args=(conn, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool):
        """Read `src` always (so held bytes are counted as they come), forward to `dst`
        whenever the link is not held."""
        queue: collections.deque[bytes] = collections.deque()
        closed = threading.Event()
        threading.Thread(target=self._forward, args=(queue, closed, dst), daemon=True).start()
        try:
            while data := src.recv(65536):
                with self.flowing:
                    if self.held and from_server:
                        self.held_bytes += len(data)
                    queue.append(data)
                    self.flowing.notify_all()
        except OSError:
            pass
        finally:
            with self.flowing:
                closed.set()
                self.flowing.notify_all()

    def _forward(self, queue, closed, dst: socket.socket):
        try:
            while True:
                with self.flowing:
                    self.flowing.wait_for(lambda: (queue and not self.held) or (closed.is_set() and not queue))
                    if not queue:
                        return
                    data = b"".join(queue)
                    queue.clear()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def hold(self):
        with self.flowing:
            self.held = True

    def release(self):
        with self.flowing:
            self.held = False
            self.flowing.notify_all()

    def close(self):
        self.release()
        self.listener.close()
        for s in self.sockets:
            s.close()


def server_state(address: str, shard: int) -> int:
    return {s.shard: s.state for s in scheduler_status(address).servers}[shard]


def serving_status(address: str) -> int:
    with grpcutil.channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                    timeout=TIMEOUT_S).status


def test_replaced_server_steps_down_and_training_goes_on(cluster):
    c = cluster(JobSpec(num_servers=1, heartbeat_timeout_s=1.5))   # heartbeats every 0.5 s
    c.servers[0].drain()   # the cluster's own server reaches the scheduler directly: replace it
    link = Link(c.address)
    try:
        first = ServerProcess(ServerConfig(scheduler=link.address, shard_id=0))
        first.start()
        c.servers[0] = first
        link.hold()
        poll(lambda: server_state(c.address, 0) == spb.MEMBER_STATE_DEAD, TIMEOUT_S,
             what="the cut-off server's lease to lapse")
        second = ServerProcess(ServerConfig(scheduler=c.address, shard_id=0))
        second.start()
        c.servers.append(second)   # drained with the cluster
        link.release()
        poll(first.stepped_down.is_set, TIMEOUT_S, what="the replaced server to step down")
    finally:
        link.close()
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
    """The replaced server is cut off past its lease and still takes pushes on the old route,
    so it has changes to checkpoint: it must not write them into the directory its successor
    restored from, neither on its timer nor when drained."""
    ckpt = tmp_path / "ckpt"
    c = cluster(JobSpec(num_servers=1, heartbeat_timeout_s=2.0))
    c.servers[0].drain()   # the cluster's own server has no checkpoint dir: replace it
    link = Link(c.address)
    try:
        first = ServerProcess(ServerConfig(scheduler=link.address, shard_id=0, checkpoint_dir=str(ckpt),
                                           checkpoint_every_s=0.1))
        first.start()
        c.servers[0] = first
        client = ShardClient(ClientConfig(scheduler=c.address, name="w"))
        client.join()
        client.wait_for_servers()
        client.declare({"w": np.zeros(8, np.float32)})
        client.push({"w": np.ones(8, np.float32)})
        poll(lambda: first.checkpointer.last_version == 1, TIMEOUT_S, what="the first checkpoint")

        link.hold()
        poll(lambda: server_state(c.address, 0) == spb.MEMBER_STATE_DEAD, TIMEOUT_S,
             what="the cut-off server's lease to lapse")
        second = ServerProcess(ServerConfig(scheduler=c.address, shard_id=0, checkpoint_dir=str(ckpt),
                                            checkpoint_every_s=3600))
        second.start()                      # restores version 1 from the shared directory
        c.servers.append(second)
        assert second.shard.version == 1
        files = sorted(p.name for p in (ckpt / "shard-0").iterdir())
        # a worker still on the old route: the stale copy moves on, and its checkpoint timer
        # asks the scheduler whether its lease holds (the question waits in the link)
        asked = link.held_bytes
        client.push({"w": np.ones(8, np.float32)})
        assert first.shard.version == 2 and second.shard.version == 1
        poll(lambda: link.held_bytes > asked, TIMEOUT_S, what="the stale server to check its lease")
        link.release()
        poll(lambda: first.skipped_checkpoints > 0 or first.stepped_down.is_set(), TIMEOUT_S,
             what="the stale server to skip a checkpoint")
    finally:
        link.close()
    # drained with the scheduler out of reach, it cannot learn that its lease is gone: the
    # successor's claim on the directory stops the final checkpoint
    first.drain()
    assert first.stepped_down.is_set()
    assert sorted(p.name for p in (ckpt / "shard-0").glob("ckpt-*")) == [f for f in files if f.startswith("ckpt-")]
    client.leave()


def test_a_server_restarted_at_once_waits_for_its_predecessors_lease(cluster, caplog):
    """A crash (no drain, no Leave) and an immediate restart: the new process finds the shard
    held by its predecessor's lease, says so and waits, and takes the shard once it lapses."""
    c = cluster(JobSpec(num_servers=1, heartbeat_timeout_s=3.0))
    crashed = c.servers[0]
    crashed.stop.set()                  # its heartbeats stop, as with kill -9
    crashed.grpc_server.stop(0).wait()
    caplog.set_level("WARNING", logger="shardps.server")
    restarted = ServerProcess(ServerConfig(scheduler=c.address, shard_id=0))
    restarted.start()
    c.servers[0] = restarted
    waited = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waited, "the restarted server did not wait for the shard"
    assert f"shard 0 is held by member {crashed.lease.member_id}" in waited[0]
    assert crashed.address in waited[0] and "lease lapses in" in waited[0]
    (srv,) = scheduler_status(c.address).servers
    assert (srv.address, srv.member_id, srv.state) == (restarted.address, crashed.lease.member_id,
                                                        spb.MEMBER_STATE_ALIVE)
    assert restarted.lease.incarnation > crashed.lease.incarnation
