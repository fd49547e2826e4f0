"""Building and wrapping gRPC method handlers, whatever their streaming kind.

grpc.RpcMethodHandler keeps its behaviour in one of four attributes, one per kind, and has
a factory per kind; every server interceptor that changes a behaviour needs the same
four-way dispatch. It lives here once, so an interceptor only says what it adds.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager

import grpc

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
    return make_handler(kind_of(handler), wrap(behaviour_of(handler)), parse, handler.response_serializer)


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


__all__ = ["Behaviour", "Kind", "UNARY", "around", "behaviour_of", "kind_of", "make_handler", "wrap_handler"]
