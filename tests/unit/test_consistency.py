"""psserver.consistency and psserver.ledger: the pure decisions behind the shard's gates, and
the shard as their executor (no network: Shard is driven directly)."""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardps.pscommon.config import MODES, JobSpec, OptimizerConfig
from shardps.pscommon.bounds import MAX_STEP_AHEAD
from shardps.pscommon.errors import (Aborted, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotYetMember,
                                     StaleIncarnation)
from shardps.pscommon.sharding import Key
from shardps.pscommon.wire.v1 import job_pb2, tensor_pb2
from shardps.psserver import consistency, ledger
from shardps.psserver.consistency import (HOLD, Accumulate, ApplyNow, Commit, CompleteStep, Excuse, GateState,
                                         LearnClock, Rebase, Refuse)
from shardps.psserver.consistency.async_mode import AsyncMode
from shardps.psserver.consistency.ssp import SSPMode
from shardps.psserver.consistency.sync import SyncMode
from shardps.psserver.shard import Shard, WorkerView
from conftest import poll


def _state(*workers: int, pending_from=(), **kw) -> GateState:
    state = GateState(live={w: 1 for w in workers}, **kw)
    for w in pending_from:
        _pushed(state, w)
    return state


def _pushed(state: GateState, worker: int) -> None:
    state.pending[frozenset((worker,))] = _g(worker)


def _g(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


# --- sync: decisions -----------------------------------------------------------------


def test_sync_push_is_staged_until_its_worker_commits():
    mode, state = SyncMode(shards=2), _state(0, 1, pending_from={0})
    grads = _g(2)
    decision = mode.on_push(state, 1, 0, grads)
    assert decision == Accumulate(1, grads) and decision.grads is grads   # even the last one


def test_sync_push_to_the_only_shard_commits_and_the_last_completes_the_step():
    mode, state = SyncMode(shards=1), _state(0, 1)
    grads = _g(2)
    assert mode.on_push(state, 0, 0, grads) == Accumulate(0, grads)
    _pushed(state, 0)
    assert mode.on_push(state, 1, 0, grads) == CompleteStep(1, grads)   # every push here counts
    # a worker that pushed and left still counts: its push reached the only shard
    assert mode.on_view_change(_state(1, pending_from={0, 1})) == CompleteStep(count=frozenset({0, 1}))


@given(live=st.sets(st.integers(0, 5), max_size=5), pushed=st.sets(st.integers(0, 5), max_size=5),
       committed=st.sets(st.integers(0, 5), max_size=5), completed=st.integers(0, 3), worker=st.integers(0, 6),
       step=st.integers(0, 4), settles=st.booleans(), resuming=st.booleans())
def test_sync_decisions_leave_the_state_alone(live, pushed, committed, completed, worker, step, settles, resuming):
    state = _state(*live, completed_step=completed, pending_from=pushed, resuming=resuming)
    state.committed = committed & pushed
    before = copy.deepcopy(state)
    mode = SyncMode(settles=settles, shards=2)
    mode.on_push(state, worker, step, _g(1, 2))
    mode.on_pull(state, worker, step)
    mode.on_view_change(state)
    mode.on_settled(state, step, frozenset(committed))
    mode.pull_ready(state, worker, step)
    mode.next_step(state, worker, step)
    assert (state.live, state.completed_step, state.pending_from, state.committed) == \
        (before.live, completed, before.pending_from, before.committed)
    for who, grads in state.pending.items():
        np.testing.assert_array_equal(grads["w"], before.pending[who]["w"])


def test_sync_late_push_is_refused_with_aborted():
    decision = SyncMode().on_push(_state(0, completed_step=3), 0, 2, _g(1))
    assert isinstance(decision, Refuse) and isinstance(decision.error, Aborted)
    assert "step 2 already completed" in str(decision.error)


def test_sync_push_for_a_future_step_is_refused_with_failed_precondition():
    decision = SyncMode().on_push(_state(0, completed_step=3, resuming=False), 0, 4, _g(1))
    assert isinstance(decision, Refuse) and isinstance(decision.error, FailedPrecondition)
    assert "step 4" in str(decision.error)


def test_sync_shard_that_restarted_adopts_the_step_a_push_names():
    # restored at step 3 while the workers are at 7: the push moves the shard, not the worker
    mode, state = SyncMode(), _state(0, 1, completed_step=3, pending_from={0}, resuming=True)
    assert mode.on_push(state, 1, 7, _g(1)) == Rebase(7)


def test_sync_pull_from_a_worker_whose_push_went_to_the_previous_life_excuses_it():
    # step 5 in progress; worker 0's push of 5 was lost with the restart, it now pulls 6
    mode, state = SyncMode(shards=2), _state(0, 1, completed_step=5, resuming=True)
    assert mode.on_pull(state, 0, 6) == Excuse(0)
    state.excused.add(0)
    assert mode.on_pull(state, 0, 6) is HOLD            # a second pull stream of the same step
    _pushed(state, 1)
    assert mode.on_view_change(state) is HOLD           # 1 pushed, but has not committed
    state.committed.add(1)
    assert mode.on_view_change(state) == CompleteStep(count=frozenset({1}))


def test_sync_pull_ahead_of_a_restarted_shard_rebases_it():
    mode = SyncMode()
    assert mode.on_pull(_state(0, completed_step=2, resuming=True), 0, 9) == Rebase(8)
    # a shard that has completed a step since it started is not behind: the pull waits
    assert mode.on_pull(_state(0, completed_step=2, resuming=False), 0, 9) is HOLD


def test_sync_pulls_of_the_next_step_commit_and_the_last_completes_it():
    mode, state = SyncMode(shards=2), _state(0, 1, completed_step=4, pending_from={0, 1})
    assert mode.on_pull(state, 0, 5) == Commit(0)
    state.committed.add(0)
    assert mode.on_pull(state, 0, 5) is HOLD           # a second stream: 1 has not committed
    assert mode.on_pull(state, 1, 5) == Commit(1)
    state.committed.add(1)
    assert mode.on_pull(state, 1, 5) == CompleteStep(count=frozenset({0, 1}))


def test_sync_pull_without_a_push_here_excuses_the_worker():
    mode, state = SyncMode(shards=2), _state(0, 1, completed_step=4, pending_from={1})
    state.committed.add(1)
    assert mode.on_pull(state, 0, 5) == Excuse(0)
    state.excused.add(0)
    assert mode.on_pull(state, 0, 5) == CompleteStep(count=frozenset({1}))


@pytest.mark.parametrize("step, kw", [
    (3, {}),                              # a laggard: the step it names is done
    (5, {"excused": {0}}),                # excused, and worker 1 has not committed
])
def test_sync_pull_in_the_normal_course_decides_nothing(step, kw):
    assert SyncMode().on_pull(_state(0, 1, completed_step=4, **kw), 0, step) is HOLD


def test_sync_pull_by_a_non_member_excuses_nobody():
    assert SyncMode().on_pull(_state(1, completed_step=4, resuming=True), 0, 5) is HOLD


def test_sync_second_push_of_the_same_step_is_refused():
    decision = SyncMode().on_push(_state(0, 1, pending_from={0}), 0, 0, _g(1))
    assert isinstance(decision, Refuse) and isinstance(decision.error, FailedPrecondition)
    assert "already pushed" in str(decision.error)


def test_sync_a_departed_workers_push_counts_only_if_it_committed():
    # 0 committed, then left; 1 pushed and left without saying its push reached every shard;
    # 2 is live and committed: the step completes with 0 and 2, and 1's push is dropped
    state = _state(2, pending_from={0, 1, 2})
    state.committed |= {0, 2}
    assert SyncMode(shards=2).on_view_change(state) == CompleteStep(count=frozenset({0, 2}))


def test_sync_view_change_keeps_waiting_for_a_live_worker():
    state = _state(0, 1, 2, pending_from={0, 1})
    state.committed |= {0, 1}
    assert SyncMode(shards=2).on_view_change(state) is HOLD


def test_sync_view_change_without_commitments_completes_nothing():
    assert SyncMode(shards=2).on_view_change(_state()) is HOLD
    assert SyncMode(shards=2).on_view_change(_state(0)) is HOLD
    assert SyncMode(shards=2).on_view_change(_state(pending_from={0})) is HOLD   # 0 left before committing


def test_sync_follower_completes_only_with_the_settled_outcome():
    mode, state = SyncMode(settles=False), _state(0, 1, completed_step=4, pending_from={0, 1})
    assert mode.on_pull(state, 0, 5) is HOLD           # it never commits or excuses anyone
    assert mode.on_view_change(_state(pending_from={0})) is HOLD
    assert mode.on_settled(state, 3, frozenset({0})) is HOLD          # an old outcome
    assert mode.on_settled(state, 4, frozenset({1})) == CompleteStep(count=frozenset({1}))
    # a follower a whole step behind restarted: its pushes went to its previous life
    assert mode.on_settled(state, 6, frozenset({0, 1})) == Rebase(6)


def test_sync_settling_shard_ignores_outcomes():
    assert SyncMode().on_settled(_state(0, completed_step=4, pending_from={0}), 4, frozenset()) is HOLD


@given(completed=st.integers(0, 50), step=st.integers(0, 50))
def test_sync_pull_ready_iff_step_completed(completed, step):
    assert SyncMode().pull_ready(_state(0, completed_step=completed), 0, step) == (completed >= step)


def test_sync_next_step_moves_laggards_forward_only():
    mode, state = SyncMode(), _state(0, completed_step=5)
    assert mode.next_step(state, 0, 2) == 5
    assert mode.next_step(state, 0, 7) == 7


# --- ssp -----------------------------------------------------------------------------


@given(clocks=st.dictionaries(st.integers(0, 5), st.integers(0, 30), max_size=5),
       step=st.integers(0, 40), staleness=st.integers(1, 5))
def test_ssp_pull_ready_iff_within_staleness_of_the_slowest(clocks, step, staleness):
    state = GateState(live={w: 1 for w in clocks}, clocks=dict(clocks))
    expected = not clocks or step - min(clocks.values()) <= staleness
    assert SSPMode(staleness).pull_ready(state, 0, step) == expected


def test_ssp_slowest_worker_leaving_releases_the_others():
    mode = SSPMode(2)
    state = GateState(live={0: 1, 1: 1, 2: 1}, clocks={0: 6, 1: 3, 2: 5})
    assert not mode.pull_ready(state, 0, 6)
    del state.live[1]
    assert mode.pull_ready(state, 0, 6)


def test_ssp_joiner_counts_at_its_start_clock():
    mode = SSPMode(1)
    state = GateState(live={0: 1, 1: 1}, clocks={0: 5}, start_clock={1: 4})
    assert mode.pull_ready(state, 0, 5)
    assert not mode.pull_ready(state, 0, 6)
    state.clocks[1] = 5
    assert mode.pull_ready(state, 0, 6)


def test_ssp_joiner_starts_at_the_exact_slowest_clock_of_the_others():
    # the scheduler gave worker 2 clock 10 (heartbeats lag); the gate knows 0 and 1 are at 40, 37
    mode = SSPMode(2)
    state = GateState(live={0: 1, 1: 1, 2: 1}, clocks={0: 40, 1: 37}, start_clock={2: 10}, heard={0, 1})
    assert mode.next_step(state, 2, 10) == 37
    assert mode.next_step(state, 2, 50) == 50       # never moved back
    assert mode.next_step(state, 0, 40) == 40       # a worker the shard hears from keeps its clock
    assert mode.on_pull(state, 2, 37) == LearnClock(2, 37)
    state.clocks[2] = 37
    assert mode.on_pull(state, 2, 37) is HOLD       # already known
    state.heard.add(2)
    assert mode.on_pull(state, 2, 99) is HOLD       # heard from: its pushes set its clock


def test_ssp_learns_no_clock_of_a_non_member():
    state = GateState(live={0: 1}, clocks={0: 3})
    assert SSPMode(2).on_pull(state, 7, 100) is HOLD


def test_ssp_with_no_live_workers_is_ready():
    assert SSPMode(1).pull_ready(GateState(clocks={0: 0}), 0, 100)


def test_ssp_applies_pushes_on_arrival():
    grads = _g(5)
    decision = SSPMode(2).on_push(_state(0, 1), 0, 0, grads)
    assert isinstance(decision, ApplyNow) and decision.grads is grads
    assert SSPMode(2).on_view_change(_state(0)) is HOLD


# --- async ---------------------------------------------------------------------------


def test_async_is_always_ready_and_applies_on_arrival():
    mode, state = AsyncMode(), _state(0, 1)
    assert mode.pull_ready(state, 0, 10 ** 6)
    grads = _g(7)
    decision = mode.on_push(state, 1, 99, grads)
    assert isinstance(decision, ApplyNow) and decision.grads is grads
    assert mode.on_view_change(state) is HOLD


# --- registry ------------------------------------------------------------------------


def test_registry_covers_every_mode_enum_value():
    modes = {v for v in job_pb2.Mode.values() if v != job_pb2.MODE_UNSPECIFIED}
    assert set(consistency.REGISTRY) == modes


@pytest.mark.parametrize("name", sorted(MODES))
def test_for_job_looks_the_mode_up_by_its_enum(name):
    job = JobSpec(mode=name, staleness=3)
    assert consistency.mode_of(job) == job.to_proto().mode
    mode = consistency.for_job(job)
    assert type(mode) is consistency.REGISTRY[job.to_proto().mode] and mode.name == name
    assert mode.staleness == 3


def test_mode_properties_say_what_the_executor_records():
    got = {m.name: (m.records_pull_wait, m.measures_staleness) for m in consistency.REGISTRY.values()}
    assert got == {"async": (False, True), "ssp": (True, True), "sync": (True, False)}


# --- the shard executes ----------------------------------------------------------------

N = 4


class SteppingClock:
    """A clock that moves `step` seconds each time it is read."""

    def __init__(self, step: float):
        self.t, self.step = 100.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def _shard(mode: str, workers=(0, 1), now=None, staleness: int = 0, shards: int = 1) -> Shard:
    # lr 1 and SGD: value = -(sum of applied gradients), exactly
    job = JobSpec(mode=mode, staleness=staleness, num_servers=shards, optimizer=OptimizerConfig(kind="sgd", lr=1.0))
    shard = Shard(0, job) if now is None else Shard(0, job, now=now)
    key = Key("w", "w", tensor_pb2.DTYPE_FLOAT32, (N,), 0, N, 0)
    shard.declare("fp", [key], {"w": np.zeros(N, np.float32)})
    shard.set_view(1, [WorkerView(w, 1, True, 0) for w in workers])
    return shard


def _sync_push(shard: Shard, worker: int, step: int, grads: dict, base_version: int = 0):
    """A worker's sync push, then its word that the push reached every shard (this one)."""
    got = shard.push(worker, 1, step, base_version, grads)
    shard.settle(worker, 1, step + 1, timeout_s=1.0, wait=False)
    return got


def test_shard_applies_the_exact_average_of_a_sync_step():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(4)]
    shard = _shard("sync", workers=range(4))
    for w in (2, 0, 3, 1):   # in any order of arrival, summed in worker order
        _sync_push(shard, w, 0, {"w": grads[w]})
    expected = (((grads[0] + grads[1]) + grads[2]) + grads[3]) / np.float32(4)
    np.testing.assert_array_equal(shard.entries["w"].value, -expected)
    gate = shard.gate
    assert (gate.completed_step, shard.version, gate.pending_from, gate.pending) == (1, 1, set(), {})
    assert shard.settled == (0, frozenset(range(4)))


def test_shard_keeps_a_pending_sync_step_until_the_last_commitment():
    shard = _shard("sync", shards=2)   # shard 0 of two: a push alone does not reach every shard
    first = np.array([1, 2, 3, 4], np.float32)
    _sync_push(shard, 0, 0, {"w": first})
    shard.push(1, 1, 0, 0, {"w": np.ones(N, np.float32)})
    assert shard.gate.pending_from == {0, 1} and shard.gate.committed == {0} and shard.version == 0
    shard.settle(1, 1, 1, timeout_s=1.0, wait=False)
    assert shard.gate.completed_step == 1 and shard.version == 1
    np.testing.assert_array_equal(first, [1, 2, 3, 4])  # the sum was a copy, not the pushed array


def test_shard_completes_a_sync_step_when_a_worker_leaves():
    shard = _shard("sync", workers=(0, 1, 2), shards=2)
    _sync_push(shard, 0, 0, _g(2, 2, 2, 2))
    _sync_push(shard, 1, 0, _g(4, 4, 4, 4))
    shard.push(2, 1, 0, 0, _g(100, 100, 100, 100))   # and leaves before saying it reached every shard
    shard.set_view(2, [WorkerView(0, 1, True, 1), WorkerView(1, 1, True, 1), WorkerView(2, 1, False, 0)])
    assert shard.gate.completed_step == 1 and shard.dropped_pushes == 1
    np.testing.assert_array_equal(shard.entries["w"].value, [-3] * N)


def test_follower_shard_completes_a_step_with_the_settled_outcome_only():
    """Shard 1 of two: worker 2's push reached it but not the settling shard, so the outcome
    leaves it out, and shard 1 drops it too; nothing completes here before an outcome."""
    job = JobSpec(mode="sync", num_servers=2, optimizer=OptimizerConfig(kind="sgd", lr=1.0))
    shard = Shard(1, job)
    key = Key("w", "w", tensor_pb2.DTYPE_FLOAT32, (N,), 0, N, 1)
    shard.declare("fp", [key], {"w": np.zeros(N, np.float32)})
    shard.set_view(1, [WorkerView(w, 1, True, 0) for w in (0, 1, 2)])
    for w, v in ((0, 2), (1, 4), (2, 100)):
        shard.push(w, 1, 0, 0, _g(v, v, v, v))
    shard.set_view(2, [WorkerView(0, 1, True, 0), WorkerView(1, 1, True, 0), WorkerView(2, 1, False, 0)])
    assert shard.gate.completed_step == 0 and shard.version == 0
    settled, _, _ = shard.settle(0, 1, 1, timeout_s=1.0)   # a commitment here decides nothing
    assert settled is None and shard.gate.completed_step == 0
    version, next_step, _ = shard.wait_pull(0, 1, 1, timeout_s=1.0, settled=(0, frozenset({0, 1})))
    assert (version, next_step, shard.gate.completed_step, shard.dropped_pushes) == (1, 1, 1, 1)
    np.testing.assert_array_equal(shard.entries["w"].value, [-3] * N)


def test_shard_records_nothing_of_a_refused_push():
    shard, ones = _shard("sync"), _g(1, 1, 1, 1)
    _sync_push(shard, 0, 0, ones)
    _sync_push(shard, 1, 0, ones)          # step 0 complete
    shard.push(0, 1, 1, 1, ones)          # step 1 in progress
    shard.set_view(2, [WorkerView(0, 1, True, 0), WorkerView(1, 1, True, 0), WorkerView(2, 2, True, 0)])

    def recorded():
        gate = shard.gate
        return (dict(shard.ledger), dict(gate.clocks), shard.pushes, shard.version, set(gate.pending_from),
                {who: g["w"].tolist() for who, g in gate.pending.items()})
    before = recorded()
    with pytest.raises(Aborted, match="step 0 already completed"):
        shard.push(2, 2, 0, 0, ones)      # a worker that just joined, late
    with pytest.raises(FailedPrecondition, match="pull first"):
        shard.push(1, 1, 2, 1, ones)      # ahead of the step in progress
    assert recorded() == before


@pytest.mark.parametrize("mode", MODES)
def test_only_members_of_the_view_push_or_pull(mode):
    """A worker the view should name but does not (pruned, or never joined) is refused; one
    newer than the view (joined after it) is told to retry, and is taken once the view names
    it; neither changes anything meanwhile."""
    shard, ones = _shard(mode, workers=(0, 1), staleness=1 if mode == "ssp" else 0), _g(1, 1, 1, 1)
    before = (dict(shard.ledger), dict(shard.gate.clocks), shard.pushes, shard.pulls, shard.version)
    with pytest.raises(StaleIncarnation, match="worker 7 incarnation 1 is not a member of shard 0's membership view 1"):
        shard.push(7, 1, 0, 0, ones)
    with pytest.raises(StaleIncarnation, match="not a member"):
        shard.wait_pull(7, 1, 0, timeout_s=1.0)
    with pytest.raises(NotYetMember, match="has not yet seen worker 2 incarnation 2 join"):
        shard.push(2, 2, 0, 0, ones)
    with pytest.raises(NotYetMember):
        shard.wait_pull(2, 2, 0, timeout_s=1.0)
    assert (dict(shard.ledger), dict(shard.gate.clocks), shard.pushes, shard.pulls, shard.version) == before
    assert shard.wait_pull(0, 1, 0, timeout_s=1.0, observer=True)[0] == 0   # observers read without a gate
    shard.set_view(2, [WorkerView(w, inc, True, 0) for w, inc in ((0, 1), (1, 1), (2, 2))])
    shard.wait_pull(2, 2, 0, timeout_s=1.0)
    assert shard.push(2, 2, 0, 0, ones)[1] is False
    with pytest.raises(StaleIncarnation):      # the joiner's older incarnation, now that the view names it
        shard.push(2, 1, 1, 0, ones)


def test_a_shard_without_a_view_checks_no_membership():
    """A shard used as a library, with no scheduler to name members; the server daemon adopts a
    view before it serves."""
    job = JobSpec(mode="async", optimizer=OptimizerConfig(kind="sgd", lr=1.0))
    shard = Shard(0, job)
    shard.declare("fp", [Key("w", "w", tensor_pb2.DTYPE_FLOAT32, (N,), 0, N, 0)], {"w": np.zeros(N, np.float32)})
    assert shard.push(9, 3, 0, 0, _g(1, 1, 1, 1)) == (1, False, 0)


@pytest.mark.parametrize("mode, measured", [("async", True), ("ssp", True), ("sync", False)])
def test_shard_measures_staleness_where_the_mode_says(mode, measured):
    shard = _shard(mode, workers=(0,), staleness=1 if mode == "ssp" else 0)
    shard.push(0, 1, 0, 0, _g(1, 1, 1, 1))
    shard.push(0, 1, 1, 0, _g(1, 1, 1, 1))   # computed on version 0; the shard is at 1
    assert shard.staleness.total == (2 if measured else 0)
    assert shard.staleness.max == (1 if measured else 0)


@pytest.mark.parametrize("mode, recorded", [("async", False), ("ssp", True), ("sync", True)])
def test_shard_records_pull_waits_where_the_mode_says(mode, recorded):
    shard = _shard(mode, now=SteppingClock(0.25), staleness=1 if mode == "ssp" else 0)
    shard.wait_pull(0, 1, 0, timeout_s=5.0)
    assert shard.pull_wait.total == (1 if recorded else 0)
    assert shard.pull_wait.sum == (0.25 if recorded else 0.0)


def test_shard_pull_gives_up_at_its_deadline_on_the_injected_clock():
    shard = _shard("sync", now=SteppingClock(10.0))
    with pytest.raises(DeadlineExceeded, match="not admitted by sync within 5.0s"):
        shard.wait_pull(0, 1, 1, timeout_s=5.0)  # step 1 waits for step 0, which nobody pushed
    assert shard.pulls == 0


# --- ledger --------------------------------------------------------------------------


def test_ledger_first_push_applies():
    assert ledger.classify({}, 0, 1, 0) is ledger.Verdict.APPLY


def test_ledger_retry_at_or_below_watermark_is_duplicate():
    book: dict = {}
    ledger.record(book, 0, 1, 3)
    assert ledger.classify(book, 0, 1, 3) is ledger.Verdict.DUPLICATE
    assert ledger.classify(book, 0, 1, 1) is ledger.Verdict.DUPLICATE
    assert ledger.classify(book, 0, 1, 4) is ledger.Verdict.APPLY
    assert ledger.classify(book, 1, 1, 0) is ledger.Verdict.APPLY


def test_ledger_new_incarnation_resets_the_watermark():
    book: dict = {}
    ledger.record(book, 0, 1, 10)
    assert ledger.classify(book, 0, 2, 4) is ledger.Verdict.APPLY
    ledger.record(book, 0, 2, 4)
    assert ledger.classify(book, 0, 2, 4) is ledger.Verdict.DUPLICATE


def test_ledger_stale_incarnation_is_failed_precondition():
    book: dict = {}
    ledger.record(book, 0, 3, 0)
    with pytest.raises(FailedPrecondition, match="incarnation 2 is stale"):
        ledger.classify(book, 0, 2, 5)


def test_ledger_json_round_trip():
    book: dict = {}
    ledger.record(book, 0, 3, 7)
    ledger.record(book, 12, 1, -1)
    assert ledger.from_json(ledger.to_json(book)) == book
    assert book[0] == ledger.LedgerEntry(3, 7)


# --- a shard that restarted behind the workers ----------------------------------------


def test_restarted_sync_shard_takes_the_workers_step_and_excuses_the_lost_push():
    # the shard came back at step 0; the workers are at step 7. Worker 0's push of step 7 went
    # to the shard's previous life (it now pulls 8); worker 1 pushes step 7 after the restart.
    shard = _shard("sync")
    got = {}

    def pull_8():
        got["pull"] = shard.wait_pull(0, 1, 8, timeout_s=30.0)

    t = threading.Thread(target=pull_8)
    t.start()
    poll(lambda: shard.gate.completed_step == 7 and shard.gate.excused == {0}, what="the rebase")
    assert shard.rebases == 1 and not got
    version, duplicate, _ = _sync_push(shard, 1, 7, _g(2, 2, 2, 2))
    t.join(30.0)
    assert not duplicate and got["pull"][1] == 8
    # step 7 averaged over the one gradient that reached this shard: worker 1's
    np.testing.assert_array_equal(shard.entries["w"].value, [-2] * N)
    assert (shard.gate.completed_step, shard.gate.resuming, shard.gate.excused) == (8, False, set())


def test_restarted_sync_shard_completes_a_step_whose_pushes_were_all_lost():
    # both workers pushed step 3 to the shard's previous life and now pull step 4
    shard = _shard("sync")
    results = []
    threads = [threading.Thread(target=lambda w=w: results.append(shard.wait_pull(w, 1, 4, timeout_s=30.0)))
               for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    assert len(results) == 2 and shard.gate.completed_step == 4
    np.testing.assert_array_equal(shard.entries["w"].value, [0] * N)   # nothing to apply
    assert shard.version == 0


def test_sync_shard_in_its_normal_course_refuses_a_push_from_the_future():
    shard, ones = _shard("sync"), _g(1, 1, 1, 1)
    _sync_push(shard, 0, 0, ones)
    _sync_push(shard, 1, 0, ones)          # a step completed: no longer resuming
    with pytest.raises(FailedPrecondition, match="push for step 5 while step 1"):
        shard.push(0, 1, 5, 1, ones)
    assert shard.gate.completed_step == 1 and shard.rebases == 0


def test_restarted_ssp_shard_learns_each_clock_from_the_pull():
    # restored with stale clocks (both at 2) while the workers are at 9 and 10: each pull
    # tells the shard its caller's clock, so neither waits for a worker it believes is at 2
    shard = _shard("ssp", staleness=1)
    shard.gate.clocks = {0: 2, 1: 2}
    with pytest.raises(DeadlineExceeded):       # worker 0 still believed at 2: 10 - 2 > 1
        shard.wait_pull(1, 1, 10, timeout_s=0.0)
    assert shard.gate.clocks == {0: 2, 1: 10}   # ... but the refused pull told us 1's clock
    shard.wait_pull(0, 1, 9, timeout_s=0.0)     # 0 at 9 is the slowest: admitted
    shard.wait_pull(1, 1, 10, timeout_s=0.0)    # 10 - 9 <= 1
    assert shard.gate.clocks == {0: 9, 1: 10}


@pytest.mark.parametrize("mode", [AsyncMode(), SSPMode(staleness=2)])
def test_async_and_ssp_refuse_a_push_far_past_the_workers_clock_here(mode):
    state = GateState(live={1: 0}, clocks={1: 10}, heard={1})
    assert isinstance(mode.on_push(state, 1, 10 + MAX_STEP_AHEAD, {}), ApplyNow)
    refused = mode.on_push(state, 1, 11 + MAX_STEP_AHEAD, {})
    assert isinstance(refused, Refuse) and isinstance(refused.error, InvalidArgument)
    assert "clock 10" in str(refused.error)
    # not heard since this shard started (it restarted, or a new incarnation): its clock here
    # is old, and the step it names is the news
    state.heard.clear()
    assert isinstance(mode.on_push(state, 1, 11 + MAX_STEP_AHEAD, {}), ApplyNow)
