"""async: every push applied on arrival; pulls never wait."""
from __future__ import annotations

from shardps.psserver.consistency.base import ApplyNow, ConsistencyMode, Refuse, push_ahead_error


class AsyncMode(ConsistencyMode):
    name = "async"
    records_pull_wait = False  # no gate: every wait would be zero

    def pull_ready(self, state, worker, step):
        return True

    def on_push(self, state, worker, step, grads):
        error = push_ahead_error(state, worker, step)
        return Refuse(error) if error else ApplyNow(grads)
