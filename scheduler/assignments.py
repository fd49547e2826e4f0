"""Partition assignments as pure state transitions: partitions of the dataset per data epoch.

The scheduler splits each data epoch into `num_partitions` partitions and assigns them to
workers one at a time. An assignment is held by a (worker, incarnation) and lapses with that
incarnation's membership lease. A finished partition is recorded once; a dead or departed
worker's unfinished partitions go back to the front of the queue; an epoch ends when every
partition is done, and the next one starts with a fresh queue. Workers derive the samples
of (epoch, partition) themselves, so only small integers cross the wire.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from shardps.pscommon.errors import FailedPrecondition, InvalidArgument

ASSIGNED, WAIT, DONE = "assigned", "wait", "done"


@dataclasses.dataclass(frozen=True)
class DataState:
    num_partitions: int = 0          # 0: no training on assigned partitions has started
    max_epochs: int = 0
    epoch: int = 0
    queued: tuple[int, ...] = ()
    assigned: Mapping[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # p -> (worker, inc)
    done: Mapping[int, int] = dataclasses.field(default_factory=dict)                # p -> worker
    # who finished each partition of every finished epoch: epoch -> {partition: worker}
    history: Mapping[int, Mapping[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.num_partitions > 0 and self.epoch >= self.max_epochs

    def progress(self) -> dict:
        return {"epoch": self.epoch, "max_epochs": self.max_epochs, "partitions": self.num_partitions,
                "done": len(self.done), "assigned": len(self.assigned), "queued": len(self.queued),
                "finished": self.finished}


def _fresh_epoch(state: DataState, epoch: int) -> DataState:
    return dataclasses.replace(state, epoch=epoch, queued=tuple(range(state.num_partitions)),
                               assigned={}, done={})


def configure(state: DataState, num_partitions: int, max_epochs: int) -> DataState:
    """Fix the plan on first use; later workers must ask for the same plan."""
    if not 1 <= num_partitions <= 1_000_000:
        raise InvalidArgument(f"num_partitions {num_partitions} must be in [1, 1000000]")
    if not 1 <= max_epochs <= 1_000_000:
        raise InvalidArgument(f"epochs {max_epochs} must be in [1, 1000000]")
    if state.num_partitions == 0:
        return _fresh_epoch(dataclasses.replace(state, num_partitions=num_partitions,
                                                max_epochs=max_epochs), 0)
    if (state.num_partitions, state.max_epochs) != (num_partitions, max_epochs):
        raise FailedPrecondition(
            f"the job's data plan is {state.num_partitions} partitions x {state.max_epochs} epochs; "
            f"asked for {num_partitions} x {max_epochs}")
    return state


def acquire(state: DataState, worker: int, incarnation: int) -> tuple[DataState, str, int]:
    """(state, ASSIGNED|WAIT|DONE, partition). WAIT: the queue is empty but others hold assignments."""
    if state.finished:
        return state, DONE, -1
    for p, holder in state.assigned.items():  # a retried acquire gets the same assignment back
        if holder == (worker, incarnation):
            return state, ASSIGNED, p
    if not state.queued:
        return state, WAIT, -1
    p, rest = state.queued[0], state.queued[1:]
    assigned = dict(state.assigned)
    assigned[p] = (worker, incarnation)
    return dataclasses.replace(state, queued=rest, assigned=assigned), ASSIGNED, p


def complete(state: DataState, worker: int, incarnation: int, epoch: int, partition: int) -> DataState:
    """Record a finished partition; the last one of an epoch starts the next epoch."""
    if epoch < state.epoch and state.history.get(epoch, {}).get(partition) == worker:
        return state  # a retried completion of a finished epoch's partition (reply lost)
    if epoch != state.epoch:
        raise FailedPrecondition(f"partition {partition} of data epoch {epoch} reported during epoch {state.epoch}")
    if state.done.get(partition) == worker and partition not in state.assigned:
        return state  # a retried completion
    if state.assigned.get(partition) != (worker, incarnation):
        raise FailedPrecondition(
            f"partition {partition} is not assigned to worker {worker} incarnation {incarnation}")
    assigned = dict(state.assigned)
    del assigned[partition]
    done = dict(state.done)
    done[partition] = worker
    state = dataclasses.replace(state, assigned=assigned, done=done)
    if len(done) < state.num_partitions:
        return state
    history = dict(state.history)
    history[state.epoch] = done
    return _fresh_epoch(dataclasses.replace(state, history=history), state.epoch + 1)


def release(state: DataState, worker: int) -> DataState:
    """A worker died or left: its unfinished partitions go back to the front of the queue."""
    back = sorted(p for p, (w, _) in state.assigned.items() if w == worker)
    if not back:
        return state
    assigned = {p: h for p, h in state.assigned.items() if h[0] != worker}
    return dataclasses.replace(state, assigned=assigned, queued=tuple(back) + state.queued)


def to_json(state: DataState) -> dict:
    return {"num_partitions": state.num_partitions, "max_epochs": state.max_epochs, "epoch": state.epoch,
            "queued": list(state.queued), "assigned": {str(p): list(h) for p, h in state.assigned.items()},
            "done": {str(p): w for p, w in state.done.items()},
            "history": {str(e): {str(p): w for p, w in c.items()} for e, c in state.history.items()}}


def from_json(data: dict) -> DataState:
    return DataState(
        num_partitions=int(data["num_partitions"]), max_epochs=int(data["max_epochs"]),
        epoch=int(data["epoch"]), queued=tuple(int(p) for p in data["queued"]),
        # "leased": the key before assignments were named apart from membership leases
        assigned={int(p): (int(h[0]), int(h[1])) for p, h in data.get("assigned", data.get("leased", {})).items()},
        done={int(p): int(w) for p, w in data["done"].items()},
        history={int(e): {int(p): int(w) for p, w in c.items()} for e, c in data["history"].items()})
