"""async: every push applied on arrival; pulls never wait."""
from __future__ import annotations

from shardps.psserver.consistency.base import ConsistencyMode, PushOutcome


class AsyncMode(ConsistencyMode):
    name = "async"

    def pull_ready(self, state, worker, step):
        return True

    def on_push(self, state, worker, step, grads):
        return PushOutcome(grads, 1)
