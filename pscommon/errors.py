"""Typed errors and the one table that maps them to gRPC status codes.

Code inside shardps raises these. Servicers convert them to a status at the boundary
(`servicer_errors`), clients convert a status back (`from_rpc_error`), so a caller catches
`FailedPrecondition` whether the check ran locally or on a server.

The status carries the error's type, not only its code: a `google.rpc.ErrorInfo` detail
(domain "shardps", reason = the class's `reason`) rides in the status trailer, and the client
rebuilds the same class from it. Two errors that share a code (a stale incarnation and any
other failed precondition) stay apart, and no caller ever decides by reading the message.
"""
from __future__ import annotations

import functools
import inspect
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "shardps"

log = logging.getLogger(__name__)


class PSError(Exception):
    """Base of every shardps error; `code` is its gRPC status, `reason` its ErrorInfo reason
    (unique per class: the client maps it back), `metadata` facts a caller may act on."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"
    retryable = False

    def __init__(self, message: str = "", **metadata: object):
        super().__init__(message)
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "reason" not in cls.__dict__:  # one reason per class, from its name unless given
            cls.reason = "".join(f"_{c}" if c.isupper() else c.upper() for c in cls.__name__).lstrip("_")


class InvalidArgument(PSError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(PSError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleIncarnation(FailedPrecondition):
    """The caller's (member id, incarnation) is no longer current: it was declared dead, left,
    or a newer incarnation exists. A worker recovers by joining again under its id."""


class ShardHeld(FailedPrecondition):
    """A server registered for a shard whose server still holds a live lease. The message and
    the metadata name the holder (member, incarnation, address) and `retry_after_s`, how long
    until its lease lapses: a restarted server waits that long for its crashed predecessor's
    lease, anyone else is refused for as long as the holder heartbeats."""


class ShardEmpty(FailedPrecondition):
    """A pull or push named a model the shard does not hold: its server restarted with no
    state. A worker answers by offering its copy of the shard (a Declare with a seed offer);
    the metadata name the `shard`."""


class Superseded(FailedPrecondition):
    """A newer server for this shard has claimed its checkpoint directory: this process's copy
    is stale, and a checkpoint of it would become the newest one there. The metadata name the
    `shard` and the claimant's `incarnation`."""


class NotFound(PSError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(PSError):
    code = grpc.StatusCode.UNAUTHENTICATED


class BadCredential(Unauthenticated):
    """A call made as a member (a heartbeat, a leave, a rejoin, a push or pull) without that
    member's credential, or with another's. Nothing changed; the metadata name the `member`
    and `incarnation` the call claimed."""


class PermissionDenied(PSError):
    """A caller whose bearer token is valid but whose role may not call this method
    (pscommon/roles.py). Nothing ran; the metadata name the `role` and the `method`."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(PSError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(PSError):
    """The peer is down, draining or not ready yet: retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class NotYetMember(Unavailable):
    """A shard's membership view does not name the caller yet: its incarnation is newer than
    any the view holds, so the worker joined after the view the shard last heard of. The
    worker retries; the watch stream brings the view within moments."""


class DeadlineExceeded(PSError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Aborted(PSError):
    """The request raced with a state change (a late sync push): pull again and retry."""

    code = grpc.StatusCode.ABORTED
    retryable = True


class Cancelled(PSError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(PSError):
    """The peer does not serve this method: most often an address of another role (a server's
    address where the scheduler's belongs), or not shardps at all."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(PSError):
    code = grpc.StatusCode.INTERNAL


_CLASSES = (InvalidArgument, FailedPrecondition, StaleIncarnation, ShardHeld, ShardEmpty, Superseded, NotFound,
            Unauthenticated, BadCredential, PermissionDenied, ResourceExhausted, Unavailable, NotYetMember,
            DeadlineExceeded, Aborted, Cancelled, Unimplemented, Internal)
# a status without our ErrorInfo (another server, grpc itself) is typed by its code alone
_BY_CODE = {cls.code: cls for cls in _CLASSES if cls.__bases__ == (PSError,)}
_BY_REASON = {cls.reason: cls for cls in _CLASSES}


def to_status(exc: PSError) -> grpc.Status:
    """The status a servicer aborts with: code, message and the ErrorInfo that names the type."""
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(
        code=code_pb2.Code.Value(exc.code.name), message=str(exc), details=[detail]))


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    except ValueError:  # a trailer that disagrees with the call's code: trust the code
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None


def from_rpc_error(err: grpc.RpcError) -> PSError:
    """The typed error for a failed call: by its ErrorInfo reason where a shardps peer sent
    one, else by code (UNKNOWN and unmapped codes become Internal)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    info = _error_info(err)
    cls = _BY_REASON.get(info.reason) if info is not None else None
    if cls is None or cls.code != code:
        cls = _BY_CODE.get(code, Internal)
    exc = cls(details or (code.name if code else "rpc failed"), **(dict(info.metadata) if info else {}))
    exc.__cause__ = err
    return exc


def _abort(context: grpc.ServicerContext, exc: Exception):
    if isinstance(exc, PSError):
        context.abort_with_status(to_status(exc))
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
