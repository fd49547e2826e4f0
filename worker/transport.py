"""How a worker reaches the shards: one stub per shard, retries, address refresh, fan-out.

The transport knows addresses and calls, nothing about tensors or membership: callers hand it
a function of a stub, and it runs that function against the shard's current server until it
succeeds, fails for good, or the retry deadline passes. When a shard is unreachable it asks
`resolve` (the session: the scheduler's list of live servers) where the shard lives now.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Callable, TypeVar

import grpc

from shardps.pscommon import grpcutil
from shardps.pscommon.errors import Aborted, Cancelled, PSError, Unavailable, from_rpc_error
from shardps.pscommon.framing import parameter_server_stub
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.wire.v1 import ps_pb2_grpc

log = logging.getLogger("shardps.worker")
T = TypeVar("T")


class Transport:
    def __init__(self, resolve: Callable[[], dict[int, str]], retry_deadline_s: float,
                 security: Security = NO_SECURITY):
        self._resolve = resolve
        self._retry_deadline_s = retry_deadline_s
        self._security = security
        self._lock = threading.Lock()
        self._stubs: dict[int, tuple[str, ps_pb2_grpc.ParameterServerStub]] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="fanout")

    def set_servers(self, addresses: dict[int, str]) -> None:
        """Point each named shard at its address (a new channel only where it moved)."""
        with self._lock:
            for shard, address in addresses.items():
                current = self._stubs.get(shard)
                if current is None or current[0] != address:
                    self._stubs[shard] = (address, parameter_server_stub(grpcutil.channel(address, self._security)))

    def refresh(self) -> None:
        try:
            self.set_servers(self._resolve())
        except PSError as exc:
            log.debug("cannot refresh servers: %s", exc)

    def stub(self, shard: int) -> ps_pb2_grpc.ParameterServerStub:
        with self._lock:
            return self._stubs[shard][1]

    def call(self, shard: int, fn: Callable[[ps_pb2_grpc.ParameterServerStub], T]) -> T:
        """Run fn(stub) with retries on retryable errors (not ABORTED: the caller re-pulls);
        after UNAVAILABLE, re-resolve the shard's address first.

        A call the server cancelled is retried as UNAVAILABLE: a draining server that is
        stopping cancels the calls it accepted but never ran, and every call here is safe to
        repeat (pulls read, pushes are deduplicated by the shard's ledger)."""
        def attempt():
            try:
                return fn(self.stub(shard))
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                if isinstance(exc, Cancelled):
                    exc = Unavailable(f"shard {shard}'s server cancelled the call ({exc}); it may be stopping")
                if isinstance(exc, Unavailable):
                    self.refresh()
                raise exc from None
        def waiting(exc: PSError, waited_s: float) -> None:
            log.warning("waiting for shard %d at %s: %s (%.0f s so far, giving up after %.0f s)",
                        shard, self.address(shard), exc, waited_s, self._retry_deadline_s)
        return grpcutil.retry(attempt, self._retry_deadline_s, waiting=waiting,
                              retry_on=lambda e: e.retryable and not isinstance(e, Aborted))

    def address(self, shard: int) -> str:
        with self._lock:
            current = self._stubs.get(shard)
        return current[0] if current else "(no server known)"

    def submit(self, fn: Callable[..., T], *args) -> futures.Future:
        return self._pool.submit(fn, *args)

    def fan_out(self, shards: range | list[int], fn: Callable[[int], T]) -> dict[int, T]:
        """fn(shard) for every shard at once; the first error raises."""
        futs = {s: self._pool.submit(fn, s) for s in shards}
        return {s: f.result() for s, f in futs.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
