"""Typed errors and the one table that maps them to gRPC status codes.

Code inside shardps raises these. Servicers convert them to a status at the boundary
(`abort_with`), clients convert a status back (`from_rpc_error`), so a caller catches
`FailedPrecondition` whether the check ran locally or on a server.
"""
from __future__ import annotations

import functools
import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class PSError(Exception):
    """Base of every shardps error; `code` is its gRPC status."""

    code = grpc.StatusCode.INTERNAL
    retryable = False


class InvalidArgument(PSError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(PSError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(PSError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(PSError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(PSError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(PSError):
    """The peer is down, draining or not ready yet: retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(PSError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Aborted(PSError):
    """The request raced with a state change (a late sync push): pull again and retry."""

    code = grpc.StatusCode.ABORTED
    retryable = True


class Cancelled(PSError):
    code = grpc.StatusCode.CANCELLED


class Internal(PSError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (
    InvalidArgument, FailedPrecondition, NotFound, Unauthenticated, ResourceExhausted,
    Unavailable, DeadlineExceeded, Aborted, Cancelled, Internal)}


def from_rpc_error(err: grpc.RpcError) -> PSError:
    """The typed error for a failed call (UNKNOWN and unmapped codes become Internal)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, Internal)
    exc = cls(details or (code.name if code else "rpc failed"))
    exc.__cause__ = err
    return exc


def _abort(context: grpc.ServicerContext, exc: Exception):
    if isinstance(exc, PSError):
        context.abort(exc.code, str(exc))
    log.exception("unexpected error in servicer")
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def servicer_errors(method):
    """Decorate a servicer method: PSError -> its status code; anything else -> INTERNAL, logged.

    Works for unary and response-streaming handlers (generators).
    """
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def gen_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except PSError as exc:
                _abort(context, exc)
            except Exception as exc:  # noqa: BLE001 - the boundary: nothing escapes as UNKNOWN
                if _is_abort(exc):
                    raise
                _abort(context, exc)
        return gen_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except PSError as exc:
            _abort(context, exc)
        except Exception as exc:  # noqa: BLE001
            if _is_abort(exc):
                raise
            _abort(context, exc)
    return wrapper


def _is_abort(exc: Exception) -> bool:
    # grpc's ServicerContext.abort records the status, then raises a bare Exception(): let it
    # through so the recorded code stands
    return (type(exc) is Exception and not exc.args) or type(exc).__module__.startswith("grpc")
