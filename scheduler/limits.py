"""Limits on how fast callers may add members and how long departed members are kept.

- Joins and registrations are rate-limited per caller host with a token bucket: `take` is
  the decision, a pure function over one bucket and the time; `AdmissionLimiter` keeps a
  bucket per host and raises ResourceExhausted naming the limit (the servicer hands it the
  caller's host).
- Dead and departed workers are forgotten after `dead_retention_s`, or sooner when more
  than `max_dead_workers` are kept (membership.prune); their ids stay refused because ids
  only ever come from one rising counter.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Callable

from shardps.pscommon.errors import InvalidArgument, ResourceExhausted


@dataclasses.dataclass(frozen=True)
class MembershipLimits:
    """The scheduler's limits on membership churn. The defaults leave room for a `psctl up`
    with dozens of workers on one host joining at once and for worker churn; they stop a
    loop of joins from one host."""

    join_rate: float = 20.0        # joins and registrations per second per caller host; 0: no limit
    join_burst: int = 50           # that many at once from a host that has been quiet
    dead_retention_s: float = 600.0  # dead and left workers are forgotten this long after last heard from
    max_dead_workers: int = 1000     # ... or sooner, oldest first, when more are kept

    def __post_init__(self):
        if not isinstance(self.join_rate, (int, float)) or not math.isfinite(self.join_rate) or self.join_rate < 0:
            raise InvalidArgument(f"join rate {self.join_rate!r} must be a finite number >= 0 (0: no limit)")
        if not isinstance(self.join_burst, int) or self.join_burst < 1:
            raise InvalidArgument(f"join burst {self.join_burst!r} must be an integer >= 1")
        if (not isinstance(self.dead_retention_s, (int, float)) or not math.isfinite(self.dead_retention_s)
                or self.dead_retention_s < 0):
            raise InvalidArgument(f"dead retention {self.dead_retention_s!r} must be a finite number of "
                                  "seconds >= 0")
        if not isinstance(self.max_dead_workers, int) or self.max_dead_workers < 0:
            raise InvalidArgument(f"max dead workers {self.max_dead_workers!r} must be an integer >= 0")

    @property
    def limited(self) -> bool:
        return self.join_rate > 0


@dataclasses.dataclass(frozen=True)
class Bucket:
    tokens: float      # calls that may go through now, at most the burst
    updated: float     # when `tokens` was right


def level(bucket: Bucket | None, now: float, rate: float, burst: int) -> float:
    """Tokens in `bucket` at `now`: refilled at `rate` per second up to `burst`; a host not
    seen yet (None) has a full bucket. A clock that went back adds nothing."""
    if bucket is None:
        return float(burst)
    return min(float(burst), bucket.tokens + max(0.0, now - bucket.updated) * rate)


def take(bucket: Bucket | None, now: float, rate: float, burst: int) -> tuple[Bucket, float]:
    """One call at `now`: (the bucket afterwards, 0.0 when the call may go through, else the
    seconds until it could). A refused call takes nothing, so retrying at the rate works."""
    tokens = level(bucket, now, rate, burst)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), 0.0
    return Bucket(tokens, now), (1.0 - tokens) / rate


def full(bucket: Bucket, now: float, rate: float, burst: int) -> bool:
    """A bucket refilled to the burst is the same as none: it can be forgotten."""
    return level(bucket, now, rate, burst) >= burst


class AdmissionLimiter:
    """A token bucket per caller host for JoinWorker and RegisterServer (one bucket for
    both). Full buckets are forgotten whenever the table doubles, so it holds about as many
    hosts as have called in the last burst / rate seconds."""

    MIN_SWEEP = 1024

    def __init__(self, limits: MembershipLimits, now: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.now = now
        self._lock = threading.Lock()
        self._buckets: dict[str, Bucket] = {}
        self._sweep_at = self.MIN_SWEEP

    def hosts(self) -> int:
        with self._lock:
            return len(self._buckets)

    def admit(self, host: str, method: str) -> None:
        """Take a token for `host`, or raise ResourceExhausted naming the limit and when to retry."""
        lim = self.limits
        if not lim.limited:
            return
        with self._lock:
            now = self.now()
            bucket, wait = take(self._buckets.get(host), now, lim.join_rate, lim.join_burst)
            self._buckets[host] = bucket
            if len(self._buckets) >= self._sweep_at:
                self._buckets = {h: b for h, b in self._buckets.items()
                                 if not full(b, now, lim.join_rate, lim.join_burst)}
                self._sweep_at = max(self.MIN_SWEEP, 2 * len(self._buckets))
        if wait > 0:
            raise ResourceExhausted(
                f"{method} from {host} refused: more than {lim.join_burst} joins and registrations at once, "
                f"or {lim.join_rate:g} per second, from one host (the scheduler's --join-burst and "
                f"--join-rate); retry in {wait:.2f} s",
                limit="join_rate", host=host, join_rate=f"{lim.join_rate:g}", join_burst=lim.join_burst,
                retry_after_s=f"{wait:.3f}")
