"""The consistency-mode interface. Modes decide: pure functions of a read-only `GateState`
that return a decision. The shard's executor (psserver.shard) holds the lock, waits on a
condition, and performs every change a decision names.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Mapping, Union

import numpy as np

from shardps.pscommon.bounds import MAX_STEP_AHEAD
from shardps.pscommon.errors import InvalidArgument, PSError


@dataclasses.dataclass
class GateState:
    """What the gates decide on. Mutated only by the executor, under the shard lock."""

    live: dict[int, int] = dataclasses.field(default_factory=dict)       # worker -> incarnation
    start_clock: dict[int, int] = dataclasses.field(default_factory=dict)  # worker -> clock at join
    clocks: dict[int, int] = dataclasses.field(default_factory=dict)     # worker -> last step pushed + 1
    completed_step: int = 0                                              # sync: steps applied
    # sync: gradients of the step in progress by who pushed them (one worker each; a restored
    # checkpoint's sum under every worker in it): kept apart until the step is settled,
    # because a push that did not reach every shard is dropped, on every shard
    pending: dict[frozenset[int], dict] = dataclasses.field(default_factory=dict)
    # sync, the settling shard: workers whose pushes of the step in progress reached every
    # shard (they said so by pulling the next step, or calling SettleStep)
    committed: set[int] = dataclasses.field(default_factory=set)
    # sync: workers counted in the step in progress without a gradient here: their push
    # reached a shard that has since restarted, or they joined as the step ended
    excused: set[int] = dataclasses.field(default_factory=set)
    # this shard has not completed a step since it started (fresh, restored or empty): its
    # step may be behind the workers', and the first worker to say so moves it forward
    resuming: bool = True
    heard: set[int] = dataclasses.field(default_factory=set)   # workers that pushed since it started

    @property
    def pending_from(self) -> set[int]:
        return {w for who in self.pending for w in who}

    def clock_of(self, worker: int) -> int:
        return max(self.clocks.get(worker, 0), self.start_clock.get(worker, 0))


def push_ahead_error(state: GateState, worker: int, step: int, limit: int = MAX_STEP_AHEAD) -> PSError | None:
    """async and ssp: a push more than `limit` steps past the worker's clock here, from a
    worker this shard has heard since it started (otherwise its clock here is old: the shard
    restarted, or the worker is a new incarnation), is refused; None when it may go on."""
    if worker not in state.heard:
        return None
    clock = state.clock_of(worker)
    if step - clock <= limit:
        return None
    return InvalidArgument(f"push for step {step} by worker {worker} is {step - clock} steps past its clock "
                           f"{clock} on this shard (at most {limit}): a worker pushes every step in order")


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
    """Add the push, if there is one, to the step in progress; then apply the sum of the
    pushes of the workers in `count`, averaged over them, drop the others' and start the
    next step. `count` None: every pending push counts (a mode that settles nothing)."""

    worker: int | None = None
    grads: Mapping[str, np.ndarray] | None = None
    excuse: int | None = None   # a worker counted without a gradient (see Excuse)
    count: frozenset[int] | None = None


@dataclasses.dataclass(frozen=True)
class Commit:
    """The settling shard records that `worker`'s pushes of the step in progress reached
    every shard: they will count in the step."""

    worker: int


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
PullDecision = Union[Rebase, Excuse, Commit, CompleteStep, LearnClock, Hold]
ViewDecision = Union[CompleteStep, Hold]
SettledDecision = Union[Rebase, CompleteStep, Hold]


class ConsistencyMode(abc.ABC):
    name = ""
    records_pull_wait = True    # pulls may wait at the gate, so how long they waited is telling
    measures_staleness = True   # pushes apply alone, on parameters that may have moved since the pull
    # the pull of the next step may ride on the reply of this step's push (PushPullBatch): a
    # pull that never waits for other workers' pushes to be settled
    fuses_pull = True

    def __init__(self, staleness: int = 0, settles: bool = True, shards: int = 1):
        self.staleness = staleness
        # sync: this shard decides which pushes count in each step (shard 0; the only shard
        # of a one-shard job); the others follow its outcomes
        self.settles = settles
        self.shards = shards

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

    def on_settled(self, state: GateState, step: int, contributors: frozenset[int]) -> SettledDecision:
        """A caller brings the settling shard's outcome of `step` (sync with several shards):
        a shard that does not settle completes that step with exactly those pushes."""
        return HOLD
