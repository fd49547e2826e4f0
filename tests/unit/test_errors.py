"""pscommon.errors: the one table between typed errors and gRPC status codes, both ways."""
from __future__ import annotations

import grpc
import pytest

from shardps.pscommon import errors, grpcutil
from shardps.pscommon.errors import PSError, from_rpc_error, servicer_errors


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


ERROR_TYPES = sorted(set(_subclasses(PSError)), key=lambda c: c.__name__)
# the types a bare status code names (a peer that sends no ErrorInfo): one per code
CODE_TYPES = [c for c in ERROR_TYPES if c.__bases__ == (PSError,)]


class FakeRpcError(grpc.RpcError):
    """A value with the shape of a failed call's error (what grpc raises to a client)."""

    def __init__(self, code: grpc.StatusCode, details: str | None):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("cls", CODE_TYPES, ids=lambda c: c.__name__)
def test_every_code_type_maps_to_its_code_and_back(cls):
    err = FakeRpcError(cls.code, "the details")
    back = from_rpc_error(err)
    assert type(back) is cls
    assert str(back) == "the details"
    assert back.__cause__ is err


def test_each_status_code_belongs_to_one_code_type():
    codes = [cls.code for cls in CODE_TYPES]
    assert len(codes) == len(set(codes))


def test_each_error_type_has_its_own_reason():
    reasons = [cls.reason for cls in ERROR_TYPES]
    assert len(reasons) == len(set(reasons)), reasons
    assert errors.StaleIncarnation.reason == "STALE_INCARNATION"


def test_a_refinement_keeps_its_parents_code_so_broad_handlers_still_catch_it():
    assert errors.StaleIncarnation.code == grpc.StatusCode.FAILED_PRECONDITION
    assert issubclass(errors.StaleIncarnation, errors.FailedPrecondition)


def test_a_status_without_error_info_is_typed_by_its_code_alone():
    back = from_rpc_error(FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "x"))
    assert type(back) is errors.FailedPrecondition


@pytest.mark.parametrize("code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS])
def test_unmapped_codes_become_internal(code):
    assert type(from_rpc_error(FakeRpcError(code, "x"))) is errors.Internal


def test_missing_details_fall_back_to_the_code_name():
    assert str(from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, ""))) == "NOT_FOUND"


def test_retryable_errors_are_the_transient_ones():
    assert {c for c in ERROR_TYPES if c.retryable} == {
        errors.Unavailable, errors.NotYetMember, errors.DeadlineExceeded, errors.Aborted}


# --- the servicer boundary, on a real in-process server --------------------------------

SERVICE = "shardps.test.Errors"


class _Servicer:
    @servicer_errors
    def Raise(self, request, context):
        """Raise the PSError subclass named by the request, with a fixed message and metadata."""
        cls = {c.__name__: c for c in ERROR_TYPES}[request.decode()]
        raise cls(f"a {cls.__name__} with a message nobody parses", member=7, incarnation=3)

    @servicer_errors
    def Invalid(self, request, context):
        raise errors.InvalidArgument(f"tensor {request.decode()!r} is bad")

    @servicer_errors
    def Crash(self, request, context):
        raise ValueError("boom")

    @servicer_errors
    def Ok(self, request, context):
        return request[::-1]

    @servicer_errors
    def Abort(self, request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "go away")

    @servicer_errors
    def StreamThenFail(self, request, context):
        yield b"first"
        raise errors.ResourceExhausted("too much")

    @servicer_errors
    def StreamCrash(self, request, context):
        yield b"first"
        raise KeyError("k")


def _identity(b):
    return b


@pytest.fixture(scope="module")
def stub():
    svc = _Servicer()
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(svc, name), _identity, _identity)
                for name in ("Raise", "Invalid", "Crash", "Ok", "Abort")}
    handlers.update({name: grpc.unary_stream_rpc_method_handler(getattr(svc, name), _identity, _identity)
                     for name in ("StreamThenFail", "StreamCrash")})
    server = grpcutil.make_server(max_workers=2)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    address = grpcutil.bind(server, "127.0.0.1:0")
    server.start()
    channel = grpcutil.channel(address)

    def call(name, request=b"", stream=False):
        make = channel.unary_stream if stream else channel.unary_unary
        return make(f"/{SERVICE}/{name}", _identity, _identity)(request, timeout=30)

    yield call
    channel.close()
    server.stop(0).wait()


def test_typed_error_becomes_its_status_with_the_message(stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub("Invalid", b"w")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details() == "tensor 'w' is bad"


@pytest.mark.parametrize("cls", ERROR_TYPES, ids=lambda c: c.__name__)
def test_every_error_type_crosses_a_real_call_as_itself_with_its_metadata(stub, cls):
    with pytest.raises(PSError) as exc:
        grpcutil.call(lambda req, timeout: stub("Raise", req), cls.__name__.encode(), timeout=30)
    assert type(exc.value) is cls
    assert exc.value.metadata == {"member": "7", "incarnation": "3"}
    assert str(exc.value) == f"a {cls.__name__} with a message nobody parses"


def test_typed_error_comes_back_as_the_same_type_through_call(stub):
    with pytest.raises(errors.InvalidArgument, match="tensor 'w' is bad"):
        grpcutil.call(lambda req, timeout: stub("Invalid", req), b"w", timeout=30)


def test_unexpected_exception_becomes_internal_never_unknown(stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub("Crash")
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "ValueError" in exc.value.details() and "boom" in exc.value.details()


def test_successful_call_passes_through(stub):
    assert stub("Ok", b"abc") == b"cba"


def test_explicit_abort_keeps_its_own_code(stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub("Abort")
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert exc.value.details() == "go away"


def test_streaming_handler_error_after_a_message_keeps_its_code(stub):
    got = []
    with pytest.raises(grpc.RpcError) as exc:
        for msg in stub("StreamThenFail", stream=True):
            got.append(msg)
    assert got == [b"first"]
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.value.details() == "too much"


def test_streaming_handler_crash_becomes_internal(stub):
    with pytest.raises(grpc.RpcError) as exc:
        list(stub("StreamCrash", stream=True))
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "KeyError" in exc.value.details()


# -- waits that say what they wait for ---------------------------------------------------------
@pytest.mark.parametrize("waited,notices,due", [
    (0.0, 0, False), (1.9, 0, False), (2.0, 0, True), (6.9, 1, False), (7.0, 1, True), (30.0, 1, True),
    (30.0, 6, False)])
def test_a_wait_says_so_after_two_seconds_then_every_five(waited, notices, due):
    assert grpcutil.notice_due(waited, notices) is due


def test_retry_reports_its_wait_with_the_last_error():
    """A wait of fake seconds: fn fails until its tenth call; `waiting` hears of it on schedule."""
    clock = [0.0]
    calls, heard = [], []

    def fn():
        calls.append(clock[0])
        if len(calls) < 10:
            raise errors.Unavailable(f"no server yet ({len(calls)})")
        return "up"

    def sleep(s):
        clock[0] += 1.0

    got = grpcutil.retry(fn, 60, sleep=sleep, waiting=lambda exc, s: heard.append((str(exc), s)),
                         now=lambda: clock[0])
    assert got == "up"
    assert heard == [("no server yet (3)", 2.0), ("no server yet (8)", 7.0)]
