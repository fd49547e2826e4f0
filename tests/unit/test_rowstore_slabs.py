"""psserver.rowstore.Slabs: a store's per-slot arrays on anonymous mappings, grown in place
(mremap) where nothing else views them and copied where something does; either way a store's
rows survive growth, and capacity not yet written holds no memory."""
from __future__ import annotations

import numpy as np
import pytest

from shardps.pscommon.errors import ResourceExhausted
from shardps.psserver import rowstore, sparse_optim
from shardps.psserver.rowstore import RowStore, RowStoreConfig, Slabs

DIM = 4
F32 = np.dtype(np.float32)


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def adagrad_store(index="sorted", capacity=4):
    return RowStore(RowStoreConfig(dim=DIM, index=index, initial_capacity=capacity),
                    sparse_optim.build("adagrad", lr=0.1, initial_accumulator_value=0.5))


def test_a_slab_grows_keeping_its_rows_and_zeroing_the_new_ones():
    slabs = Slabs()
    a = slabs.new("values", 3, (DIM,), F32)
    assert a.shape == (3, DIM) and not a.any()
    a[:] = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM)
    del a   # nothing views the mapping: it is resized in place
    mapping = slabs._maps["values"]
    b = slabs.grow("values", 3, 1000, (DIM,), F32)
    assert slabs._maps["values"] is mapping
    assert b.shape == (1000, DIM)
    np.testing.assert_array_equal(b[:3], np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM))
    assert not b[3:].any()


def test_a_viewed_slab_is_copied_and_the_view_keeps_its_old_rows():
    slabs = Slabs()
    a = slabs.new("ids", 5, (), np.dtype(np.uint64))
    a[:] = [1, 2, 3, 2**64 - 1, 0]
    held = a[1:4]   # someone else's view: the mapping cannot move under it
    del a
    mapping = slabs._maps["ids"]
    b = slabs.grow("ids", 5, 64, (), np.dtype(np.uint64))
    assert slabs._maps["ids"] is not mapping
    assert b.tolist()[:5] == [1, 2, 3, 2**64 - 1, 0] and not b[5:].any()
    b[1] = 7
    assert held.tolist() == [2, 3, 2**64 - 1]   # the old copy, untouched by writes to the new one


def test_capacity_not_yet_written_holds_no_memory():
    slabs = Slabs()
    before = resident_bytes()
    a = slabs.new("values", 1 << 22, (64,), F32)   # 1 GiB of address space
    a[:16] = 1.0
    del a
    b = slabs.grow("values", 1 << 22, 1 << 23, (64,), F32)   # 2 GiB
    b[-1] = 2.0
    assert resident_bytes() - before < 256 << 20
    assert b[:16].all() and b[-1].all() and not b[16:1024].any()


@pytest.mark.parametrize("index", ["sorted", pytest.param("hash", marks=pytest.mark.skipif(
    not rowstore.hash_index_available(), reason="pandas is not installed"))])
def test_rows_and_optimizer_state_survive_many_doublings_with_and_without_a_held_view(index):
    store, model = adagrad_store(index), adagrad_store("sorted", capacity=1 << 16)   # the model never grows
    rng = np.random.default_rng(3)
    held = None
    for step in range(12):
        ids = rng.integers(0, 2**63, 1 + 40 * step, dtype=np.uint64)
        grads = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        for s in (store, model):
            s.lookup(ids)
            s.apply(ids, grads)
        if step == 6:
            held = store._values   # a view kept across the next growths: they copy instead
    assert store.stats().capacity < model.stats().capacity
    a, b = store.snapshot().arrays, model.snapshot().arrays
    order_a, order_b = np.argsort(a["ids"]), np.argsort(b["ids"])
    for name in ("ids", "values", "state.sum"):
        np.testing.assert_array_equal(a[name][order_a], b[name][order_b])
    assert held is not None and len(held) < store.stats().capacity


def test_a_slab_that_cannot_be_mapped_is_refused_with_a_typed_error():
    with pytest.raises(ResourceExhausted, match="cannot map"):
        RowStore(RowStoreConfig(dim=rowstore.MAX_DIM, initial_capacity=1 << 40), sparse_optim.build("sgd", lr=0.1))


def test_a_refused_growth_leaves_the_store_whole_and_usable():
    store = adagrad_store()
    ids = np.arange(1, 4, dtype=np.uint64)
    store.apply(ids, np.ones((3, DIM), np.float32))
    before = store.lookup(ids, create=False)
    with pytest.raises(ResourceExhausted):
        store._grow(1 << 56)   # 2**56 rows: no address space holds them
    assert store.stats().capacity == 4 and len(store) == 3
    np.testing.assert_array_equal(store.lookup(ids, create=False), before)
    more = np.arange(10, 20, dtype=np.uint64)   # grows for real now
    store.apply(more, np.ones((10, DIM), np.float32))
    assert len(store) == 13 and store.stats().capacity >= 13
    np.testing.assert_array_equal(store.lookup(ids, create=False), before)
