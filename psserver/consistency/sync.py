"""sync (BSP): step t completes when every live worker has pushed step t; the average is
applied once; a pull for step t waits until t steps are complete.

A worker that leaves or expires is no longer waited for; a joiner takes part from the step
in progress (its first pull tells it which); a push for an already completed step is
refused with ABORTED (retryable: pull again and compute the current step).
"""
from __future__ import annotations

from typing import Iterable

from shardps.pscommon.errors import Aborted, FailedPrecondition
from shardps.psserver.consistency.base import HOLD, Accumulate, CompleteStep, ConsistencyMode, GateState, Refuse


def step_complete(live: Iterable[int], contributors: set[int]) -> bool:
    """Every live worker has contributed to the step in progress (and someone has)."""
    return bool(contributors) and set(live) <= contributors


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
            return Refuse(FailedPrecondition(
                f"push for step {step} while step {state.completed_step} is in progress; pull first"))
        if worker in state.pending_from:
            return Refuse(FailedPrecondition(f"worker {worker} already pushed step {step}"))
        if step_complete(state.live, state.pending_from | {worker}):
            return CompleteStep(worker, grads)
        return Accumulate(worker, grads)

    def on_view_change(self, state: GateState):
        # contributions of workers that are gone stay in the average: they were computed
        # on this step's parameters and are not stale
        if step_complete(state.live, state.pending_from):
            return CompleteStep()
        return HOLD
