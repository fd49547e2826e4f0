"""psserver.rowstore: the rows of one embedding table, against a dict model and by property.

Each test runs on both indexes (pandas' hash table where pandas is installed, and the
pure-numpy sorted index), since the store picks one at run time."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shardps.pscommon.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from shardps.psserver import rowstore, sparse_optim
from shardps.psserver.rowstore import Initializer, RowStore, RowStoreConfig

DIM = 4
INDEXES = [pytest.param("sorted"),
           pytest.param("hash", marks=pytest.mark.skipif(not rowstore.hash_index_available(),
                                                         reason="pandas is not installed"))]
# ids that break careless code: 0, the int64 extremes, ones that read negative as int64
EDGE = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 2, 0x9E3779B97F4A7C15, 12345], np.uint64)
INIT = Initializer.normal(0.5, seed=9)


def make(index, opt=None, **cfg):
    cfg.setdefault("initializer", INIT)
    return RowStore(RowStoreConfig(dim=DIM, index=index, **cfg), opt or sparse_optim.build("sgd", lr=0.5))


def init_row(i):
    return INIT.rows(np.array([i], np.uint64), DIM)[0]


def ones(n, value=1.0):
    return np.full((n, DIM), value, np.float32)


# ---------------------------------------------------------------- against a dict model

class Model:
    """What the store should hold: id -> row, id -> clock of last touch (SGD, lr 0.5)."""

    def __init__(self):
        self.rows, self.last, self.clock = {}, {}, 0.0

    def lookup(self, ids):
        for i in ids:
            self.rows.setdefault(i, init_row(i))
            self.last[i] = self.clock

    def apply(self, ids, grads):
        summed = {}
        for i, g in zip(ids, grads):
            summed[i] = summed[i] + g if i in summed else g.copy()
        for i, g in summed.items():
            self.rows[i] = self.rows.get(i, init_row(i)) - np.float32(0.5) * g
            self.last[i] = self.clock

    def evict(self, idle):
        for i in [i for i, t in self.last.items() if self.clock - t >= idle]:
            del self.rows[i], self.last[i]


pick = st.lists(st.integers(0, len(EDGE) - 1), max_size=7)
OPS = st.lists(st.one_of(
    st.tuples(st.just("lookup"), pick, st.booleans()),
    st.tuples(st.just("peek"), pick, st.booleans()),
    st.tuples(st.just("apply"), pick, st.booleans()),
    st.tuples(st.just("advance"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("evict"), st.integers(1, 4), st.booleans()),
), max_size=30)


@pytest.mark.parametrize("index", INDEXES)
@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_store_follows_a_dict_model(index, ops):
    store, model = make(index), Model()
    for step, (op, arg, signed) in enumerate(ops):
        ids = EDGE[arg] if isinstance(arg, list) else None
        sent = ids.view(np.int64) if ids is not None and signed else ids  # same ids as int64 bits
        if op == "lookup":
            model.lookup(ids.tolist())
            store.lookup(sent)
        elif op == "peek":
            expected = [model.rows.get(i, init_row(i)) for i in ids.tolist()]
            np.testing.assert_allclose(store.lookup(sent, create=False), np.reshape(expected, (-1, DIM)), rtol=1e-6, atol=1e-6)
        elif op == "apply":
            grads = np.random.default_rng(step).normal(size=(len(ids), DIM)).astype(np.float32)
            model.apply(ids.tolist(), grads)
            store.apply(sent, grads)
        elif op == "advance":
            model.clock += arg
            store.advance(model.clock)
        else:
            model.evict(arg)
            store.evict_idle(arg)
        assert len(store) == len(model.rows)
        np.testing.assert_array_equal(store.contains(EDGE), [i in model.rows for i in EDGE.tolist()])
    held = np.array(sorted(model.rows), np.uint64)
    if len(held):
        np.testing.assert_allclose(store.lookup(held, create=False), [model.rows[i] for i in held.tolist()], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index", INDEXES)
def test_index_keeps_many_ids_through_removals_and_reinsertions(index):
    """Enough ids to merge SortedIndex's delta several times and to rebuild after tombstones."""
    ix = rowstore.make_index(index)
    ids = np.random.default_rng(1).integers(0, 2**63, 6000, dtype=np.int64).view(np.uint64) * np.uint64(2)
    ids = np.unique(np.concatenate([ids, EDGE]))
    model = {}
    for chunk in np.array_split(np.arange(len(ids)), 7):
        ix.put(ids[chunk], chunk)
        model.update(zip(ids[chunk].tolist(), chunk.tolist()))
    gone = ids[::3]
    ix.remove(gone)
    for i in gone.tolist():
        del model[i]
    back = gone[::2]
    ix.put(back, np.arange(len(back)) + 10**6)
    model.update(zip(back.tolist(), (np.arange(len(back)) + 10**6).tolist()))
    expected = [model.get(i, -1) for i in ids.tolist()]
    np.testing.assert_array_equal(ix.get(ids), expected)


# ---------------------------------------------------------------- duplicates, ids, initializer

@pytest.mark.parametrize("index", INDEXES)
def test_duplicate_ids_are_summed_before_the_optimizer(index):
    """Adagrad tells a summed gradient (acc += (g1+g2)^2) from two updates (g1^2 + g2^2)."""
    opt = lambda: sparse_optim.build("adagrad", lr=0.1)  # noqa: E731
    once, twice = make(index, opt()), make(index, opt())
    g = np.array([[1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5], [2, 2, 2, 2]], np.float32)
    assert once.apply([7, 7, 9], g) == 2
    twice.apply([7, 9], np.stack([g[0] + g[1], g[2]]))
    np.testing.assert_array_equal(once.lookup([7, 9], create=False), twice.lookup([7, 9], create=False))
    assert once.stats().step == 1


@pytest.mark.parametrize("index", INDEXES)
def test_64_bit_ids_as_int64_and_uint64_name_the_same_rows(index):
    store = make(index)
    store.lookup(EDGE.view(np.int64))
    assert store.contains(EDGE).all()
    np.testing.assert_array_equal(store.lookup(EDGE, create=False), store.lookup(EDGE.view(np.int64), create=False))
    store.apply(np.array([-1, 0], np.int64), ones(2))
    np.testing.assert_allclose(store.lookup(np.array([2**64 - 1, 0], np.uint64), create=False),
                               INIT.rows(np.array([2**64 - 1, 0], np.uint64), DIM) - 0.5, rtol=1e-6)
    ids, _ = store.hottest(len(EDGE))
    assert ids.dtype == np.uint64 and sorted(ids.tolist()) == sorted(EDGE.tolist())
    assert store.contains(np.array([2**63], np.uint64)).all() and not store.contains([5]).any()


def test_python_ints_and_small_integer_dtypes_are_ids_too():
    store = make("sorted")
    store.lookup([3, 2**64 - 1])
    assert store.contains(np.array([3], np.int32)).all()
    assert store.contains(np.array([-1], np.int8)).all()  # -1 sign-extends to 2**64 - 1
    assert store.contains([-1]).all()
    assert len(store.lookup([])) == 0 and store.apply([], np.zeros((0, DIM), np.float32)) == 0
    with pytest.raises(InvalidArgument, match="must fit in 64 bits"):
        store.lookup([2**64])


def test_initial_values_do_not_depend_on_creation_order_or_store():
    ids = np.concatenate([EDGE, np.arange(100, 400, dtype=np.uint64)])
    a, b = make("sorted"), make("sorted")
    a.lookup(ids)
    for chunk in np.array_split(ids[::-1], 9):
        b.lookup(chunk)
    np.testing.assert_array_equal(a.lookup(ids, create=False), b.lookup(ids, create=False))
    np.testing.assert_array_equal(a.lookup(ids[:3], create=False), INIT.rows(ids[:3], DIM))


@pytest.mark.parametrize("init,check", [
    (Initializer.normal(0.2, seed=1), lambda v: abs(v.mean()) < 0.01 and abs(v.std() - 0.2) < 0.01),
    (Initializer.uniform(0.3, seed=1), lambda v: v.min() >= -0.3 and v.max() <= 0.3 and abs(v.std() - 0.3 / 3**0.5) < 0.01),
    (Initializer.constant(1.5), lambda v: (v == 1.5).all()),
    (Initializer(), lambda v: (v == 0).all()),
])
def test_initializers_have_their_distribution(init, check):
    v = init.rows(np.arange(20000, dtype=np.uint64), 7)
    assert v.dtype == np.float32 and v.shape == (20000, 7) and check(v)


def test_seeds_and_columns_give_different_values():
    ids = np.arange(50, dtype=np.uint64)
    a, b = Initializer.normal(1, seed=1).rows(ids, 8), Initializer.normal(1, seed=2).rows(ids, 8)
    assert not np.isclose(a, b).any()
    assert len(np.unique(a)) == a.size  # no two rows or columns share a stream


# ---------------------------------------------------------------- admission

@pytest.mark.parametrize("index", INDEXES)
def test_admission_stores_a_row_from_its_nth_lookup(index):
    store = make(index, admit_after=3)
    for _ in range(2):
        np.testing.assert_array_equal(store.lookup([42]), INIT.rows(np.array([42], np.uint64), DIM))
        assert store.apply([42], ones(1)) == 0  # dropped: no row yet
    assert len(store) == 0
    assert store.stats().dropped_gradients == 2 and store.stats().unadmitted_lookups == 2
    store.lookup([42])
    assert len(store) == 1 and store.stats().admitted == 1
    assert store.apply([42], ones(1)) == 1
    np.testing.assert_allclose(store.lookup([42], create=False), INIT.rows(np.array([42], np.uint64), DIM) - 0.5)


def test_applies_and_peeks_do_not_count_towards_admission():
    store = make("sorted", admit_after=2)
    for _ in range(5):
        store.apply([8], ones(1))
        store.lookup([8], create=False)
    assert len(store) == 0 and store.stats().dropped_gradients == 5 and store.stats().unadmitted_lookups == 0
    store.lookup([8, 8])  # one call: one touch
    assert len(store) == 0
    store.lookup([8])
    assert len(store) == 1


def test_admission_counters_stay_bounded_under_a_flood_of_one_off_ids():
    store = make("sorted", admit_after=2, admission_width=1 << 12)
    before = store.stats().bytes
    for start in range(0, 200_000, 20_000):
        store.lookup(np.arange(start, start + 20_000, dtype=np.uint64))
    stats = store.stats()
    assert stats.bytes == before and stats.rows < 2_000  # the sketch is fixed; collisions admit a few
    assert stats.unadmitted_lookups > 198_000


# ---------------------------------------------------------------- eviction

@pytest.mark.parametrize("index", INDEXES)
def test_idle_rows_are_evicted_and_counted(index):
    store = make(index, evict_idle=3)
    store.lookup([1, 2, 3])
    store.advance(2)
    store.lookup([1])
    store.apply([2], ones(1))  # an apply is a touch too
    store.advance(4)
    assert store.evict_idle() == 1  # 3, untouched since clock 0
    assert store.contains([1, 2, 3]).tolist() == [True, True, False]
    store.advance(5)
    assert store.evict_idle() == 2 and len(store) == 0
    assert store.stats().evicted_idle == 3
    np.testing.assert_array_equal(store.lookup([3]), INIT.rows(np.array([3], np.uint64), DIM))  # a fresh row


@pytest.mark.parametrize("index", INDEXES)
def test_row_cap_evicts_the_least_recently_used(index):
    store = make(index, max_rows=3, lru_slack=0)
    for t, i in enumerate([10, 11, 12]):
        store.advance(t)
        store.lookup([i])
    store.advance(3)
    store.apply([10], ones(1))
    store.advance(4)
    store.lookup([13, 12])  # 11 is the least recent
    assert store.contains([10, 11, 12, 13]).tolist() == [True, False, True, True]
    store.advance(4.5)
    store.lookup([13])
    store.advance(5)
    store.lookup([14, 15])  # 10 and 12 are older than 13, and neither is in this call
    assert store.contains([10, 12, 13, 14, 15]).tolist() == [False, False, True, True, True]
    assert store.stats().evicted_lru == 3 and len(store) == 3


@pytest.mark.parametrize("index", INDEXES)
def test_row_cap_never_evicts_rows_of_the_current_call(index):
    store = make(index, max_rows=3, lru_slack=0)
    store.lookup([3])
    store.lookup([1, 2])  # every row at clock 0: equally recent
    before = store.lookup([1, 2], create=False)
    np.testing.assert_array_equal(store.lookup([1, 2, 4])[:2], before)
    assert store.contains([1, 2, 3, 4]).tolist() == [True, True, False, True]


@pytest.mark.parametrize("index", INDEXES)
def test_an_apply_after_a_lookup_of_its_ids_updates_their_rows_after_evictions_too(index):
    """A push's apply reuses the slots its pull's lookup found; an eviction in between (whose
    slots new rows take over) must not send the gradient to another id's row."""
    store = make(index, evict_idle=1)
    a, c = np.array([1, 2, 3], np.uint64), np.array([7, 8, 9], np.uint64)
    store.lookup(a)
    store.apply(a, ones(3))   # the slots the lookup found
    np.testing.assert_allclose(store.lookup(a, create=False), INIT.rows(a, DIM) - 0.5, rtol=1e-6)
    store.lookup(a)
    store.advance(2)
    assert store.evict_idle() == 3
    store.lookup(c)           # takes a's freed slots
    store.apply(a, ones(3))   # a's rows are created again, c's untouched
    np.testing.assert_array_equal(store.lookup(c, create=False), INIT.rows(c, DIM))
    np.testing.assert_allclose(store.lookup(a, create=False), INIT.rows(a, DIM) - 0.5, rtol=1e-6)
    assert store.stats().step == 2 and len(store) == 6


def test_sorted_unique_and_unsorted_new_ids_get_the_same_slots():
    """New ids already sorted skip np.unique; unsorted ones with repeats go through it, and
    both lay rows out as np.unique's order would."""
    for ids in (np.array([5, 9, 2**63, 2**64 - 1], np.uint64), np.array([2**64 - 1, 9, 5, 9, 2**63, 5], np.uint64)):
        store = make("sorted")
        store.lookup(ids)
        np.testing.assert_array_equal(store.snapshot().arrays["ids"], np.unique(ids))


def test_a_call_naming_more_rows_than_the_cap_is_refused_unchanged():
    store = make("sorted", max_rows=2)
    store.lookup([1])
    before = store.stats()
    with pytest.raises(ResourceExhausted, match="3 rows, above the table's max_rows 2"):
        store.lookup([1, 2, 3])
    with pytest.raises(ResourceExhausted, match="3 rows, above the table's max_rows 2"):
        store.apply([1, 2, 3], ones(3))
    assert store.stats() == before and store.stats().step == 0


def test_evicted_slots_are_reused_before_the_slabs_grow():
    store = make("sorted", initial_capacity=8)
    for round_ in range(10):
        store.lookup(np.arange(8, dtype=np.uint64) + np.uint64(100 * round_))
        store.advance()
        assert store.evict_idle(1) == 8
    assert store.stats().capacity == 8 and store.stats().evicted_idle == 80
    store.lookup(np.arange(9, dtype=np.uint64))
    assert store.stats().capacity == 16  # grows geometrically once full


def test_hottest_ids_by_lookup_count():
    store = make("sorted")
    for i, n in [(5, 3), (2**63, 5), (7, 1)]:
        for _ in range(n):
            store.lookup([i])
    ids, counts = store.hottest(2)
    assert ids.tolist() == [2**63, 5] and counts.tolist() == [5, 3]
    assert store.hottest(0)[0].size == 0 and len(store.hottest(10)[0]) == 3


def test_stats_count_rows_and_bytes():
    store = make("sorted", opt=sparse_optim.build("adagrad"), initial_capacity=4)
    small = store.stats()
    store.lookup(np.arange(1000, dtype=np.uint64))
    big = store.stats()
    assert big.rows == 1000 and big.admitted == 1000 and big.capacity >= 1000
    assert big.bytes >= 1000 * (2 * DIM * 4 + 24) > small.bytes  # values + adagrad sum + bookkeeping


# ---------------------------------------------------------------- snapshot and restore

def busy_store(index, **cfg):
    store = make(index, opt=sparse_optim.build("sparse_adam", lr=0.05), admit_after=2, **cfg)
    rng = np.random.default_rng(4)
    for t in range(6):
        ids = EDGE[rng.integers(0, len(EDGE), 6)]
        store.advance(t)
        store.lookup(ids)
        store.apply(ids, rng.normal(size=(6, DIM)).astype(np.float32))
    store.evict_idle(4)
    return store


def through_files(snap):
    """What a checkpoint does with it: safetensors for the arrays, JSON for the rest."""
    return rowstore.Snapshot(st_load(st_save(snap.arrays)), json.loads(json.dumps(snap.meta)))


@pytest.mark.parametrize("index", INDEXES)
def test_snapshot_restore_round_trip_through_safetensors_and_json(index):
    store = busy_store(index)
    restored = RowStore.from_snapshot(through_files(store.snapshot()))
    assert restored.stats() == dataclass_replace_bytes(store.stats(), restored.stats().bytes)
    np.testing.assert_array_equal(restored.contains(EDGE), store.contains(EDGE))
    np.testing.assert_array_equal(restored.lookup(EDGE, create=False), store.lookup(EDGE, create=False))
    assert [a.tolist() for a in restored.hottest(8)] == [a.tolist() for a in store.hottest(8)]
    for s in (store, restored):  # the optimizer state and admission counts carry on alike
        s.advance(10)
        s.lookup(EDGE)
        s.apply(EDGE, ones(len(EDGE), 0.3))
    np.testing.assert_array_equal(restored.lookup(EDGE, create=False), store.lookup(EDGE, create=False))


def dataclass_replace_bytes(stats, nbytes):
    import dataclasses
    return dataclasses.replace(stats, bytes=nbytes)


def test_restore_into_another_store_with_another_index_and_cap():
    store = busy_store("sorted")
    other = RowStore(RowStoreConfig(dim=DIM, initializer=INIT, index="auto", admit_after=2, max_rows=100),
                     sparse_optim.build("sparse_adam", lr=0.05))
    other.restore(store.snapshot())
    np.testing.assert_array_equal(other.lookup(EDGE, create=False), store.lookup(EDGE, create=False))


@pytest.mark.parametrize("change,error,needle", [
    (lambda a, m: m["config"].update(dim=8), FailedPrecondition, "dim 8"),
    (lambda a, m: m["optimizer"].update(lr=0.1), FailedPrecondition, "optimizer"),
    (lambda a, m: m.update(format="other"), InvalidArgument, "not a row store snapshot"),
    (lambda a, m: a.pop("state.exp_avg"), InvalidArgument, "lacks array state.exp_avg"),
    (lambda a, m: a.update(values=a["values"].astype(np.float64)), InvalidArgument, "values has dtype float64"),
    (lambda a, m: a.update(ids=a["ids"][:-1]), InvalidArgument, "rows, ids has"),
    (lambda a, m: a.update(ids=np.repeat(a["ids"][:1], len(a["ids"]))), InvalidArgument, "not unique"),
    (lambda a, m: a.update(extra=np.zeros(1)), InvalidArgument, "unexpected arrays ['extra']"),
    (lambda a, m: a.update(values=a["values"][:, :2]), InvalidArgument, "expected (n, 4)"),
])
def test_restore_refuses_a_bad_snapshot_and_changes_nothing(change, error, needle):
    store = busy_store("sorted")
    snap = store.snapshot()
    arrays, meta = dict(snap.arrays), json.loads(json.dumps(snap.meta))
    change(arrays, meta)
    target = busy_store("sorted")
    before = target.lookup(EDGE, create=False), target.stats()
    with pytest.raises(error) as e:
        target.restore(rowstore.Snapshot(arrays, meta))
    assert needle in str(e.value)
    np.testing.assert_array_equal(target.lookup(EDGE, create=False), before[0])
    assert target.stats() == before[1]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,needle", [
    (lambda s: s.lookup(np.array([1.0, 2.0])), "ids must be integers, got dtype float64"),
    (lambda s: s.lookup(["a"]), "ids must be integers"),
    (lambda s: s.lookup(np.array([True])), "ids must be integers, got dtype bool"),
    (lambda s: s.lookup(np.zeros((2, 2), np.int64)), "ids must be one-dimensional, got shape (2, 2)"),
    (lambda s: s.apply([1, 2], ones(3)), "grads has 3 rows for 2 ids"),
    (lambda s: s.apply([1], np.ones((1, DIM + 1), np.float32)), "grads must have shape (n, 4), got (1, 5)"),
    (lambda s: s.apply([1], np.ones(DIM, np.float32)), "grads must have shape (n, 4), got (4,)"),
    (lambda s: s.apply([1], np.ones((1, DIM), np.int64)), "grads must be floating point, got dtype int64"),
    (lambda s: s.apply([1, 2], np.array([[0, 0, 0, 0], [0, np.nan, 0, 0]], np.float32)), "NaN or infinity (row 1)"),
    (lambda s: s.apply([1], np.full((1, DIM), np.inf, np.float32)), "NaN or infinity (row 0)"),
    (lambda s: s.advance(-1), "clock cannot go back"),
    (lambda s: s.evict_idle(0), "idle must be a number > 0"),
    (lambda s: s.hottest(-1), "k must be >= 0"),
])
def test_bad_input_is_refused_naming_the_problem_and_changes_nothing(call, needle):
    store = make("sorted")
    store.lookup([1, 2])
    before = store.lookup([1, 2], create=False), store.stats()
    with pytest.raises(InvalidArgument) as e:
        call(store)
    assert needle in str(e.value)
    np.testing.assert_array_equal(store.lookup([1, 2], create=False), before[0])
    assert store.stats() == before[1]  # no step counted, no row touched


@pytest.mark.parametrize("kwargs,needle", [
    (dict(dim=0), "dim must be in [1, 65536], got 0"),
    (dict(dim=2.5), "dim must be an integer, got 2.5"),
    (dict(dim=4, admit_after=0), "admit_after must be >= 1, got 0"),
    (dict(dim=4, evict_idle=-1), "evict_idle must be a number > 0 or None, got -1"),
    (dict(dim=4, max_rows=0), "max_rows must be >= 1, got 0"),
    (dict(dim=4, lru_slack=1.0), "lru_slack must be in [0, 1), got 1.0"),
    (dict(dim=4, admission_width=1000), "admission_width must be a power of two, got 1000"),
    (dict(dim=4, index="btree"), "index must be auto, hash or sorted, got 'btree'"),
    (dict(dim=4, initializer="normal"), "initializer must be an Initializer"),
])
def test_bad_config_is_refused_naming_the_value(kwargs, needle):
    with pytest.raises(InvalidArgument) as e:
        RowStoreConfig(**kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize("args,needle", [
    (("gaussian", 1.0), "kind must be zeros, constant, normal or uniform, got 'gaussian'"),
    (("normal", -1.0), "normal scale must be >= 0, got -1.0"),
    (("uniform", float("inf")), "scale must be a finite number, got inf"),
    (("zeros", 0.0, -1), "seed must be in [0, 18446744073709551615], got -1"),
])
def test_bad_initializer_is_refused(args, needle):
    with pytest.raises(InvalidArgument) as e:
        Initializer(*args)
    assert needle in str(e.value)


def test_store_refuses_a_non_optimizer():
    with pytest.raises(InvalidArgument, match="SparseOptimizer"):
        RowStore(RowStoreConfig(dim=2), "sgd")


def test_a_call_refused_by_the_cap_counts_no_admission_touch():
    store = make("sorted", admit_after=2, max_rows=1)
    store.lookup([1])
    store.lookup([1])  # admitted: the table is full
    store.lookup([2])
    before = store.snapshot().arrays["admission.sketch"], store.stats()
    with pytest.raises(ResourceExhausted):
        store.lookup([1, 2])  # 2's second touch would admit it: 2 rows above the cap
    np.testing.assert_array_equal(store.snapshot().arrays["admission.sketch"], before[0])
    assert store.stats() == before[1]
