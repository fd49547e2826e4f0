"""scheduler.assignments: data partitions assigned per data epoch, as pure state transitions.

No clock and no I/O here: every function takes a DataState and returns a new one, so the
tests drive the transitions directly, including randomized schedules of workers that
acquire, finish, retry and die (hypothesis).
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardps.pscommon.errors import FailedPrecondition, InvalidArgument
from shardps.scheduler import assignments
from shardps.scheduler.assignments import ASSIGNED, DONE, WAIT, DataState


def _configured(partitions: int = 4, epochs: int = 2) -> DataState:
    return assignments.configure(DataState(), partitions, epochs)


def _roundtrip(state: DataState) -> DataState:
    """Through JSON text, as the scheduler's state file stores it (keys become strings)."""
    return assignments.from_json(json.loads(json.dumps(assignments.to_json(state))))


# -- configure -------------------------------------------------------------------------------
def test_configure_fixes_the_plan_and_starts_epoch_zero_with_a_full_queue():
    s = _configured(4, 2)
    assert (s.num_partitions, s.max_epochs, s.epoch) == (4, 2, 0)
    assert s.queued == (0, 1, 2, 3)
    assert dict(s.assigned) == {} and dict(s.done) == {} and dict(s.history) == {}
    assert not s.finished
    assert s.progress() == {"epoch": 0, "max_epochs": 2, "partitions": 4, "done": 0, "assigned": 0,
                            "queued": 4, "finished": False}


def test_configure_with_the_same_plan_keeps_progress():
    s = _configured(4, 2)
    s, _, p = assignments.acquire(s, 1, 1)
    s = assignments.complete(s, 1, 1, 0, p)
    s, _, held = assignments.acquire(s, 2, 1)
    again = assignments.configure(s, 4, 2)
    assert again == s                      # a second worker asking for the same plan changes nothing
    assert dict(again.done) == {p: 1} and dict(again.assigned) == {held: (2, 1)}


@pytest.mark.parametrize("partitions, epochs", [(5, 2), (4, 3), (1, 1)])
def test_configure_with_another_plan_is_refused(partitions, epochs):
    s = _configured(4, 2)
    with pytest.raises(FailedPrecondition, match=r"4 partitions x 2 epochs"):
        assignments.configure(s, partitions, epochs)


@pytest.mark.parametrize("partitions, epochs, what", [
    (0, 1, "num_partitions"), (-3, 1, "num_partitions"), (1_000_001, 1, "num_partitions"),
    (4, 0, "epochs"), (4, -1, "epochs"), (4, 1_000_001, "epochs"),
])
def test_configure_rejects_bad_values(partitions, epochs, what):
    with pytest.raises(InvalidArgument, match=what):
        assignments.configure(DataState(), partitions, epochs)
    # bad values are refused even once a plan is fixed (validation comes first)
    with pytest.raises(InvalidArgument, match=what):
        assignments.configure(_configured(4, 2), partitions, epochs)


def test_configure_accepts_the_bounds():
    assert assignments.configure(DataState(), 1, 1).queued == (0,)
    s = assignments.configure(DataState(), 1_000_000, 1_000_000)
    assert len(s.queued) == 1_000_000 and s.max_epochs == 1_000_000


# -- acquire ---------------------------------------------------------------------------------
def test_acquire_hands_out_each_partition_once_then_waits():
    s = _configured(3, 1)
    got = []
    for worker in (1, 2, 3):
        s, status, p = assignments.acquire(s, worker, 10 + worker)
        assert status == ASSIGNED
        got.append(p)
    assert sorted(got) == [0, 1, 2] and s.queued == ()
    assert dict(s.assigned) == {got[0]: (1, 11), got[1]: (2, 12), got[2]: (3, 13)}
    # the queue is empty but assignments are outstanding: a fourth worker waits
    s2, status, p = assignments.acquire(s, 4, 14)
    assert (status, p) == (WAIT, -1) and s2 == s


def test_a_retried_acquire_returns_the_same_assignment():
    s = _configured(4, 1)
    s, status, p = assignments.acquire(s, 7, 3)
    s2, status2, p2 = assignments.acquire(s, 7, 3)
    assert (status2, p2) == (ASSIGNED, p) and s2 == s
    # another incarnation of the same worker is another holder: it gets a new partition
    s3, status3, p3 = assignments.acquire(s2, 7, 4)
    assert status3 == ASSIGNED and p3 != p
    assert s3.assigned[p] == (7, 3) and s3.assigned[p3] == (7, 4)


def test_acquire_after_the_last_epoch_says_done():
    s = _configured(2, 1)
    for worker in (1, 2):
        s, _, p = assignments.acquire(s, worker, 1)
        s = assignments.complete(s, worker, 1, 0, p)
    assert s.finished and s.epoch == 1
    for worker in (1, 2, 3):
        s2, status, p = assignments.acquire(s, worker, 1)
        assert (status, p) == (DONE, -1) and s2 == s


def test_acquire_before_configure_is_not_done():
    # num_partitions == 0: nothing has started; an empty queue is WAIT, never DONE
    s, status, _ = assignments.acquire(DataState(), 1, 1)
    assert status == WAIT and not s.finished


# -- complete --------------------------------------------------------------------------------
def test_complete_records_the_partition():
    s = _configured(3, 1)
    s, _, p = assignments.acquire(s, 1, 5)
    s = assignments.complete(s, 1, 5, 0, p)
    assert dict(s.done) == {p: 1} and p not in s.assigned and p not in s.queued
    assert s.epoch == 0 and s.progress()["done"] == 1


def test_complete_refuses_a_partition_assigned_to_someone_else():
    s = _configured(3, 1)
    s, _, p = assignments.acquire(s, 1, 5)
    with pytest.raises(FailedPrecondition, match=f"partition {p} is not assigned to worker 2"):
        assignments.complete(s, 2, 6, 0, p)
    # the holder's id with another incarnation (its old self, or a rejoined one) is not the holder
    with pytest.raises(FailedPrecondition, match="incarnation 4"):
        assignments.complete(s, 1, 4, 0, p)
    # a partition still in the queue was assigned to nobody
    queued = s.queued[0]
    with pytest.raises(FailedPrecondition, match=f"partition {queued} is not assigned"):
        assignments.complete(s, 1, 5, 0, queued)
    assert s.assigned[p] == (1, 5)


def test_complete_refuses_a_wrong_epoch():
    s = _configured(3, 2)
    s, _, p = assignments.acquire(s, 1, 5)
    for epoch in (1, -1, 7):
        with pytest.raises(FailedPrecondition, match=f"data epoch {epoch} reported during epoch 0"):
            assignments.complete(s, 1, 5, epoch, p)
    assert s.assigned[p] == (1, 5) and dict(s.done) == {}


def test_a_retried_completion_is_a_no_op():
    s = _configured(3, 1)
    s, _, p = assignments.acquire(s, 1, 5)
    once = assignments.complete(s, 1, 5, 0, p)
    twice = assignments.complete(once, 1, 5, 0, p)
    assert twice == once and dict(twice.done) == {p: 1}


def test_a_completion_of_a_partition_someone_else_finished_is_refused():
    s = _configured(3, 1)
    s, _, p = assignments.acquire(s, 1, 5)
    s = assignments.complete(s, 1, 5, 0, p)
    with pytest.raises(FailedPrecondition):
        assignments.complete(s, 2, 6, 0, p)


def test_the_last_completion_starts_the_next_epoch_and_records_history():
    s = _configured(3, 2)
    held = {}
    for worker in (1, 2, 3):
        s, _, p = assignments.acquire(s, worker, worker * 10)
        held[worker] = p
    s = assignments.complete(s, 2, 20, 0, held[2])
    s = assignments.complete(s, 1, 10, 0, held[1])
    assert s.epoch == 0
    s = assignments.complete(s, 3, 30, 0, held[3])
    assert s.epoch == 1 and not s.finished
    assert s.queued == (0, 1, 2) and dict(s.assigned) == {} and dict(s.done) == {}
    assert {e: dict(c) for e, c in s.history.items()} == {0: {held[1]: 1, held[2]: 2, held[3]: 3}}
    # the second (last) epoch
    for worker in (1, 2, 3):
        s, _, p = assignments.acquire(s, worker, worker * 10)
        s = assignments.complete(s, worker, worker * 10, 1, p)
    assert s.finished and s.epoch == 2 and set(s.history) == {0, 1}
    assert all(sorted(c) == [0, 1, 2] for c in s.history.values())


def test_a_retried_completion_of_the_epochs_last_partition_is_a_no_op():
    s = _configured(2, 2)
    s, _, p0 = assignments.acquire(s, 1, 1)
    s = assignments.complete(s, 1, 1, 0, p0)
    s, _, p1 = assignments.acquire(s, 1, 1)
    s = assignments.complete(s, 1, 1, 0, p1)   # the last one: epoch 1 starts
    assert s.epoch == 1
    again = assignments.complete(s, 1, 1, 0, p1)  # the worker retries: its reply was lost
    assert again == s


# -- release ---------------------------------------------------------------------------------
def test_release_puts_a_dead_workers_assignments_back_at_the_front():
    s = _configured(6, 1)
    s, _, a = assignments.acquire(s, 1, 1)     # worker 1, incarnation 1
    s, _, b = assignments.acquire(s, 2, 2)
    s, _, c = assignments.acquire(s, 1, 9)     # worker 1 again under a later incarnation
    s, _, d = assignments.acquire(s, 3, 3)
    assert (a, b, c, d) == (0, 1, 2, 3) and s.queued == (4, 5)
    s = assignments.complete(s, 3, 3, 0, d)
    released = assignments.release(s, 1)       # every incarnation of worker 1 gives its assignments back
    assert released.queued == (0, 2, 4, 5)
    assert dict(released.assigned) == {b: (2, 2)}
    assert dict(released.done) == {d: 3}  # finished work stays finished
    # the next acquires get the released partitions first
    after, status, p = assignments.acquire(released, 4, 4)
    assert (status, p) == (ASSIGNED, 0)
    after, status, p = assignments.acquire(after, 5, 5)
    assert (status, p) == (ASSIGNED, 2)


def test_release_of_a_worker_without_leases_changes_nothing():
    s = _configured(3, 1)
    s, _, _ = assignments.acquire(s, 1, 1)
    assert assignments.release(s, 2) is s


def test_a_dead_workers_late_completion_is_refused_after_release():
    s = _configured(2, 1)
    s, _, p = assignments.acquire(s, 1, 1)
    s = assignments.release(s, 1)
    with pytest.raises(FailedPrecondition):
        assignments.complete(s, 1, 1, 0, p)
    s, _, p2 = assignments.acquire(s, 2, 2)
    assert p2 == p  # someone else trains it instead
    s = assignments.complete(s, 2, 2, 0, p)
    assert dict(s.done) == {p: 2}


# -- serialization ---------------------------------------------------------------------------
def test_json_round_trip_of_a_state_in_progress():
    s = _configured(5, 3)
    s, _, a = assignments.acquire(s, 1, 1)
    s, _, b = assignments.acquire(s, 2, 2)
    s = assignments.complete(s, 1, 1, 0, a)
    for worker in (1, 3, 4):
        s, _, p = assignments.acquire(s, worker, worker)
        s = assignments.complete(s, worker, worker, 0, p)
    s = assignments.complete(s, 2, 2, 0, b)           # epoch 0 ends
    s, _, c = assignments.acquire(s, 5, 7)
    s, _, d = assignments.acquire(s, 6, 8)
    s = assignments.complete(s, 6, 8, 1, d)
    s = assignments.release(s, 5)
    s, _, _ = assignments.acquire(s, 9, 9)
    assert s.epoch == 1 and s.assigned and s.done and s.queued and s.history
    back = _roundtrip(s)
    assert back == s
    assert all(isinstance(k, int) for k in back.assigned) and all(isinstance(k, int) for k in back.done)
    assert all(isinstance(h, tuple) for h in back.assigned.values())
    assert assignments.to_json(back) == assignments.to_json(s)
    assert _roundtrip(DataState()) == DataState()


# -- randomized schedules --------------------------------------------------------------------
ACTIONS = st.lists(st.tuples(st.sampled_from(["acquire", "complete", "retry", "die", "stale"]),
                             st.integers(0, 3)), max_size=120)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(partitions=st.integers(1, 6), epochs=st.integers(1, 3), actions=ACTIONS)
def test_random_schedules_complete_every_partition_exactly_once_per_epoch(partitions, epochs, actions):
    """Four workers acquire, complete, retry completions, die (and come back under a new
    incarnation) and send completions from their dead selves, in any order; then the
    survivors finish the job. Every partition of every epoch is recorded exactly once,
    by the worker whose completion counted."""
    state = assignments.configure(DataState(), partitions, epochs)
    incarnation = {w: 1 for w in range(4)}
    holding: dict[int, tuple[int, int]] = {}       # worker -> (epoch, partition) it holds
    last_done: dict[int, tuple[int, int]] = {}      # worker -> its last completion
    lost: dict[int, list[tuple[int, int, int]]] = {w: [] for w in range(4)}  # (inc, epoch, p) of dead selves
    counted: dict[tuple[int, int], int] = {}        # (epoch, partition) -> accepted completions
    who: dict[int, dict[int, int]] = {}             # epoch -> {partition: worker whose completion counted}

    def complete(w):
        nonlocal state
        e, p = holding.pop(w)
        before = len(state.done) + sum(len(c) for c in state.history.values())
        state = assignments.complete(state, w, incarnation[w], e, p)
        after = len(state.done) + sum(len(c) for c in state.history.values())
        assert after == before + 1
        counted[(e, p)] = counted.get((e, p), 0) + 1
        who.setdefault(e, {})[p] = w
        last_done[w] = (e, p)

    def acquire(w):
        nonlocal state
        state, status, p = assignments.acquire(state, w, incarnation[w])
        if status == ASSIGNED:
            assert holding.get(w, (state.epoch, p)) == (state.epoch, p)  # a retry gets the same assignment
            holding[w] = (state.epoch, p)
        else:
            assert w not in holding
            assert status == (DONE if state.finished else WAIT)
        return status

    for action, w in actions:
        if action == "acquire":
            acquire(w)
        elif action == "complete" and w in holding:
            complete(w)
        elif action == "retry" and w in last_done and last_done[w][0] == state.epoch:
            e, p = last_done[w]
            assert assignments.complete(state, w, incarnation[w], e, p) == state
        elif action == "die":
            if w in holding:
                e, p = holding.pop(w)
                lost[w].append((incarnation[w], e, p))
            state = assignments.release(state, w)
            assert all(h[0] != w for h in state.assigned.values())
            incarnation[w] += 1
            last_done.pop(w, None)
        elif action == "stale" and lost[w]:
            inc, e, p = lost[w][-1]
            try:
                new = assignments.complete(state, w, inc, e, p)
            except FailedPrecondition:
                continue
            assert new == state  # at most a no-op: a dead incarnation's work never counts
        # invariants after every step
        live = set(state.queued) | set(state.assigned) | set(state.done)
        if not state.finished:
            assert live == set(range(partitions))
            assert len(state.queued) + len(state.assigned) + len(state.done) == partitions
        assert _roundtrip(state) == state

    # the survivors finish the job
    for _ in range(10 * partitions * epochs + 10):
        if state.finished:
            break
        for w in range(4):
            if acquire(w) == ASSIGNED:
                complete(w)
    assert state.finished and state.epoch == epochs
    assert sorted(state.history) == list(range(epochs))
    for e, completed in state.history.items():
        assert sorted(completed) == list(range(partitions))
    assert {e: dict(c) for e, c in state.history.items()} == who
    assert counted == {(e, p): 1 for e in range(epochs) for p in range(partitions)}
    assert all(acquire(w) == DONE for w in range(4))
    assert _roundtrip(state) == state
