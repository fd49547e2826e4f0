"""The consistency-mode interface. Decisions are pure functions of `GateState`; the shard's
executor (psserver.shard) holds the lock, waits on a condition and applies what they return.
"""
from __future__ import annotations

import abc
import dataclasses

import numpy as np


@dataclasses.dataclass
class GateState:
    """What the gates decide on. Mutated only by the executor, under the shard lock."""

    live: dict[int, int] = dataclasses.field(default_factory=dict)       # worker -> incarnation
    start_clock: dict[int, int] = dataclasses.field(default_factory=dict)  # worker -> clock at join
    clocks: dict[int, int] = dataclasses.field(default_factory=dict)     # worker -> last step pushed + 1
    completed_step: int = 0                                              # sync: steps applied
    # sync: gradients of the step in progress, summed, and who contributed them
    pending_sum: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    pending_from: set[int] = dataclasses.field(default_factory=set)

    def clock_of(self, worker: int) -> int:
        return max(self.clocks.get(worker, 0), self.start_clock.get(worker, 0))


@dataclasses.dataclass(frozen=True)
class PushOutcome:
    """What the executor must do with a push: apply these gradients now (possibly none yet),
    averaged over `contributors` pushes."""

    apply: dict[str, np.ndarray] | None
    contributors: int = 1
    completes_step: bool = False


class ConsistencyMode(abc.ABC):
    name = ""

    def __init__(self, staleness: int = 0):
        self.staleness = staleness

    @abc.abstractmethod
    def pull_ready(self, state: GateState, worker: int, step: int) -> bool:
        """May a pull for `step` by `worker` return now?"""

    def next_step(self, state: GateState, worker: int, step: int) -> int:
        """The step the puller should compute next (sync moves laggards forward)."""
        return step

    @abc.abstractmethod
    def on_push(self, state: GateState, worker: int, step: int,
                grads: dict[str, np.ndarray]) -> PushOutcome:
        """Record a push; say what to apply. May raise Aborted for a push that is too late."""

    def on_view_change(self, state: GateState) -> PushOutcome:
        """Membership changed: a pending step may now be complete."""
        return PushOutcome(None, 0)
