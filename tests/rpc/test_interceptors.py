"""pscommon.interceptors on a real in-process gRPC server: the four handler kinds, wrapped."""
from __future__ import annotations

import contextlib
from concurrent import futures

import grpc
import pytest

from shardps.pscommon import grpcutil, interceptors

SERVICE = "shardps.test.Echo"
CALL_TIMEOUT_S = 30.0
KINDS = {"UnaryUnary": (False, False), "UnaryStream": (False, True),
         "StreamUnary": (True, False), "StreamStream": (True, True)}


def _decode(data: bytes) -> str:
    return data.decode()


def _encode(text: str) -> bytes:
    return text.encode()


def _behaviour(kind, log: list[str]):
    """Echo, upper-cased; a streaming reply sends each request (or the one request) twice."""
    request_streaming, response_streaming = kind

    def texts(request):
        return list(request) if request_streaming else [request]

    if response_streaming:
        def respond(request, context):
            for text in texts(request) * 2:
                log.append("item")
                yield text.upper()
        return respond

    def reply(request, context):
        log.append("item")
        return "+".join(texts(request)).upper()
    return reply


class Recorder(grpc.ServerInterceptor):
    """Logs entry and exit of every call's scope; marks requests through wrap_handler."""

    def __init__(self, log: list[str]):
        self.log = log

    @contextlib.contextmanager
    def _scope(self, context):
        self.log.append("enter")
        try:
            yield
        finally:
            self.log.append("exit")

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        # the behaviour as it is, with another request deserializer: each request gets a "<"
        marked = interceptors.wrap_handler(handler, lambda fn: fn, request_deserializer=lambda b: "<" + b.decode())
        return interceptors.around(marked, self._scope)


@pytest.fixture
def echo():
    log: list[str] = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[Recorder(log)])
    handlers = {name: interceptors.make_handler(kind, _behaviour(kind, log), _decode, _encode)
                for name, kind in KINDS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    address = grpcutil.bind(server, "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(address)
    yield channel, log
    channel.close()
    server.stop(0).wait()


def _stub(channel, name):
    factory = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
               (True, False): channel.stream_unary, (True, True): channel.stream_stream}[KINDS[name]]
    return factory(f"/{SERVICE}/{name}", request_serializer=_encode, response_deserializer=_decode)


@pytest.mark.parametrize("name, expected", [
    ("UnaryUnary", "<A"),
    ("UnaryStream", ["<A", "<A"]),
    ("StreamUnary", "<A+<B"),
    ("StreamStream", ["<A", "<B", "<A", "<B"]),
])
def test_every_kind_keeps_its_shape_and_runs_inside_the_scope(echo, name, expected):
    channel, log = echo
    request_streaming, response_streaming = KINDS[name]
    request = iter(["a", "b"]) if request_streaming else "a"
    reply = _stub(channel, name)(request, timeout=CALL_TIMEOUT_S)
    got = list(reply) if response_streaming else reply
    assert got == expected
    # a streaming reply's scope closes after its last item, not when the handler returns
    assert log == ["enter"] + ["item"] * (len(expected) if response_streaming else 1) + ["exit"]


def test_make_handler_defaults_to_no_serializers():
    handler = interceptors.make_handler(interceptors.UNARY, lambda request, context: None)
    assert handler.unary_unary is not None and not handler.request_streaming
    assert handler.request_deserializer is None and handler.response_serializer is None
    assert interceptors.kind_of(handler) == (False, False)
