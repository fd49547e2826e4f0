"""sync (BSP): step t completes when every live worker has pushed step t; the average is
applied once; a pull for step t waits until t steps are complete.

A worker that leaves or expires is no longer waited for; a joiner takes part from the step
in progress (its first pull tells it which); a push for an already completed step is
refused with ABORTED (retryable: pull again and compute the current step).

A shard that restarted (from an older checkpoint, or empty) is behind the workers: until it
completes its first step it adopts the step a worker's push or pull names (Rebase), and a
pull for step t+1 from a worker whose push of step t it never saw counts that worker in
step t without a gradient (Excuse): the push went to the shard's previous life.
"""
from __future__ import annotations

from typing import Iterable

from shardps.pscommon.errors import Aborted, FailedPrecondition
from shardps.psserver.consistency.base import (HOLD, Accumulate, CompleteStep, ConsistencyMode, Excuse, GateState,
                                               Rebase, Refuse)


def step_complete(live: Iterable[int], contributors: set[int], excused: set[int] = frozenset()) -> bool:
    """Every live worker has contributed to the step in progress or been excused (and
    someone has)."""
    counted = contributors | excused
    return bool(counted) and set(live) <= counted


class SyncMode(ConsistencyMode):
    name = "sync"
    # one averaged update per step, on the parameters every contributor pulled: never stale
    measures_staleness = False

    def pull_ready(self, state, worker, step):
        return state.completed_step >= step

    def next_step(self, state, worker, step):
        return max(step, state.completed_step)

    def on_push(self, state: GateState, worker, step, grads):
        if step < state.completed_step:
            return Refuse(Aborted(f"step {step} already completed (now at step {state.completed_step}); "
                                  "pull again and compute the current step"))
        if step > state.completed_step:
            if state.resuming:
                return Rebase(step)
            return Refuse(FailedPrecondition(
                f"push for step {step} while step {state.completed_step} is in progress; pull first"))
        if worker in state.pending_from:
            return Refuse(FailedPrecondition(f"worker {worker} already pushed step {step}"))
        if step_complete(state.live, state.pending_from | {worker}, state.excused):
            return CompleteStep(worker, grads)
        return Accumulate(worker, grads)

    def on_pull(self, state: GateState, worker, step):
        finished = step - 1   # the worker pushed this step to every shard before pulling
        if finished < state.completed_step or worker in state.pending_from or worker in state.excused:
            return HOLD
        if finished > state.completed_step:
            # only a shard that restarted can be behind; otherwise the pull just waits
            return Rebase(finished) if state.resuming else HOLD
        if worker not in state.live:
            return HOLD
        if step_complete(state.live, state.pending_from, state.excused | {worker}):
            return CompleteStep(excuse=worker)
        return Excuse(worker)

    def on_view_change(self, state: GateState):
        # contributions of workers that are gone stay in the average: they were computed
        # on this step's parameters and are not stale
        if step_complete(state.live, state.pending_from, state.excused):
            return CompleteStep()
        return HOLD
