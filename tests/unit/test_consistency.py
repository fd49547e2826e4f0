"""psserver.consistency and psserver.ledger: the pure decisions behind the shard's gates."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardps.pscommon.errors import Aborted, FailedPrecondition
from shardps.pscommon.wire.v1 import job_pb2
from shardps.psserver import consistency, ledger
from shardps.psserver.consistency import GateState
from shardps.psserver.consistency.async_mode import AsyncMode
from shardps.psserver.consistency.ssp import SSPMode
from shardps.psserver.consistency.sync import SyncMode


def _state(*workers: int, **kw) -> GateState:
    return GateState(live={w: 1 for w in workers}, **kw)


def _g(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


# --- sync ----------------------------------------------------------------------------


def test_sync_step_waits_for_every_live_worker():
    mode, state = SyncMode(), _state(0, 1, 2)
    assert mode.on_push(state, 0, 0, _g(1)).apply is None
    assert mode.on_push(state, 1, 0, _g(2)).apply is None
    out = mode.on_push(state, 2, 0, _g(6))
    assert out.completes_step and out.contributors == 3
    assert state.completed_step == 1 and not state.pending_from and not state.pending_sum


def test_sync_average_is_exact():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(4)]
    mode, state = SyncMode(), _state(0, 1, 2, 3)
    for w, g in enumerate(grads):
        out = mode.on_push(state, w, 0, {"k": g})
    expected = (((grads[0] + grads[1]) + grads[2]) + grads[3]) / np.float32(4)
    assert out.apply["k"].dtype == np.float32
    np.testing.assert_array_equal(out.apply["k"], expected)


def test_sync_does_not_alias_the_first_pushed_gradient():
    mode, state = SyncMode(), _state(0, 1)
    first = _g(1, 2)
    mode.on_push(state, 0, 0, first)
    mode.on_push(state, 1, 0, _g(3, 4))
    np.testing.assert_array_equal(first["w"], [1, 2])


def test_sync_worker_leaving_mid_step_completes_it():
    mode, state = SyncMode(), _state(0, 1, 2)
    mode.on_push(state, 0, 0, _g(2))
    mode.on_push(state, 1, 0, _g(4))
    del state.live[2]
    out = mode.on_view_change(state)
    assert out.completes_step and out.contributors == 2
    np.testing.assert_array_equal(out.apply["w"], [3])
    assert state.completed_step == 1


def test_sync_departed_workers_push_stays_in_the_average():
    mode, state = SyncMode(), _state(0, 1, 2)
    mode.on_push(state, 0, 0, _g(3))
    del state.live[0]
    assert mode.on_view_change(state).apply is None
    mode.on_push(state, 1, 0, _g(6))
    out = mode.on_push(state, 2, 0, _g(9))
    assert out.contributors == 3
    np.testing.assert_array_equal(out.apply["w"], [6])


def test_sync_view_change_without_pushes_completes_nothing():
    mode, state = SyncMode(), _state(0)
    del state.live[0]
    assert mode.on_view_change(state).apply is None
    assert state.completed_step == 0


def test_sync_late_push_is_aborted():
    mode, state = SyncMode(), _state(0, completed_step=3)
    with pytest.raises(Aborted, match="step 2 already completed"):
        mode.on_push(state, 0, 2, _g(1))
    assert not state.pending_from


def test_sync_push_for_a_future_step_is_failed_precondition():
    mode, state = SyncMode(), _state(0, completed_step=3)
    with pytest.raises(FailedPrecondition, match="step 4"):
        mode.on_push(state, 0, 4, _g(1))


def test_sync_second_push_of_the_same_step_is_failed_precondition():
    mode, state = SyncMode(), _state(0, 1)
    mode.on_push(state, 0, 0, _g(1))
    with pytest.raises(FailedPrecondition, match="already pushed"):
        mode.on_push(state, 0, 0, _g(1))


def test_sync_joiner_is_waited_for_in_the_step_in_progress():
    mode, state = SyncMode(), _state(0, 1)
    mode.on_push(state, 0, 0, _g(1))
    state.live[2] = 1
    assert mode.on_push(state, 1, 0, _g(2)).apply is None
    out = mode.on_push(state, 2, 0, _g(3))
    assert out.contributors == 3


@given(completed=st.integers(0, 50), step=st.integers(0, 50))
def test_sync_pull_ready_iff_step_completed(completed, step):
    assert SyncMode().pull_ready(_state(0, completed_step=completed), 0, step) == (completed >= step)


def test_sync_next_step_moves_laggards_forward_only():
    mode, state = SyncMode(), _state(0, completed_step=5)
    assert mode.next_step(state, 0, 2) == 5
    assert mode.next_step(state, 0, 7) == 7


def test_sync_runs_consecutive_steps():
    mode, state = SyncMode(), _state(0, 1)
    for step in range(3):
        assert not mode.pull_ready(state, 0, step + 1)
        mode.on_push(state, 0, step, _g(step))
        out = mode.on_push(state, 1, step, _g(step + 2))
        np.testing.assert_array_equal(out.apply["w"], [step + 1])
        assert mode.pull_ready(state, 1, step + 1)


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


def test_ssp_with_no_live_workers_is_ready():
    assert SSPMode(1).pull_ready(GateState(clocks={0: 0}), 0, 100)


def test_ssp_applies_pushes_on_arrival():
    out = SSPMode(2).on_push(_state(0, 1), 0, 0, _g(5))
    assert out.contributors == 1
    np.testing.assert_array_equal(out.apply["w"], [5])


# --- async ---------------------------------------------------------------------------


def test_async_is_always_ready_and_applies_on_arrival():
    mode, state = AsyncMode(), _state(0, 1)
    assert mode.pull_ready(state, 0, 10 ** 6)
    grads = _g(7)
    out = mode.on_push(state, 1, 99, grads)
    assert out.apply is grads and out.contributors == 1
    assert mode.on_view_change(state).apply is None


def test_registry_covers_every_mode_enum_value():
    modes = {v for v in job_pb2.Mode.values() if v != job_pb2.MODE_UNSPECIFIED}
    assert set(consistency.REGISTRY) == modes
    assert isinstance(consistency.build("ssp", 3), SSPMode) and consistency.build("ssp", 3).staleness == 3


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
