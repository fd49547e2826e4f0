"""Re-seeding a shard that restarted empty (no checkpoint, or none usable and the operator
said to start empty) while the job's model is declared.

Every live worker holds a copy of the shard's values from its last pull. The shard collects
their offers and keeps the freshest (the highest shard version it was pulled at; ties go to
the lowest worker id, so the choice does not depend on who came first). It decides once every
live worker has offered, or `window_s` after the first offer, so a paused worker cannot hold
the others up. Decisions are pure functions; psserver.shard waits and adopts the copy.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from shardps.pscommon.sharding import Key

WINDOW_S = 5.0   # how long the first offer waits for the live workers that have not offered


@dataclasses.dataclass(frozen=True)
class Offer:
    worker: int
    version: int


def fresher(a: Offer, b: Offer | None) -> bool:
    """Is `a` the better copy than `b`: higher version, then the lower worker id."""
    return b is None or (a.version, -a.worker) > (b.version, -b.worker)


def decided(offered: Iterable[int], live: Iterable[int], first_at: float, now: float,
            window_s: float = WINDOW_S) -> bool:
    """Stop collecting: every live worker offered, or the window since the first offer closed."""
    return set(live) <= set(offered) or now - first_at >= window_s


@dataclasses.dataclass
class Collecting:
    """The offers so far: who offered, and the best copy (only it is kept, so memory is one
    copy of the shard whatever the number of workers)."""

    first_at: float
    fingerprint: str
    keys: list[Key]
    offered: set[int] = dataclasses.field(default_factory=set)
    best: Offer | None = None
    values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Reseeded:
    """What the shard took: shown by status and metrics, logged once."""

    worker: int
    version: int
    offers: int
    uptime_s: float
