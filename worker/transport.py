"""How a worker reaches the shards: one stub per shard, retries, address refresh, fan-out.

The transport knows addresses and calls, nothing about tensors or membership: callers hand it
a function of a stub, and it runs that function against the shard's current server until it
succeeds, fails for good, or the retry deadline passes. Where a shard lives comes from
`resolve` (the session: the scheduler's list of live servers), asked again before every
retry; a retry's pause ends early when the membership view moves (`wait_view`: a server
registered, perhaps a shard's replacement at a new address), and `refresh()` (which the
session runs on every view change) moves a shard to its new address at once, cancelling the
calls still waiting on the old one, which are then retried at the new one.

Every wait has a way out: `wait_view` raises the session's `Stopped` once the worker is
stopping, and `interrupt()` cancels the calls in flight.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from typing import Callable, TypeVar

import grpc

from shardps.pscommon import grpcutil
from shardps.pscommon.errors import Aborted, Cancelled, PSError, Unavailable, from_rpc_error
from shardps.pscommon.framing import parameter_server_stub
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.wire.v1 import ps_pb2_grpc
from shardps.worker.session import Stopped

log = logging.getLogger("shardps.worker")
T = TypeVar("T")


def _sleep_for(after_view: int, timeout_s: float) -> int:
    """wait_view for a transport without a session: the view never moves."""
    time.sleep(timeout_s)
    return after_view


class Transport:
    def __init__(self, resolve: Callable[[], dict[int, str]], retry_deadline_s: float,
                 security: Security = NO_SECURITY, view: Callable[[], int] = lambda: 0,
                 wait_view: Callable[[int, float], int] = _sleep_for):
        """`view()`: the membership view number as last seen; `wait_view(after, timeout_s)`:
        wait for it to pass `after` (raising Stopped when the worker is stopping)."""
        self._resolve = resolve
        self._retry_deadline_s = retry_deadline_s
        self._security = security
        self._view = view
        self._wait_view = wait_view
        self._lock = threading.Lock()
        self._stubs: dict[int, tuple[str, grpc.Channel, ps_pb2_grpc.ParameterServerStub]] = {}
        self._interrupted = False
        self._pool = futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="fanout")

    def set_servers(self, addresses: dict[int, str]) -> None:
        """Point each named shard at its address (a new channel only where it moved). A shard
        that moved has its old channel closed: calls still waiting on the old address (a
        server that died without closing its connections) are cancelled, and retried here."""
        moved = []
        with self._lock:
            if self._interrupted:
                return
            for shard, address in addresses.items():
                current = self._stubs.get(shard)
                if current is None or current[0] != address:
                    ch = grpcutil.channel(address, self._security)
                    self._stubs[shard] = (address, ch, parameter_server_stub(ch))
                    if current is not None:
                        moved.append((shard, current))
        for shard, (old, ch, _) in moved:
            log.info("shard %d moved from %s to %s", shard, old, addresses[shard])
            ch.close()

    def refresh(self) -> None:
        """Ask where every shard lives now, and move those that moved."""
        try:
            self.set_servers(self._resolve())
        except PSError as exc:
            log.debug("cannot refresh servers: %s", exc)

    def stub(self, shard: int) -> ps_pb2_grpc.ParameterServerStub:
        with self._lock:
            return self._stubs[shard][2]

    def call(self, shard: int, fn: Callable[[ps_pb2_grpc.ParameterServerStub], T]) -> T:
        """Run fn(stub) with retries on retryable errors (not ABORTED: the caller re-pulls).
        Between attempts: a backoff pause, cut short when the membership view moves, then the
        shard's address is asked again, so each attempt goes where the scheduler says the
        shard is now.

        A call the server cancelled is retried as UNAVAILABLE: a draining server that is
        stopping cancels the calls it accepted but never ran, and every call here is safe to
        repeat (pulls read, pushes are deduplicated by the shard's ledger). So is a call
        cancelled because its shard moved (set_servers)."""
        last = {"view": self._view(), "address": self.address(shard)}

        def attempt():
            if self._interrupted:
                raise Stopped(f"the worker is stopping; call to shard {shard} not made")
            last["view"] = self._view()
            with self._lock:
                address, _, stub = self._stubs[shard]
            last["address"] = address
            try:
                return fn(stub)
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                if self._interrupted:
                    raise Stopped(f"the worker is stopping; call to shard {shard} at {address} "
                                  f"cancelled ({exc})") from None
                if isinstance(exc, Cancelled):
                    exc = Unavailable(f"the call to shard {shard} at {address} was cancelled ({exc}): its server "
                                      "may be stopping, or the shard moved")
                raise exc from None
            except ValueError:
                # grpc refuses a call on a closed channel: the shard moved while we were on
                # our way to it (a retry goes to the new address), or we are stopping
                if self._interrupted:
                    raise Stopped(f"the worker is stopping; call to shard {shard} not made") from None
                if self.address(shard) == address:
                    raise
                raise Unavailable(f"shard {shard} moved from {address} to {self.address(shard)}") from None

        def pause(seconds: float) -> None:
            # a view change (a server registered) ends the pause: the shard may be elsewhere now
            self._wait_view(last["view"], seconds)
            self.refresh()

        def waiting(exc: PSError, waited_s: float) -> None:
            log.warning("waiting for shard %d at %s: %s (%.0f s so far, giving up after %.0f s)",
                        shard, last["address"], exc, waited_s, self._retry_deadline_s)
        return grpcutil.retry(attempt, self._retry_deadline_s, waiting=waiting, sleep=pause,
                              retry_on=lambda e: e.retryable and not isinstance(e, Aborted))

    def address(self, shard: int) -> str:
        with self._lock:
            current = self._stubs.get(shard)
        return current[0] if current else "(no server known)"

    def interrupt(self) -> None:
        """The worker is stopping: no call starts from now on, and the calls in flight (a pull
        waiting at a gate, a connection that never answers) are cancelled (Stopped)."""
        with self._lock:
            self._interrupted = True
            channels = [ch for _, ch, _ in self._stubs.values()]
        for ch in channels:
            ch.close()

    def submit(self, fn: Callable[..., T], *args) -> futures.Future:
        return self._pool.submit(fn, *args)

    def fan_out(self, shards: range | list[int], fn: Callable[[int], T]) -> dict[int, T]:
        """fn(shard) for every shard at once; the first error raises."""
        futs = {s: self._pool.submit(fn, s) for s in shards}
        return {s: f.result() for s, f in futs.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
