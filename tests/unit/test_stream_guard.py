"""pscommon.interceptors' stream guard without a network: the idle decision under an injected
clock, the guarded request iterator, peer hosts, and StreamLimits validation."""
from __future__ import annotations

import threading

import grpc
import pytest

from shardps.pscommon import interceptors
from shardps.pscommon.config import StreamLimits
from shardps.pscommon.errors import DeadlineExceeded, InvalidArgument
from shardps.pscommon.interceptors import IdleWatch, peer_host


class Context:
    """What the guard uses of a grpc.ServicerContext: the peer, and a cancel that records."""

    def __init__(self):
        self.cancelled = threading.Event()

    def peer(self):
        return "ipv4:127.0.0.1:4242"

    def cancel(self):
        self.cancelled.set()


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Stream:
    """A request iterator over `messages` that then ends, as gRPC's may after a cancel."""

    def __init__(self):
        self.messages: list = []

    def __iter__(self):
        return self

    def __next__(self):
        if not self.messages:
            raise StopIteration
        return self.messages.pop(0)


def _watch(timeout_s=1.0):
    clock = Clock()
    watch = IdleWatch(timeout_s, clock)
    return clock, watch


def test_a_stream_waiting_past_the_timeout_is_ended_and_then_fails():
    clock, watch = _watch(1.0)
    ctx = Context()
    g = watch.guard(Stream(), ctx, "Push")
    try:
        g.waiting_since = clock.t             # the handler is blocked in next()
        assert watch.sweep(clock.t + 0.99) == []
        assert watch.sweep(clock.t + 1.0) == [g]
        assert ctx.cancelled.is_set() and g.expired
        assert watch.sweep(clock.t + 5.0) == []   # once
        # the underlying stream then ends as if complete: the guard raises instead
        with pytest.raises(DeadlineExceeded) as exc:
            next(g)
        assert "Push stream idle" in str(exc.value) and "--stream-idle-timeout" in str(exc.value)
        assert exc.value.metadata["limit"] == "idle_timeout_s"
    finally:
        watch.close()


def test_a_stream_not_waiting_is_never_idle_and_each_message_restarts_the_clock():
    clock, watch = _watch(1.0)
    stream = Stream()
    g = watch.guard(stream, Context(), "Push")
    try:
        stream.messages = ["a", "b"]
        assert next(g) == "a"
        assert g.waiting_since is None        # the handler is working, not waiting
        assert watch.sweep(clock.t + 1000.0) == []
        clock.t += 50.0
        assert next(g) == "b"
        with pytest.raises(StopIteration):    # a finished stream ends normally
            next(g)
        assert not g.expired
    finally:
        watch.close()


def test_a_released_stream_is_no_longer_watched():
    clock, watch = _watch(1.0)
    g = watch.guard(Stream(), Context(), "Declare")
    g.waiting_since = clock.t
    watch.release(g)
    assert watch.open() == 0
    assert watch.sweep(clock.t + 10.0) == []
    watch.close()


def test_the_watch_thread_ends_a_waiting_stream_on_its_own():
    watch = IdleWatch(0.05)                   # the real clock and thread
    ctx = Context()
    blocked = threading.Event()

    class Blocking:
        def __iter__(self):
            return self

        def __next__(self):
            blocked.set()
            assert ctx.cancelled.wait(30.0), "the watch never ended the stream"
            raise StopIteration

    g = watch.guard(Blocking(), ctx, "Push")
    try:
        with pytest.raises(DeadlineExceeded):
            next(g)
        assert blocked.is_set()
    finally:
        watch.release(g)
        watch.close()


def test_wrap_handler_keeps_the_thread_pool_of_what_it_wraps():
    from concurrent import futures
    pool = futures.ThreadPoolExecutor(1)
    try:
        def behaviour(request, context):
            return request
        behaviour.experimental_thread_pool = pool
        handler = grpc.unary_unary_rpc_method_handler(behaviour)
        wrapped = interceptors.wrap_handler(handler, lambda fn: (lambda req, ctx: fn(req, ctx)))
        assert wrapped.unary_unary.experimental_thread_pool is pool
        twice = interceptors.around(wrapped, lambda ctx: threading.Lock())
        assert twice.unary_unary.experimental_thread_pool is pool
        assert twice.unary_unary(7, None) == 7
    finally:
        pool.shutdown()


@pytest.mark.parametrize("peer,host", [
    ("ipv4:127.0.0.1:4242", "127.0.0.1"),
    ("ipv6:[::1]:4242", "::1"),
    ("ipv6:%5B::1%5D:4242", "::1"),
    ("ipv6:[fe80::1%25eth0]:1", "fe80::1%eth0"),
    ("unix:/tmp/sock", "unix:/tmp/sock"),
    ("", ""),
])
def test_peer_host_drops_the_port(peer, host):
    assert peer_host(peer) == host


def test_stream_limits_defaults_and_validation():
    lim = StreamLimits()
    assert (lim.max_streams_per_connection, lim.idle_timeout_s, lim.control_threads) == (8, 30.0, 4)
    assert lim.max_control_streams == 2
    for bad in (dict(max_streams_per_connection=-1), dict(idle_timeout_s=-1.0),
                dict(idle_timeout_s=float("nan")), dict(control_threads=1)):
        with pytest.raises(InvalidArgument):
            StreamLimits(**bad)
    assert StreamLimits(max_streams_per_connection=0, idle_timeout_s=0).idle_timeout_s == 0   # both off
