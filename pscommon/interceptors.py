"""Building and wrapping gRPC method handlers, whatever their streaming kind, and the stream
guard every daemon's server runs.

grpc.RpcMethodHandler keeps its behaviour in one of four attributes, one per kind, and has
a factory per kind; every server interceptor that changes a behaviour needs the same
four-way dispatch. It lives here once, so an interceptor only says what it adds.

`StreamGuard` keeps idle callers from holding every thread of a sync gRPC server: the
health and reflection services run on a small pool of their own, streaming calls are capped
per connection, and a request stream that sends nothing is ended (config.StreamLimits).
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from concurrent import futures
from typing import Any, Callable, ContextManager

import grpc

from shardps.pscommon import errors
from shardps.pscommon.config import StreamLimits

log = logging.getLogger(__name__)

Behaviour = Callable[[Any, grpc.ServicerContext], Any]
# (request_streaming, response_streaming)
Kind = tuple[bool, bool]
UNARY: Kind = (False, False)

_FACTORIES = {(False, False): grpc.unary_unary_rpc_method_handler,
              (False, True): grpc.unary_stream_rpc_method_handler,
              (True, False): grpc.stream_unary_rpc_method_handler,
              (True, True): grpc.stream_stream_rpc_method_handler}
_SAME = object()


def kind_of(handler: grpc.RpcMethodHandler) -> Kind:
    return bool(handler.request_streaming), bool(handler.response_streaming)


def behaviour_of(handler: grpc.RpcMethodHandler) -> Behaviour:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def make_handler(kind: Kind, behaviour: Behaviour, request_deserializer=None,
                 response_serializer=None) -> grpc.RpcMethodHandler:
    """A handler of `kind` running `behaviour`."""
    return _FACTORIES[kind](behaviour, request_deserializer=request_deserializer,
                            response_serializer=response_serializer)


def wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour], Behaviour],
                 request_deserializer=_SAME) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by `wrap(behaviour)`: same kind, same response
    serializer, and the same request deserializer unless one is given."""
    parse = handler.request_deserializer if request_deserializer is _SAME else request_deserializer
    old = behaviour_of(handler)
    return make_handler(kind_of(handler), _keep_pool(old, wrap(old)), parse, handler.response_serializer)


def _keep_pool(old: Behaviour, new: Behaviour) -> Behaviour:
    """gRPC runs a behaviour on its `experimental_thread_pool` when it has one (StreamGuard
    sets it on health and reflection); a wrapper around it must run there too."""
    pool = getattr(old, "experimental_thread_pool", None)
    if pool is None or getattr(new, "experimental_thread_pool", None) is pool:
        return new
    try:
        new.experimental_thread_pool = pool
    except AttributeError:   # a bound method or builtin: wrap it in a plain function
        inner = new

        def new(request, context):
            return inner(request, context)
        new.experimental_thread_pool = pool
    return new


def around(handler: grpc.RpcMethodHandler,
           scope: Callable[[grpc.ServicerContext], ContextManager]) -> grpc.RpcMethodHandler:
    """`handler` with every call run inside `scope(context)`; for a streaming response the
    scope lasts until the stream ends, not just until the handler returns its iterator."""
    if handler.response_streaming:
        def wrap(fn):
            def streaming(request, context):
                with scope(context):
                    yield from fn(request, context)
            return streaming
    else:
        def wrap(fn):
            def unary(request, context):
                with scope(context):
                    return fn(request, context)
            return unary
    return wrap_handler(handler, wrap)


# -- the stream guard -----------------------------------------------------------------------
# Served on the guard's own pool: probes and grpcurl answer however busy the data plane is.
CONTROL_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (`ipv4:10.0.0.5:4242`, `ipv6:[::1]:4242`, either maybe
    percent-encoded): every connection from one machine shares it, whatever its port. Other
    forms (`unix:/path`) come back whole."""
    text = urllib.parse.unquote(peer or "")
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in ("ipv4", "ipv6"):
        return text
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return rest
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End a call from a thread other than its handler's (whose own thread may be blocked
    reading the request stream). The public `cancel()` reaches the caller as a bare
    CANCELLED; where this grpcio's call object allows it, the caller gets `code` and
    `message` instead."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is not None:
        try:
            call.cancel(code.value[0], message)
            return
        except Exception:  # noqa: BLE001 - another grpcio: the public API below still ends it
            log.debug("cancel with a status failed; cancelling plainly", exc_info=True)
    context.cancel()


class IdleGuard:
    """A request stream that fails, instead of waiting on, once its watch has ended it:
    `waiting_since` is set while the handler waits for the next message. After an expiry the
    underlying iterator may end as if the caller had finished; this raises instead, so a
    handler never mistakes a cut-off stream for a complete one."""

    def __init__(self, requests, context: grpc.ServicerContext, method: str, watch: "IdleWatch"):
        self._it = iter(requests)
        self.context = context
        self.method = method
        self.waiting_since: float | None = None
        self.expired = False
        self._watch = watch

    def __iter__(self):
        return self

    def __next__(self):
        if self.expired:
            raise self.error()
        self.waiting_since = self._watch.now()
        try:
            return next(self._it)
        except BaseException:
            if self.expired:
                raise self.error() from None
            raise
        finally:
            self.waiting_since = None

    def idle_for(self, now: float) -> float | None:
        since = self.waiting_since
        return None if since is None else now - since

    def message(self) -> str:
        t = self._watch.timeout_s
        return (f"{self.method} stream idle: no message for {t:g} s, this server's stream idle timeout "
                f"(--stream-idle-timeout); the stream was ended")

    def error(self) -> errors.DeadlineExceeded:
        return errors.DeadlineExceeded(self.message(), limit="idle_timeout_s",
                                       idle_timeout_s=f"{self._watch.timeout_s:g}")

    def expire(self) -> None:
        """Called by the watch's thread: mark the stream, then end the call (which wakes the
        handler's thread if it is waiting)."""
        if self.expired:
            return
        self.expired = True
        log.warning("%s from %s: no message for %.1f s; ending the stream", self.method,
                    self.context.peer(), self._watch.timeout_s)
        end_call(self.context, grpc.StatusCode.DEADLINE_EXCEEDED, self.message())


class IdleWatch:
    """Ends request streams whose handler has waited `timeout_s` for a message. One thread,
    awake only while streams are open; `sweep(now)` is the decision, with any clock."""

    def __init__(self, timeout_s: float, now: Callable[[], float] = time.monotonic):
        if not timeout_s > 0:
            raise errors.InvalidArgument(f"idle timeout {timeout_s} must be > 0 seconds")
        self.timeout_s = timeout_s
        self.now = now
        self._streams: set[IdleGuard] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def guard(self, requests, context: grpc.ServicerContext, method: str) -> IdleGuard:
        g = IdleGuard(requests, context, method, self)
        with self._cond:
            self._streams.add(g)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, daemon=True, name="idle-watch")
                self._thread.start()
            self._cond.notify_all()
        return g

    def release(self, g: IdleGuard) -> None:
        with self._cond:
            self._streams.discard(g)

    def open(self) -> int:
        with self._cond:
            return len(self._streams)

    def sweep(self, now: float) -> list[IdleGuard]:
        """End every stream that has waited for a message since `now - timeout_s` or earlier;
        returns them."""
        with self._cond:
            streams = list(self._streams)
        gone = []
        for g in streams:
            idle = g.idle_for(now)
            if idle is not None and idle >= self.timeout_s and not g.expired:
                gone.append(g)
        for g in gone:
            g.expire()
        return gone

    def _run(self) -> None:
        tick = min(max(self.timeout_s / 4, 0.01), 1.0)
        while True:
            with self._cond:
                while not self._streams and not self._closed:
                    self._cond.wait()
                if self._closed or self._cond.wait_for(lambda: self._closed, timeout=tick):
                    return
            try:
                self.sweep(self.now())
            except Exception:  # noqa: BLE001 - the watch must outlive any one stream
                log.exception("idle stream watch: unexpected error")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class StreamGuard(grpc.ServerInterceptor):
    """What keeps a few idle callers from taking every thread of a sync gRPC server
    (config.StreamLimits):

    - the health and reflection services run on `control_pool`, a pool of their own, and at
      most `max_control_streams` of their streams (Health.Watch, reflection) are open at once;
    - a connection (`context.peer()`: host and port) holds at most
      `max_streams_per_connection` streaming calls at once;
    - a request stream whose handler waits `idle_timeout_s` for a message is ended
      (DEADLINE_EXCEEDED, and the handler sees the same error, never a finished stream).

    Refusals are RESOURCE_EXHAUSTED with a message naming the limit. Unary data-plane calls
    pass through untouched. Put it last in a server's interceptors, so the calls it counts
    are authenticated ones; `close()` after the server stops."""

    def __init__(self, limits: StreamLimits = StreamLimits(), now: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.control_pool = futures.ThreadPoolExecutor(limits.control_threads, thread_name_prefix="control")
        self.idle = IdleWatch(limits.idle_timeout_s, now) if limits.idle_timeout_s > 0 else None
        self._lock = threading.Lock()
        self._per_connection: dict[str, int] = {}
        self._control_streams = 0

    def streams(self) -> dict[str, int]:
        """Open streaming calls by connection (for tests and debugging)."""
        with self._lock:
            return dict(self._per_connection)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method or ""
        control = method.startswith(CONTROL_PREFIXES)
        streaming = bool(handler.request_streaming or handler.response_streaming)
        if not control and not streaming:
            return handler
        name = method.rsplit("/", 1)[-1] or method
        guard_requests = bool(handler.request_streaming) and self.idle is not None

        def enter(request, context):
            peer = self._admit(context, name, control) if streaming else None
            guard = self.idle.guard(request, context, name) if guard_requests else None
            return peer, guard, (guard if guard is not None else request)

        def leave(peer, guard):
            if guard is not None:
                self.idle.release(guard)
            if peer is not None:
                self._release(peer, control)

        if handler.response_streaming:
            def wrap(fn):
                def streaming_call(request, context):
                    peer, guard, request = enter(request, context)
                    try:
                        yield from fn(request, context)
                    finally:
                        leave(peer, guard)
                return self._placed(streaming_call, control)
        else:
            def wrap(fn):
                def unary_call(request, context):
                    peer, guard, request = enter(request, context)
                    try:
                        return fn(request, context)
                    finally:
                        leave(peer, guard)
                return self._placed(unary_call, control)
        return wrap_handler(handler, wrap)

    def _placed(self, behaviour: Behaviour, control: bool) -> Behaviour:
        if control:
            behaviour.experimental_thread_pool = self.control_pool
        return behaviour

    def _admit(self, context: grpc.ServicerContext, name: str, control: bool) -> str:
        """Count a new streaming call against its connection (and the control streams); abort
        it with RESOURCE_EXHAUSTED when that would pass a limit."""
        peer = context.peer()
        cap = self.limits.max_streams_per_connection
        refusal = None
        with self._lock:
            held = self._per_connection.get(peer, 0)
            if control and self._control_streams >= self.limits.max_control_streams:
                most = self.limits.max_control_streams
                refusal = errors.ResourceExhausted(
                    f"{name}: {self._control_streams} health and reflection streams are open, the most "
                    f"this server serves at once ({most}); use Health.Check, or try again later",
                    limit="max_control_streams", max_control_streams=most)
            elif cap and held >= cap:
                refusal = errors.ResourceExhausted(
                    f"{name} from {peer}: this connection has {held} streams open, the most one connection "
                    f"may hold ({cap}, --max-streams-per-connection); finish some before opening more",
                    limit="max_streams_per_connection", max_streams_per_connection=cap, peer=peer)
            else:
                self._per_connection[peer] = held + 1
                if control:
                    self._control_streams += 1
        if refusal is not None:
            log.debug("refused: %s", refusal)
            context.abort_with_status(errors.to_status(refusal))
        return peer

    def _release(self, peer: str, control: bool) -> None:
        with self._lock:
            left = self._per_connection.get(peer, 0) - 1
            if left > 0:
                self._per_connection[peer] = left
            else:
                self._per_connection.pop(peer, None)
            if control:
                self._control_streams -= 1

    def close(self) -> None:
        """Stop the idle watch and the control pool (after the server has stopped)."""
        if self.idle is not None:
            self.idle.close()
        self.control_pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["Behaviour", "CONTROL_PREFIXES", "IdleGuard", "IdleWatch", "Kind", "StreamGuard", "UNARY", "around",
           "behaviour_of", "end_call", "kind_of", "make_handler", "peer_host", "wrap_handler"]
