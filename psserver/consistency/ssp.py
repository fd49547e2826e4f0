"""ssp(tau): pushes applied on arrival; a worker at clock c may pull only when every live
worker's clock is at least c - tau. Workers that leave drop out of the minimum."""
from __future__ import annotations

from shardps.psserver.consistency.base import (
    HOLD, ApplyNow, ConsistencyMode, GateState, LearnClock, Refuse, push_ahead_error)


def slowest_clock(state: GateState) -> int | None:
    clocks = [state.clock_of(w) for w in state.live]
    return min(clocks) if clocks else None


def ssp_pull_ready(state: GateState, step: int, staleness: int) -> bool:
    slowest = slowest_clock(state)
    return slowest is None or step - slowest <= staleness


class SSPMode(ConsistencyMode):
    name = "ssp"

    def pull_ready(self, state, worker, step):
        return ssp_pull_ready(state, step, self.staleness)

    def on_push(self, state, worker, step, grads):
        error = push_ahead_error(state, worker, step)
        return Refuse(error) if error else ApplyNow(grads)

    def next_step(self, state, worker, step):
        # a joiner (or a new incarnation) starts at the scheduler's clock, taken from heartbeats
        # that lag by up to a second of steps; the gate knows the exact slowest clock of the
        # others, and starting there keeps the joiner from holding them back. (At the job's
        # start every clock is 0 and nobody is moved.)
        if worker in state.heard or state.start_clock.get(worker, 0) == 0:
            return step
        others = [state.clock_of(w) for w in state.live if w != worker]
        return max(step, min(others)) if others else step

    def on_pull(self, state, worker, step):
        # after a restart the clocks are old: a worker that has not pushed here since would
        # otherwise wait for its own stale clock
        if worker in state.live and worker not in state.heard and step > state.clock_of(worker):
            return LearnClock(worker, step)
        return HOLD
