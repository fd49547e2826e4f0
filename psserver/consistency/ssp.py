"""ssp(tau): pushes applied on arrival; a worker at clock c may pull only when every live
worker's clock is at least c - tau. Workers that leave drop out of the minimum."""
from __future__ import annotations

from shardps.psserver.consistency.base import ApplyNow, ConsistencyMode, GateState


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
        return ApplyNow(grads)
