"""Attacks with streams that hold a server's threads and send nothing.

Before: a server ran every call on one pool of 16 threads, and a stream holds its thread
for as long as it is open. 16 push streams that sent nothing stopped all training; 16
Health.Watch (or reflection) streams, which need no token, did the same, and about 70 of
them starved the scheduler; a health probe queued behind idle streams and timed out.

Now (config.StreamLimits, pscommon.interceptors.StreamGuard): one connection holds at most
8 streams (more are refused with RESOURCE_EXHAUSTED naming the limit), a request stream
whose handler has waited `idle_timeout_s` for a message is ended with DEADLINE_EXCEEDED
(and never applied), and health and reflection run on a pool of their own where at most 2
streams are open at once. Each test checks the refusal, that the shard's state is what it
was, and that a worker still trains.
"""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec, StreamLimits
from shardps.pscommon.lifecycle import DaemonOptions
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc
from shardps.pscommon.wire.v1 import scheduler_pb2 as spb
from shardps.pscommon.wire.v1 import scheduler_pb2_grpc
from shardps.psserver.daemon import SERVICE, ServerConfig, ServerProcess
from shardps.scheduler.daemon import SERVICE as SCHEDULER
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess

from rpc.helpers import push_header, snapshot
from shardps.pscommon import credentials

from .helpers import TIMEOUT_S, error_info, poll, trains, worker

SHAPES = {"w": 64, "b": 8}
DATA_THREADS = 16          # grpcutil.make_server's pool: what the attacks try to fill
PER_CONNECTION = StreamLimits().max_streams_per_connection   # the default cap: 8
CONTROL_STREAMS = StreamLimits().max_control_streams         # the default: 2


class Job:
    """A scheduler, one shard with the given stream limits, and an honest worker that has
    declared the model and trained a step."""

    def __init__(self, streams: StreamLimits, options: DaemonOptions = DaemonOptions()):
        self.scheduler = SchedulerProcess(SchedulerConfig(job=JobSpec(), options=options, drain_grace_s=1.0))
        self.scheduler.start()
        self.server = ServerProcess(ServerConfig(scheduler=self.scheduler.address, shard_id=0, streams=streams,
                                                 options=options, drain_grace_s=1.0))
        self.server.start()
        self.client = worker(self.scheduler.address)
        self.client.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
        self.channel = grpcutil.channel(self.server.address)
        self.stub = ps_pb2_grpc.ParameterServerStub(self.channel)
        self.attackers: list = []
        trains(self.client, SHAPES)

    @property
    def fingerprint(self) -> str:
        return self.client.shard_map.fingerprint

    def state(self) -> dict:
        return snapshot(self.stub, self.fingerprint)

    def serving(self, address: str, service: str = SERVICE, timeout: float = TIMEOUT_S) -> int:
        with grpcutil.channel(address) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout).status

    def close(self):
        for a in self.attackers:
            a.close()
        self.channel.close()
        try:
            self.client.leave()
        finally:
            self.server.drain()
            self.scheduler.drain()


@pytest.fixture
def job():
    made = []

    def make(streams: StreamLimits = StreamLimits(idle_timeout_s=60.0), **kw) -> Job:
        j = Job(streams, **kw)
        made.append(j)
        return j
    yield make
    for j in made:
        j.close()


class Idle:
    """One call on its own channel, or on a shared one, whose request stream sends
    `messages` and then nothing until closed: what an attacker holds open."""

    def __init__(self, address: str | None = None, channel: grpc.Channel | None = None,
                 method: str = "push", messages=()):
        self.own = channel is None
        self.channel = grpcutil.channel(address) if self.own else channel
        self.released = threading.Event()

        def requests():
            yield from messages
            self.released.wait(TIMEOUT_S)

        if method == "push":
            self.call = ps_pb2_grpc.ParameterServerStub(self.channel).Push.future(requests(), timeout=TIMEOUT_S)
        elif method == "watch":
            self.call = health_pb2_grpc.HealthStub(self.channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        elif method == "reflection":
            self.call = reflection_pb2_grpc.ServerReflectionStub(self.channel).ServerReflectionInfo(
                requests(), timeout=TIMEOUT_S)
        else:
            raise ValueError(method)

    def done(self) -> bool:
        return self.call.done()

    def refused(self) -> bool:
        return self.call.done() and self.call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    def close(self):
        self.released.set()
        self.call.cancel()
        if self.own:
            self.channel.close()


def _saturated(stub) -> bool:
    """Whether every data-plane thread is taken: a one-line call then gets no answer."""
    try:
        stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=0.5)
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return False


def test_sixteen_idle_pushes_on_one_connection_are_capped_and_training_goes_on(job):
    j = job()
    before = j.state()
    shared = grpcutil.channel(j.server.address)
    try:
        streams = [Idle(channel=shared) for _ in range(DATA_THREADS)]
        j.attackers.extend(streams)
        refused = poll(lambda: [s for s in streams if s.refused()] if
                       sum(s.refused() for s in streams) >= DATA_THREADS - PER_CONNECTION else None,
                       what=f"{DATA_THREADS - PER_CONNECTION} pushes beyond the cap to be refused")
        assert len(refused) == DATA_THREADS - PER_CONNECTION
        err = refused[0].call.exception()
        assert f"({PER_CONNECTION}, --max-streams-per-connection)" in err.details(), err.details()
        info = error_info(err)
        assert info is not None and info.metadata["limit"] == "max_streams_per_connection"
        # the rest are open, idle, and hold a thread each
        assert sum(not s.done() for s in streams) == PER_CONNECTION
        assert sorted(j.server.stream_guard.streams().values()) == [PER_CONNECTION]

        assert j.state() == before
        assert j.serving(j.server.address) == health_pb2.HealthCheckResponse.SERVING
        trains(j.client, SHAPES)     # while the attacker still holds its streams
        assert sum(not s.done() for s in streams) == PER_CONNECTION
        for s in streams:            # once they close, the connection's count goes back to 0
            s.close()
        poll(lambda: j.server.stream_guard.streams() == {}, what="the closed streams to be uncounted")
    finally:
        for s in j.attackers:
            s.close()
        shared.close()


def member_push_header(j, step: int):
    """A push header with a member's credential (made with the server's job key): a stream
    the server takes and then waits on, as it would a slow worker's."""
    cred = credentials.issue(j.server.servicer.member_key, "worker", 1, 1)
    return push_header(j.fingerprint, worker=1, incarnation=1, step=step, credential=cred)


def test_health_answers_and_idle_pushes_end_when_every_data_thread_is_held(job):
    """16 connections with one idle push each: under every per-connection cap, they take the
    whole data pool. A health probe still answers (its own pool), and once the streams have
    been idle for the timeout they are ended, nothing is applied, and training goes on."""
    j = job(StreamLimits(idle_timeout_s=60.0))
    before = j.state()
    streams = [Idle(j.server.address, messages=[member_push_header(j, step=i)]) for i in range(DATA_THREADS)]
    j.attackers.extend(streams)
    poll(lambda: _saturated(j.stub), what="the idle pushes to hold every data-plane thread")
    assert j.serving(j.server.address, timeout=10.0) == health_pb2.HealthCheckResponse.SERVING

    # the idle timeout, decided now as if 60 s had gone by (the watch's own thread is
    # exercised with a short timeout below); a handler still reading its header is not
    # waiting yet, so sweep until every stream has been ended
    ended = []

    def all_ended():
        ended.extend(j.server.stream_guard.idle.sweep(time.monotonic() + 60.0))
        return len(ended) == DATA_THREADS
    poll(all_ended, what="every idle push to be past the idle timeout")
    poll(lambda: all(s.done() for s in streams), what="the idle pushes to be ended")
    for s in streams:
        assert s.call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle" in s.call.details() and "--stream-idle-timeout" in s.call.details(), s.call.details()
    assert j.state() == before   # a cut-off push is never applied as if it were complete
    trains(j.client, SHAPES)


@pytest.mark.parametrize("sent", ["nothing", "a header"])
def test_a_push_stream_that_goes_quiet_is_ended_after_the_idle_timeout(job, sent):
    j = job(StreamLimits(idle_timeout_s=0.5))
    before = j.state()
    messages = [] if sent == "nothing" else [member_push_header(j, step=5)]
    stub = ps_pb2_grpc.ParameterServerStub(j.channel)
    released = threading.Event()

    def requests():
        yield from messages
        released.wait(TIMEOUT_S)
    try:
        with pytest.raises(grpc.RpcError) as exc:
            stub.Push(requests(), timeout=10.0)
    finally:
        released.set()
    err = exc.value
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "Push stream idle" in err.details() and "--stream-idle-timeout" in err.details(), err.details()
    assert j.state() == before
    trains(j.client, SHAPES)
    assert j.server.stream_guard.streams() == {}   # nothing left counted against a connection


@pytest.mark.parametrize("method", ["watch", "reflection"])
def test_health_and_reflection_streams_cannot_take_the_data_plane(job, method):
    """Health and reflection need no token. Their streams run on a pool of their own, at
    most two at once server-wide; the rest are refused, and training goes on."""
    j = job(options=DaemonOptions(reflection=True))
    before = j.state()
    streams = [Idle(j.server.address, method=method) for _ in range(DATA_THREADS)]
    j.attackers.extend(streams)
    poll(lambda: sum(s.refused() for s in streams) >= DATA_THREADS - CONTROL_STREAMS,
         what=f"{method} streams beyond {CONTROL_STREAMS} to be refused")
    refused = [s for s in streams if s.refused()]
    assert len(refused) == DATA_THREADS - CONTROL_STREAMS
    assert "health and reflection streams are open" in refused[0].call.details()
    assert sum(not s.done() for s in streams) == CONTROL_STREAMS

    assert j.serving(j.server.address) == health_pb2.HealthCheckResponse.SERVING
    assert j.state() == before
    trains(j.client, SHAPES)
    # closed streams give their places back
    for s in streams:
        s.close()
    poll(lambda: j.server.stream_guard.streams() == {}, what="the closed streams to be uncounted")
    again = Idle(j.server.address, method=method)
    j.attackers.append(again)
    poll(lambda: j.server.stream_guard.streams() != {}, what=f"a new {method} stream to be admitted")
    assert not again.done()


def test_seventy_health_watches_leave_the_scheduler_serving(job):
    """About 70 tokenless Health.Watch streams used to take the scheduler's 64 threads, and
    servers and workers missed their leases."""
    j = job()
    with grpcutil.channel(j.scheduler.address) as ch:
        sched = scheduler_pb2_grpc.SchedulerStub(ch)
        view = sched.Status(spb.StatusRequest(), timeout=TIMEOUT_S).view
        streams = [Idle(j.scheduler.address, method="watch") for _ in range(70)]
        j.attackers.extend(streams)
        poll(lambda: sum(s.refused() for s in streams) >= 70 - CONTROL_STREAMS,
             what="health watches beyond the control streams to be refused")
        st = sched.Status(spb.StatusRequest(), timeout=TIMEOUT_S)
        assert st.view == view
        assert [s.state for s in st.servers] == [spb.MEMBER_STATE_ALIVE]
        assert j.serving(j.scheduler.address, SCHEDULER) == health_pb2.HealthCheckResponse.SERVING
        trains(j.client, SHAPES, sched)   # heartbeats reach the scheduler
