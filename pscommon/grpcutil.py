"""gRPC plumbing shared by every role: message caps, channels, servers, deadlines, retries."""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from concurrent import futures
from typing import Callable, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardps.pscommon import interceptors
from shardps.pscommon.errors import PSError, from_rpc_error
from shardps.pscommon.security import NO_SECURITY, Security, add_port, secure_channel, server_interceptors

log = logging.getLogger(__name__)

# A message is at most one BATCH_BYTES transfer (4 MiB) or one 2 MiB chunk, plus framing: 8 MiB leaves room and still refuses abuse.
MAX_MESSAGE_BYTES = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # each target gets its own TCP connection rather than sharing a global subchannel
    ("grpc.use_local_subchannel_pool", 1),
    # reconnect quickly after an outage (gRPC's default backoff grows to 120 s, longer than a
    # lease): a restarted scheduler or shard is found within about two seconds
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]

# Default deadlines (seconds): control calls are small; data calls scale with the model.
CONTROL_TIMEOUT_S = 10.0
DATA_TIMEOUT_S = 120.0


def channel(address: str, security: Security = NO_SECURITY) -> grpc.Channel:
    """A channel with shardps's message caps (TLS and token when `security` says so)."""
    return secure_channel(address, security, CHANNEL_OPTIONS)


class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


class MalformedRequests(grpc.ServerInterceptor):
    """Request bytes that do not parse as the method's message get INVALID_ARGUMENT (gRPC
    itself would answer INTERNAL): the parse error travels to the handler as a value, and
    the handler's wrapper aborts with it."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
                return _Undecodable(exc)

        def check(request, context):
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"malformed {details.method} request: {request.error}")
            return request

        def checked(requests, context):
            for r in requests:
                yield check(r, context)

        def wrap(fn):
            if handler.request_streaming:
                return lambda reqs, ctx: fn(checked(reqs, ctx), ctx)
            return lambda req, ctx: fn(check(req, ctx), ctx)
        return interceptors.wrap_handler(handler, wrap, request_deserializer=lenient)


def make_server(max_workers: int = 16, security: Security = NO_SECURITY,
                interceptors: tuple = ()) -> grpc.Server:
    """A gRPC server; authentication runs before every other interceptor, then requests that
    do not parse are refused."""
    chain = server_interceptors(security) + [MalformedRequests()] + list(interceptors)
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
                       options=SERVER_OPTIONS, maximum_concurrent_rpcs=256, interceptors=chain)


def bind(server: grpc.Server, listen: str, security: Security = NO_SECURITY) -> str:
    """Bind `listen` (host:port, port 0 = any free port); returns the bound host:port."""
    host, _, _ = listen.rpartition(":")
    return f"{host}:{add_port(server, listen, security)}"


def enable_reflection(server: grpc.Server, service_names: list[str]) -> None:
    """gRPC server reflection (for grpcurl), behind the daemons' --reflection flag."""
    from grpc_reflection.v1alpha import reflection
    # the health service too: probes and operators call it through grpcurl
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([*service_names, health_name, reflection.SERVICE_NAME], server)


def add_health(server: grpc.Server) -> health.HealthServicer:
    svc = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(svc, server)
    return svc


def set_serving(svc: health.HealthServicer, service: str, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    svc.set(service, status)
    svc.set("", status)


T = TypeVar("T")


def call(fn: Callable[..., T], request, timeout: float, **kwargs) -> T:
    """One unary call with a deadline; gRPC errors come back as typed PSErrors."""
    try:
        return fn(request, timeout=timeout, **kwargs)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter."""

    base_s: float = 0.05
    cap_s: float = 2.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        upper = min(self.cap_s, self.base_s * self.factor ** attempt)
        return (rng or random).uniform(0, upper)


# a wait says what it waits for soon after it starts, then every few seconds: silence for a
# minute reads as a hang
FIRST_NOTICE_S = 2.0
NOTICE_EVERY_S = 5.0


def notice_due(waited_s: float, notices: int, first_s: float = FIRST_NOTICE_S,
               every_s: float = NOTICE_EVERY_S) -> bool:
    """Whether a wait that has lasted `waited_s` and said so `notices` times should say so again."""
    return waited_s >= first_s + notices * every_s


def retry(fn: Callable[[], T], deadline_s: float, backoff: Backoff = Backoff(),
          retry_on: Callable[[PSError], bool] = lambda e: e.retryable,
          sleep: Callable[[float], None] = time.sleep,
          waiting: Callable[[PSError, float], None] | None = None,
          now: Callable[[], float] = time.monotonic) -> T:
    """Call fn until it succeeds, a non-retryable error occurs, or deadline_s passes.

    `waiting(last_error, seconds_so_far)` is called soon after the first failure and then every
    few seconds (`notice_due`), so a caller can say what it is waiting for.
    """
    start = now()
    end = start + deadline_s
    attempt = notices = 0
    while True:
        try:
            return fn()
        except PSError as exc:
            if not retry_on(exc) or now() >= end:
                raise
            waited = now() - start
            if waiting is not None and notice_due(waited, notices):
                waiting(exc, waited)
                notices += 1
            pause = min(backoff.delay(attempt), max(0.0, end - now()))
            log.debug("retrying after %s: %.3fs", exc, pause)
            sleep(pause)
            attempt += 1
