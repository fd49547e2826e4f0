"""pscommon.tables: the table spec's validation and json form, the id-to-shard hash (balance,
stability, a scalar reference), and the counter-based initial rows."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tables import TableSpec, initial_rows, shard_of, sum_duplicates
from shardps.worker import rows

M64 = (1 << 64) - 1
SIGMAS = 6  # statistical bounds: a deterministic seed cannot flake, 6 sigma survives a new one


def spec(**overrides) -> TableSpec:
    fields = dict(name="emb", dim=16, initializer="normal", scale=0.01, seed=7)
    return TableSpec(**{**fields, **overrides})


# --- the spec ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, named", [
    (dict(name=""), "''"),
    (dict(name="x" * 129), "x" * 129),
    (dict(name=" emb"), "' emb'"),
    (dict(name="emb\t"), "'emb\\t'"),
    (dict(name="e\nmb"), "'e\\nmb'"),
    (dict(name=5), "table name 5"),
    (dict(dim=0), "dim=0"),
    (dict(dim=4097), "dim=4097"),
    (dict(dim=16.0), "dim=16.0"),
    (dict(dim="16"), "dim='16'"),
    (dict(dim=True), "dim=True"),
    (dict(initializer="gaussian"), "'gaussian'"),
    (dict(initializer=None), "initializer None"),
    (dict(scale=-0.1), "scale=-0.1"),
    (dict(scale=math.inf), "scale=inf"),
    (dict(scale=math.nan), "scale=nan"),
    (dict(scale="0.1"), "scale='0.1'"),
    (dict(scale=True), "scale=True"),
    (dict(initializer="zeros", scale=0.01), "scale=0.01"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed=2**63), f"seed={2**63}"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(seed=None), "seed=None"),
])
def test_spec_refuses_each_bad_field_by_name(overrides, named):
    with pytest.raises(InvalidArgument) as err:
        spec(**overrides)
    assert named in str(err.value)


def test_spec_accepts_the_bounds():
    assert spec(name="x" * 128, dim=4096, seed=2**63 - 1).dim == 4096
    assert spec(name="a b/c:d", dim=1, seed=0).name == "a b/c:d"
    assert spec(initializer="zeros", scale=0).scale == 0.0
    assert isinstance(spec(scale=1).scale, float)


specs = st.builds(
    TableSpec,
    name=st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"]),
                 min_size=1, max_size=128),
    dim=st.integers(1, 4096),
    initializer=st.sampled_from(["normal", "uniform"]),
    scale=st.floats(0, 1e6),
    seed=st.integers(0, 2**63 - 1),
) | st.builds(TableSpec, name=st.just("z"), dim=st.integers(1, 4096), initializer=st.just("zeros"),
              scale=st.just(0.0), seed=st.integers(0, 2**63 - 1))


@settings(max_examples=30, deadline=None)
@given(specs)
def test_spec_json_round_trip(s):
    assert TableSpec.from_json(json.loads(json.dumps(s.to_json()))) == s


@pytest.mark.parametrize("data, named", [
    ([], "list"),
    ("emb", "str"),
    ({"name": "emb", "dim": 16, "initializer": "normal", "scale": 0.01}, "missing ['seed']"),
    ({**spec().to_json(), "extra": 1}, "unknown ['extra']"),
    ({**spec().to_json(), "dim": "16"}, "dim='16'"),
    ({**spec().to_json(), "dim": 16.0}, "dim=16.0"),
    ({**spec().to_json(), "seed": "7"}, "seed='7'"),
    ({**spec().to_json(), "scale": None}, "scale=None"),
    ({**spec().to_json(), "name": ["emb"]}, "table name ['emb']"),
    ({**spec().to_json(), "initializer": 1}, "initializer 1"),
])
def test_from_json_refuses_wrong_shapes_and_types(data, named):
    with pytest.raises(InvalidArgument) as err:
        TableSpec.from_json(data)
    assert named in str(err.value)


# --- shard_of ---------------------------------------------------------------------------------

def mix64_ref(x: int) -> int:
    """splitmix64's finalizer on Python ints, written from the reference C."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def shard_ref(id_: int, n: int) -> int:
    return (mix64_ref(id_ & M64) * n) >> 64  # Lemire: the high word of the 128-bit product


def test_reference_mix_matches_splitmix64_published_outputs():
    # splitmix64 seeded with 0 returns mix(k * gamma), k = 1, 2, 3 (Vigna's splitmix64.c)
    gamma = 0x9E3779B97F4A7C15
    outputs = [mix64_ref((k * gamma) & M64) for k in (1, 2, 3)]
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


PINNED_IDS = np.array([0, 1, 2, 3, 42, 2**63 - 1, -1, -2**63], dtype=np.int64)
PINNED = {  # computed once by shard_of and equal to shard_ref: a change here moves every row
    2: [0, 0, 1, 0, 1, 0, 1, 0],
    3: [0, 1, 2, 0, 1, 1, 2, 0],
    8: [0, 2, 6, 0, 5, 2, 5, 1],
    1000: [0, 338, 858, 118, 653, 353, 706, 147],
    2**32 - 1: [0, 1452414492, 3687987350, 508780269, 2807687719, 1516776190, 3033552380, 633499301],
}


@pytest.mark.parametrize("n", sorted(PINNED))
def test_shard_of_pinned_values(n):
    assert shard_of(PINNED_IDS, n).tolist() == PINNED[n]
    assert [shard_ref(int(i), n) for i in PINNED_IDS] == PINNED[n]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, M64), max_size=50), st.integers(1, 2**32 - 1))
def test_shard_of_matches_the_scalar_reference(ids, n):
    got = shard_of(np.array(ids, dtype=np.uint64), n)
    assert got.dtype == np.int64
    assert got.tolist() == [shard_ref(i, n) for i in ids]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-2**63, 2**63 - 1), max_size=50), st.integers(1, 64))
def test_int64_and_uint64_views_of_the_same_bits_agree(ids, n):
    signed = np.array(ids, dtype=np.int64)
    got = shard_of(signed, n)
    assert got.tolist() == shard_of(signed.view(np.uint64), n).tolist()
    assert ((got >= 0) & (got < n)).all()


def test_narrow_integer_ids_are_the_same_ids():
    ids = np.array([-5, -1, 0, 7, 127], dtype=np.int8)
    assert shard_of(ids, 7).tolist() == shard_of(ids.astype(np.int64), 7).tolist()


def test_one_shard_and_no_ids():
    assert shard_of(PINNED_IDS, 1).tolist() == [0] * len(PINNED_IDS)
    assert shard_of(np.array([], dtype=np.int64), 4).shape == (0,)


@pytest.mark.parametrize("ids, n, named", [
    (np.arange(4), 0, "num_shards=0"),
    (np.arange(4), -1, "num_shards=-1"),
    (np.arange(4), 2.0, "num_shards=2.0"),
    (np.arange(4), True, "num_shards=True"),
    (np.arange(4), 2**32, f"num_shards={2**32}"),
    (np.arange(4.0), 2, "float64"),
    (np.array([True, False]), 2, "bool"),
    (np.array([1, "a"], dtype=object), 2, "object"),
    (np.arange(4).reshape(2, 2), 2, "(2, 2)"),
    (np.int64(3), 2, "numpy array"),
    ([1, 2], 2, "list"),
])
def test_shard_of_refuses_bad_input(ids, n, named):
    with pytest.raises(InvalidArgument) as err:
        shard_of(ids, n)
    assert named in str(err.value)


KEY_MUL, FIELD_MUL = 0x9E3779B97F4A7C15, 0x632BE59BD9B4E019  # as bench/peers/emb_common.py


def id64(idx, f):
    """The emb-loop benchmark's 64-bit key of row idx of field f (copied, not imported)."""
    return np.asarray(idx).astype(np.uint64) * np.uint64(KEY_MUL) + np.uint64(f * FIELD_MUL % 2**64)


N_IDS = 1_000_000
ID_SETS = {
    "sequential": lambda: np.arange(N_IDS, dtype=np.int64),
    "emb-loop field 0": lambda: id64(np.arange(N_IDS), 0),
    "emb-loop field 25": lambda: id64(np.arange(N_IDS), 25),
    "stride 2**32": lambda: np.arange(N_IDS, dtype=np.uint64) << np.uint64(32),
}


@pytest.mark.parametrize("num_shards", [2, 3, 4, 8])
@pytest.mark.parametrize("id_set", sorted(ID_SETS))
def test_balance_within_5_percent(id_set, num_shards):
    counts = np.bincount(shard_of(ID_SETS[id_set](), num_shards), minlength=num_shards)
    assert len(counts) == num_shards and counts.sum() == N_IDS
    mean = N_IDS / num_shards
    assert counts.max() / mean - 1 < 0.05, counts
    assert 1 - counts.min() / mean < 0.05, counts


# --- initial_rows -----------------------------------------------------------------------------

@pytest.mark.parametrize("init, scale", [("normal", 0.05), ("uniform", 0.05), ("zeros", 0.0)])
def test_rows_have_dtype_and_shape(init, scale):
    s = spec(initializer=init, scale=scale, dim=7)
    rows = initial_rows(s, np.arange(5, dtype=np.uint64))
    assert rows.dtype == np.float32 and rows.shape == (5, 7)
    assert initial_rows(s, np.array([], dtype=np.int64)).shape == (0, 7)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=30),
       st.sampled_from(["normal", "uniform"]), st.randoms(use_true_random=False))
def test_same_id_same_row_whatever_the_batch(ids, init, rnd):
    s = spec(initializer=init, dim=5)
    batch = np.array(ids, dtype=np.int64)
    rows = initial_rows(s, batch)
    shuffled = ids + ids[: len(ids) // 2]  # reordered, with duplicates
    rnd.shuffle(shuffled)
    again = initial_rows(s, np.array(shuffled, dtype=np.int64))
    by_id = {i: rows[k] for k, i in enumerate(ids)}
    for k, i in enumerate(shuffled):
        np.testing.assert_array_equal(again[k], by_id[i])
    np.testing.assert_array_equal(initial_rows(s, batch[:1])[0], rows[0])


def test_rows_agree_across_the_internal_blocks():
    s = spec(dim=4096)  # 256 rows per block: 520 ids cross two block boundaries
    ids = np.arange(520, dtype=np.int64) * 7919
    rows = initial_rows(s, ids)
    for k in (0, 255, 256, 511, 512, 519):
        np.testing.assert_array_equal(initial_rows(s, ids[k:k + 1])[0], rows[k])


def test_negative_ids_are_their_uint64_bits():
    s = spec()
    signed = np.array([-1, -2**63, -12345], dtype=np.int64)
    np.testing.assert_array_equal(initial_rows(s, signed), initial_rows(s, signed.view(np.uint64)))
    assert np.isfinite(initial_rows(s, signed)).all()


@pytest.mark.parametrize("init", ["normal", "uniform"])
def test_seeds_and_ids_give_different_rows(init):
    ids = np.arange(100, dtype=np.int64)
    a = initial_rows(spec(initializer=init, seed=1), ids)
    b = initial_rows(spec(initializer=init, seed=2), ids)
    assert not (a == b).any(axis=1).any()  # not one element of one row in common
    assert len(np.unique(a, axis=0)) == len(ids)


def test_pinned_rows():
    # a change here changes every row a restarted server re-creates: a checkpoint format change
    ids = np.array([0, 1, -1], dtype=np.int64)
    normal = initial_rows(TableSpec("emb", 3, "normal", 1.0, 0), ids)
    uniform = initial_rows(TableSpec("emb", 3, "uniform", 1.0, 0), ids)
    np.testing.assert_allclose(normal, NORMAL_PINNED, rtol=1e-6)
    np.testing.assert_array_equal(uniform, np.array(UNIFORM_PINNED, dtype=np.float32))


NORMAL_PINNED = [
    [2.9875844, 0.017682936, -1.3763311],
    [-0.25400123, -0.22352333, -0.54186285],
    [-0.60302424, -1.7683835, -1.6701701],
]
UNIFORM_PINNED = [
    [0.9769442, -0.998116, 0.380693],
    [-0.8887355, 0.22971147, -0.6668622],
    [0.6508529, 0.39539146, 0.505174],
]


N_ELEMENTS = 200_000


def test_normal_moments():
    std = 0.02
    rows = initial_rows(spec(scale=std, dim=50), np.arange(N_ELEMENTS // 50, dtype=np.int64))
    x = rows.astype(np.float64) / std
    n = x.size
    assert abs(x.mean()) < SIGMAS / math.sqrt(n)
    assert abs(x.var() - 1) < SIGMAS * math.sqrt(2 / n)  # var of a normal sample's variance: 2/n
    for column in (x[:, 0::2], x[:, 1::2]):  # cos and sin halves of Box-Muller alike
        assert abs(column.mean()) < SIGMAS / math.sqrt(column.size)
        assert abs(column.var() - 1) < SIGMAS * math.sqrt(2 / column.size)
    pair = np.corrcoef(x[:, 0], x[:, 1])[0, 1]  # the two halves of one pair are independent
    assert abs(pair) < SIGMAS / math.sqrt(len(x))
    assert abs(x).max() < 9  # Box-Muller from 53-bit uniforms stops at 8.6 sigma


def test_uniform_bounds_and_moments():
    a = 0.05
    rows = initial_rows(spec(initializer="uniform", scale=a, dim=50),
                        np.arange(N_ELEMENTS // 50, dtype=np.int64))
    assert rows.min() >= -np.float32(a) and rows.max() < np.float32(a)
    x = rows.astype(np.float64) / a
    n = x.size
    assert abs(x.mean()) < SIGMAS * math.sqrt(1 / 3 / n)  # U(-1, 1) has variance 1/3
    assert abs(x.var() - 1 / 3) < SIGMAS * math.sqrt(4 / 45 / n)  # var of x**2 is 1/5 - 1/9
    assert x.min() < -0.99 and x.max() > 0.99


def test_zeros_are_zeros():
    rows = initial_rows(spec(initializer="zeros", scale=0.0), np.arange(1000, dtype=np.int64))
    assert not rows.any()


def test_scale_zero_gives_zeros():
    for init in ("normal", "uniform"):
        assert not initial_rows(spec(initializer=init, scale=0.0), np.arange(10)).any()


def test_initial_rows_refuses_bad_ids():
    with pytest.raises(InvalidArgument):
        initial_rows(spec(), np.arange(4.0))
    with pytest.raises(InvalidArgument):
        initial_rows(spec(), np.arange(4).reshape(2, 2))


def test_constant_rows_are_the_scale_everywhere():
    spec = TableSpec("c", 5, "constant", -1.5, 0)
    rows = initial_rows(spec, np.array([0, -1, 2**40], np.int64))
    assert rows.dtype == np.float32 and rows.shape == (3, 5) and (rows == -1.5).all()
    with pytest.raises(InvalidArgument, match="must be >= 0 for the normal initializer"):
        TableSpec("n", 5, "normal", -1.0, 0)


# -- a step's rows on the worker (worker/rows.py) ------------------------------------------------
ROW_IDS = st.lists(st.integers(-2**63, 2**63 - 1), max_size=40)


@settings(max_examples=60, deadline=None)
@given(asks=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.tuples(ROW_IDS, st.booleans()), max_size=3),
       num_shards=st.integers(1, 4))
def test_a_row_plan_asks_each_shard_for_its_unique_ids_and_answers_in_the_asked_order(asks, num_shards):
    """Whether the ids come deduplicated (np.unique's output) or raw: each shard is asked for
    the unique ids it holds, once, and every asked id gets its own row back."""
    asked = {t: (np.unique(np.array(ids, np.int64)) if dedup else np.array(ids, np.int64))
             for t, (ids, dedup) in asks.items()}
    plan = rows.plan_rows(asked, num_shards)
    dims = {t: 3 for t in asked}

    def row_of(ids):   # a row that names its id
        return (ids.view(np.uint64) % np.uint64(1000)).astype(np.float32)[:, None] * np.ones(3, np.float32)

    answers = {}
    for shard, parts in plan.parts.items():
        for part in parts:
            assert (shard_of(part.ids, num_shards) == shard).all()
            assert part.ids_bytes == part.ids.astype("<u8").tobytes()
        answers[shard] = [row_of(part.ids) for part in parts]
    asked_per_table = {t: np.concatenate([p.ids for ps in plan.parts.values() for p in ps if p.table == t] or
                                         [np.zeros(0, np.uint64)]) for t in asked}
    got = plan.assemble(answers, dims)
    for t, ids in asked.items():
        u = ids.astype(np.int64).view(np.uint64)
        assert sorted(asked_per_table[t].tolist()) == sorted(set(u.tolist()))   # each unique id, once
        np.testing.assert_array_equal(got[t], row_of(u))
        assert got[t].flags.writeable and got[t].shape == (len(ids), 3)


@settings(max_examples=60, deadline=None)
@given(ids=ROW_IDS, num_shards=st.integers(1, 4), reuse=st.booleans())
def test_a_pushs_split_is_the_same_with_or_without_the_pulls_plan(ids, num_shards, reuse):
    ids = np.unique(np.array(ids, np.int64))
    grads = np.arange(len(ids) * 2, dtype=np.float32).reshape(-1, 2)
    plan = rows.plan_rows({"t": ids}, num_shards)
    split = plan.split("t", ids, grads, 2) if reuse else None
    general = rows.split_grads("t", ids, grads, 2, num_shards)
    if reuse and plan.inverse["t"] is None:
        assert split is not None
    split = split or general
    assert sorted(split) == sorted(general) == list(range(num_shards))   # every shard, empty or not
    for s in range(num_shards):
        (ids_a, g_a, _), (ids_b, g_b, _) = split[s], general[s]
        order_a, order_b = np.argsort(ids_a), np.argsort(ids_b)
        np.testing.assert_array_equal(ids_a[order_a], ids_b[order_b])
        np.testing.assert_array_equal(g_a[order_a], g_b[order_b])


def test_a_split_sums_repeated_ids_and_refuses_a_bad_shape():
    ids = np.array([5, -1, 5, 7], np.int64)
    grads = np.ones((4, 2), np.float32)
    parts = rows.split_grads("t", ids, grads, 2, 1)
    np.testing.assert_array_equal(parts[0][0], np.unique(ids.view(np.uint64)))
    np.testing.assert_array_equal(parts[0][1].sum(axis=1), [4, 2, 2])   # 5 twice; 7; -1 as 2**64 - 1
    plan = rows.plan_rows({"t": ids}, 2)
    assert plan.split("t", ids, grads, 2) is None   # not the plan's unique ids: the general split
    with pytest.raises(InvalidArgument, match="gradients of shape"):
        rows.split_grads("t", ids, np.ones((3, 2), np.float32), 2, 1)


def test_sum_duplicates_returns_unique_ids_as_they_came():
    ids = np.array([3, 1, 2], np.uint64)   # unique, unsorted: the input itself
    g = np.ones((3, 2), np.float32)
    got_ids, got_g = sum_duplicates(ids, g)
    assert got_ids is ids and got_g is g
    signed = np.array([-5, -1, 0, 4], np.int64).view(np.uint64)   # sorted as int64, not as uint64
    assert sum_duplicates(signed, np.ones((4, 2), np.float32))[0] is signed
