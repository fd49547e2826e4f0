"""The consistency-mode interface. Modes decide: pure functions of a read-only `GateState`
that return a decision. The shard's executor (psserver.shard) holds the lock, waits on a
condition, and performs every change a decision names.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Mapping, Union

import numpy as np

from shardps.pscommon.errors import PSError


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
    # sync: workers counted in the step in progress without a gradient here: their push
    # reached a shard that has since restarted, or they joined as the step ended
    excused: set[int] = dataclasses.field(default_factory=set)
    # this shard has not completed a step since it started (fresh, restored or empty): its
    # step may be behind the workers', and the first worker to say so moves it forward
    resuming: bool = True
    heard: set[int] = dataclasses.field(default_factory=set)   # workers that pushed since it started

    def clock_of(self, worker: int) -> int:
        return max(self.clocks.get(worker, 0), self.start_clock.get(worker, 0))


# -- decisions ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ApplyNow:
    """Apply the push's gradients at once, on their own."""

    grads: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Accumulate:
    """Add the push to the step in progress; the step still waits for other workers."""

    worker: int
    grads: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class CompleteStep:
    """Add the push, if there is one, to the step in progress; then apply the step's sum
    averaged over its contributors and start the next step."""

    worker: int | None = None
    grads: Mapping[str, np.ndarray] | None = None
    excuse: int | None = None   # a worker counted without a gradient (see Excuse)


@dataclasses.dataclass(frozen=True)
class Refuse:
    """Take nothing from the push: the caller gets `error`, the ledger does not record it."""

    error: PSError


@dataclasses.dataclass(frozen=True)
class Rebase:
    """The shard is behind the cluster (it restarted from an older checkpoint or empty): drop
    the step in progress and continue at `step`, the workers' step. The executor then asks
    the mode again."""

    step: int


@dataclasses.dataclass(frozen=True)
class Excuse:
    """Count `worker` in the step in progress without a gradient from it."""

    worker: int


@dataclasses.dataclass(frozen=True)
class LearnClock:
    """The worker's clock is `clock`: its pull says so, and the shard has not heard from it
    since it started (its clocks came from an older checkpoint, or none)."""

    worker: int
    clock: int


@dataclasses.dataclass(frozen=True)
class Hold:
    """Nothing to do."""


HOLD = Hold()
PushDecision = Union[ApplyNow, Accumulate, CompleteStep, Refuse, Rebase]
PullDecision = Union[Rebase, Excuse, CompleteStep, LearnClock, Hold]
ViewDecision = Union[CompleteStep, Hold]


class ConsistencyMode(abc.ABC):
    name = ""
    records_pull_wait = True    # pulls may wait at the gate, so how long they waited is telling
    measures_staleness = True   # pushes apply alone, on parameters that may have moved since the pull

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
                grads: Mapping[str, np.ndarray]) -> PushDecision:
        """What to do with a push (not a duplicate: the ledger has ruled those out)."""

    def on_pull(self, state: GateState, worker: int, step: int) -> PullDecision:
        """A pull for `step` says the worker has pushed `step - 1` to every shard: a shard that
        never saw that push (it restarted) may have to catch up. Asked again after each
        decision that is not HOLD."""
        return HOLD

    def on_view_change(self, state: GateState) -> ViewDecision:
        """Membership changed (`state.live` is the new view): a pending step may now be complete."""
        return HOLD
