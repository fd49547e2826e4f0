"""psserver.rowstore's one-pass path for new rows (HashIndex.get_or_add, used while a hash-indexed
table without admission or a cap has never evicted), the stamp a push skips after a pull at
the same clock, and as_ids' pass-through: each against the sorted index's general path, which
the same calls take there, so both must end in the same rows, state, stamps and counters."""
from __future__ import annotations

import numpy as np
import pytest

from shardps.psserver import rowstore, sparse_optim
from shardps.psserver.rowstore import HashIndex, Initializer, RowStore, RowStoreConfig

pytestmark = pytest.mark.skipif(not rowstore.hash_index_available() or not HashIndex().adds,
                                reason="pandas' hash table (with get_labels) is not installed")

DIM = 4
EDGE = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 2, 12345], np.uint64)


def store(index, initializer=Initializer.constant(1.0), **cfg):
    return RowStore(RowStoreConfig(dim=DIM, index=index, initializer=initializer, initial_capacity=4, **cfg),
                    sparse_optim.build("adagrad", lr=0.1, initial_accumulator_value=0.1))


def by_id(snap):
    order = np.argsort(snap.arrays["ids"])
    return {k: v[order] for k, v in snap.arrays.items()}


def assert_same(a: RowStore, b: RowStore):
    sa, sb = by_id(a.snapshot()), by_id(b.snapshot())
    assert sa.keys() == sb.keys()
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)
    fa, fb = a.stats(), b.stats()
    assert (fa.rows, fa.admitted, fa.evicted_idle, fa.step, fa.clock) == (fb.rows, fb.admitted, fb.evicted_idle,
                                                                         fb.step, fb.clock)


def test_get_or_add_gives_new_ids_the_next_slots_in_order_of_first_appearance():
    index = HashIndex()
    index.put(np.array([7, 2**63], np.uint64), np.array([0, 1], np.int64))
    ids = np.array([2**64 - 1, 7, 0, 2**64 - 1, 2**63, 5], np.uint64)
    slots, new = index.get_or_add(ids, 2)
    assert slots.tolist() == [2, 0, 3, 2, 1, 4]
    assert new.dtype == np.uint64 and new.tolist() == [2**64 - 1, 0, 5]
    assert index.get(ids).tolist() == slots.tolist()
    assert index.get_or_add(np.empty(0, np.uint64), 5)[0].size == 0


@pytest.mark.parametrize("initializer", [Initializer.constant(1.0), Initializer.normal(0.5, seed=3),
                                         Initializer()])
def test_the_one_pass_path_ends_where_the_general_path_does(initializer):
    """Lookups with repeats and edge ids, pushes of looked-up and of never-seen ids, then idle
    eviction (tombstones and free slots: the hash store leaves the one-pass path) and more."""
    fast, general = store("hash", initializer), store("sorted", initializer)
    rng = np.random.default_rng(5)
    for step in range(30):
        ids = np.concatenate([EDGE[: 1 + step % len(EDGE)], rng.integers(0, 40 + 10 * step, 25).astype(np.uint64)])
        fresh = np.unique(rng.integers(2**40, 2**41, 6).astype(np.uint64))
        for s in (fast, general):
            s.lookup(ids)
            s.apply_unique(np.unique(ids), np.full((len(np.unique(ids)), DIM), 0.01, np.float32))
            s.apply_unique(fresh, np.full((len(fresh), DIM), -0.02, np.float32))
            s.advance()
            if step == 15:
                assert s.evict_idle(3) > 0
        assert_same(fast, general)
    assert fast._index.tombstones and len(fast) == len(general)


def test_a_push_after_a_pull_at_a_later_clock_stamps_its_rows_with_that_clock():
    ids = np.array([3, 9, 2**63], np.uint64)
    grads = np.full((3, DIM), 0.5, np.float32)
    for index in ("hash", "sorted"):
        s = store(index)
        s.advance(2)
        s.lookup(ids)
        s.apply_unique(ids, grads)   # the same clock: the pull's stamp stands
        assert s.snapshot().arrays["last_touch"].tolist() == [2.0] * 3
        s.lookup(ids)
        s.advance(7)
        s.apply_unique(ids, grads)   # the push's slots come from the pull's, its clock is newer
        assert s.snapshot().arrays["last_touch"].tolist() == [7.0] * 3
        assert s.evict_idle(6) == 0 and s.snapshot().arrays["touches"].tolist() == [2] * 3


def test_new_rows_start_from_the_initializer_and_optimizer_state_on_fresh_and_reused_slots():
    s = store("hash", Initializer.constant(0.25))
    s.lookup(np.arange(10, dtype=np.uint64))
    s.advance(5)
    assert s.evict_idle(5) == 10   # every slot is free now, and the index holds tombstones
    rows = s.lookup(np.arange(100, 104, dtype=np.uint64))
    np.testing.assert_array_equal(rows, np.full((4, DIM), 0.25, np.float32))
    snap = s.snapshot().arrays
    np.testing.assert_array_equal(snap["state.sum"], np.full((4, DIM), 0.1, np.float32))
    assert snap["touches"].tolist() == [1] * 4 and snap["last_touch"].tolist() == [5.0] * 4


def test_as_ids_passes_a_uint64_vector_through_and_converts_the_rest():
    ids = np.array([1, 2**64 - 1], np.uint64)
    assert rowstore.as_ids(ids) is ids
    assert rowstore.as_ids(np.array([1, -1], np.int64)).tolist() == [1, 2**64 - 1]
    strided = np.arange(6, dtype=np.uint64)[::2]
    out = rowstore.as_ids(strided)
    assert out.flags.c_contiguous and out.tolist() == [0, 2, 4]
