"""sync (BSP): step t completes when every live worker has pushed step t; the average is
applied once; a pull for step t waits until t steps are complete.

A worker that leaves or expires is no longer waited for; a joiner takes part from the step
in progress (its first pull tells it which); a push for an already completed step is
refused with ABORTED (retryable: pull again and compute the current step).
"""
from __future__ import annotations

import numpy as np

from shardps.pscommon.errors import Aborted, FailedPrecondition
from shardps.psserver.consistency.base import ConsistencyMode, GateState, PushOutcome


def step_complete(state: GateState) -> bool:
    """Every live worker has contributed to the step in progress (and someone has)."""
    return bool(state.pending_from) and set(state.live) <= state.pending_from


def _take_average(state: GateState) -> PushOutcome:
    n = len(state.pending_from)
    avg = {k: v / np.float32(n) for k, v in state.pending_sum.items()}
    state.pending_sum, state.pending_from = {}, set()
    state.completed_step += 1
    return PushOutcome(avg, n, completes_step=True)


class SyncMode(ConsistencyMode):
    name = "sync"

    def pull_ready(self, state, worker, step):
        return state.completed_step >= step

    def next_step(self, state, worker, step):
        return max(step, state.completed_step)

    def on_push(self, state, worker, step, grads):
        if step < state.completed_step:
            raise Aborted(f"step {step} already completed (now at step {state.completed_step}); "
                          "pull again and compute the current step")
        if step > state.completed_step:
            raise FailedPrecondition(
                f"push for step {step} while step {state.completed_step} is in progress; pull first")
        if worker in state.pending_from:
            raise FailedPrecondition(f"worker {worker} already pushed step {step}")
        for key, g in grads.items():
            acc = state.pending_sum.get(key)
            if acc is None:
                state.pending_sum[key] = np.array(g, dtype=np.float32, copy=True)
            else:
                acc += g
        state.pending_from.add(worker)
        if step_complete(state):
            return _take_average(state)
        return PushOutcome(None, 0)

    def on_view_change(self, state):
        # contributions of workers that are gone stay in the average: they were computed
        # on this step's parameters and are not stale
        if step_complete(state):
            return _take_average(state)
        return PushOutcome(None, 0)
