"""Fault injection for tests: a server interceptor that fails, delays or drops replies.

An interceptor rather than servicer subclasses, so the code under test is the production
servicer, unchanged. It lives with the tests because only they install it: a test passes it
to a grpc.server of its own or to ServerConfig(interceptors=...).

"Drop the response after apply" is the interesting fault: the handler runs to completion
(a push is applied, the ledger records it), then the client gets UNAVAILABLE as if the
reply was lost on the wire, and retries. Exactly-once delivery is what makes that safe.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import threading
import time

import grpc

from shardps.pscommon import interceptors
from shardps.pscommon.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """Probabilities are per call. `methods` filters by full name ("/pkg.Svc/Push") or bare
    method name ("Push"); empty means every method."""

    drop_response_after_apply: float = 0.0
    delay_s: float = 0.0
    delay_rate: float = 0.0
    unavailable_rate: float = 0.0
    methods: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        for name in ("drop_response_after_apply", "delay_rate", "unavailable_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise InvalidArgument(f"fault {name}={value!r} must be a probability in [0, 1]")
        if not (isinstance(self.delay_s, (int, float)) and math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise InvalidArgument(f"fault delay_s={self.delay_s!r} must be a finite number >= 0")
        if isinstance(self.methods, str):
            # tuple("Push") would silently become ("P", "u", "s", "h")
            raise InvalidArgument(f"fault methods must be a tuple of names, got the string {self.methods!r}")

    def matches(self, method: str) -> bool:
        if not self.methods:
            return True
        bare = method.rsplit("/", 1)[-1]
        return method in self.methods or bare in self.methods


@dataclasses.dataclass(frozen=True)
class FaultCounts:
    calls: int = 0          # calls the plan applied to (after the method filter)
    unavailable: int = 0    # failed before the handler ran
    delayed: int = 0
    dropped: int = 0        # handler ran to completion, reply replaced by UNAVAILABLE


@dataclasses.dataclass(frozen=True)
class _Decision:
    unavailable: bool
    delay: bool
    drop: bool


class FaultInjector(grpc.ServerInterceptor):
    """Injects the faults of a FaultPlan into matching calls; counts what it injected.

    Every matching call draws the same three numbers from one seeded generator under a lock,
    so a given order of arrivals always gets the same faults.
    """

    def __init__(self, plan: FaultPlan, sleep=time.sleep):
        self.plan = plan
        self._sleep = sleep
        self._lock = threading.Lock()
        self._rng = random.Random(plan.seed)
        self._counts = {f.name: 0 for f in dataclasses.fields(FaultCounts)}

    # -- bookkeeping ---------------------------------------------------------------------
    def counts(self) -> FaultCounts:
        with self._lock:
            return FaultCounts(**self._counts)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _decide(self) -> _Decision:
        p = self.plan
        with self._lock:
            # Always three draws, whatever the rates, so changing one rate does not shift
            # which calls the other faults land on.
            u, d, r = self._rng.random(), self._rng.random(), self._rng.random()
            self._counts["calls"] += 1
        return _Decision(u < p.unavailable_rate, d < p.delay_rate, r < p.drop_response_after_apply)

    # -- the faults ------------------------------------------------------------------------
    def _before(self, decision: _Decision, context: grpc.ServicerContext) -> None:
        if decision.unavailable:
            self._count("unavailable")
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault: unavailable")
        if decision.delay and self.plan.delay_s > 0:
            self._count("delayed")
            self._sleep(self.plan.delay_s)

    def _after(self, decision: _Decision, context: grpc.ServicerContext) -> None:
        if decision.drop:
            self._count("dropped")
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault: response dropped after apply")

    # -- wrapping --------------------------------------------------------------------------
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not self.plan.matches(handler_call_details.method or ""):
            return handler
        return interceptors.around(handler, self._injected)

    @contextlib.contextmanager
    def _injected(self, context: grpc.ServicerContext):
        decision = self._decide()
        self._before(decision, context)
        yield
        # not reached when the handler raised: only a completed call has a reply to drop
        self._after(decision, context)


__all__ = ["FaultCounts", "FaultInjector", "FaultPlan"]
