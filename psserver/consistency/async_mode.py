"""async: every push applied on arrival; pulls never wait."""
from __future__ import annotations

from shardps.psserver.consistency.base import ApplyNow, ConsistencyMode


class AsyncMode(ConsistencyMode):
    name = "async"
    records_pull_wait = False  # no gate: every wait would be zero

    def pull_ready(self, state, worker, step):
        return True

    def on_push(self, state, worker, step, grads):
        return ApplyNow(grads)
