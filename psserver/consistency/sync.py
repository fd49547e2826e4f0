"""sync (BSP): step t completes when every live worker's push of step t has reached every
shard; the average is applied once; a pull for step t waits until t steps are complete.

All or nothing across shards. A worker pushes step t to every shard, and only once all of
them acknowledged does it say so (SettleStep, or its pull of step t+1; in a one-shard job
the push says it).
One shard settles each step (shard 0, the only shard of a one-shard job): it counts the
pushes of workers that said so, and completes the step once every live worker has; the push
of a worker that died or left before saying so is dropped, whichever shards it reached. The
other shards never decide: they complete a step with exactly the contributors the settling
shard chose, an outcome every worker fetches from it (SettleStep) and carries to the others
on its next calls. So a worker killed between its pushes to two shards counts on none.

A joiner takes part from the step in progress (its first pull tells it which); a push for
an already completed step is refused with ABORTED (retryable: pull again and compute the
current step).

A shard that restarted (from an older checkpoint, or empty) is behind the workers: until it
completes its first step it adopts the step a worker's push or pull names (Rebase), and a
pull for step t+1 from a worker whose push of step t it never saw counts that worker in
step t without a gradient (Excuse): the push went to the shard's previous life.
"""
from __future__ import annotations

from typing import Iterable

from shardps.pscommon.errors import Aborted, FailedPrecondition
from shardps.psserver.consistency.base import (HOLD, Accumulate, Commit, CompleteStep, ConsistencyMode, Excuse,
                                               GateState, Rebase, Refuse)


def step_complete(live: Iterable[int], contributors: set[int], excused: set[int] = frozenset()) -> bool:
    """Every live worker has contributed to the step in progress or been excused (and
    someone has)."""
    counted = contributors | excused
    return bool(counted) and set(live) <= counted


class SyncMode(ConsistencyMode):
    name = "sync"
    # one averaged update per step, on the parameters every contributor pulled: never stale
    measures_staleness = False
    fuses_pull = False   # the next step's pull waits until this one is settled (SettleStep)

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
        if self.shards == 1 and step_complete(state.live, state.pending_from | {worker}, state.excused):
            # the only shard: a push here reached every shard, and this one ends the step
            return CompleteStep(worker, grads)
        # with several shards, counted once the worker says its push reached every shard
        return Accumulate(worker, grads)

    def on_pull(self, state: GateState, worker, step):
        finished = step - 1   # the worker pushed this step to every shard before pulling
        if finished < state.completed_step:
            return HOLD
        if finished > state.completed_step:
            # only a shard that restarted can be behind; otherwise the pull just waits
            return Rebase(finished) if state.resuming else HOLD
        if not self.settles or worker not in state.live:
            return HOLD
        if worker in state.pending_from:
            if worker not in self._committed(state):
                return Commit(worker)
        elif worker not in state.excused:
            return Excuse(worker)
        return self._settle(state)

    def on_view_change(self, state: GateState):
        # a worker that is gone no longer holds the step; its push counts only if it said
        # the push reached every shard
        return self._settle(state) if self.settles else HOLD

    def on_settled(self, state: GateState, step, contributors):
        if self.settles or step < state.completed_step:
            return HOLD
        if step > state.completed_step:
            # a follower misses a whole step only when it restarted: the pushes went to its
            # previous life
            return Rebase(step)
        return CompleteStep(count=contributors)

    def _committed(self, state: GateState) -> set[int]:
        """Workers whose pushes of the step in progress reached every shard (with one shard,
        every push here did)."""
        return state.pending_from if self.shards == 1 else state.committed

    def _settle(self, state: GateState):
        committed = self._committed(state)
        if step_complete(state.live, committed, state.excused):
            return CompleteStep(count=frozenset(committed))
        return HOLD
