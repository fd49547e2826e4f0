"""psserver.sparse_optim through a RowStore against torch's sparse optimizers on an
nn.Embedding(sparse=True): the same gradients (duplicate ids included), every row equal to
1e-6 after every step; FTRL against a float64 transcription of the paper's pseudo-code."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shardps.pscommon.errors import InvalidArgument
from shardps.psserver import rowstore, sparse_optim

# torch's note that it does not check sparse tensors it builds itself
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

N, DIM, BATCH, STEPS = 40, 5, 24, 6
TOL = dict(rtol=1e-6, atol=1e-6)
# scattered 64-bit ids, including the extremes, one per torch row
IDS = np.concatenate([np.array([0, 2**63 - 1, 2**63, 2**64 - 1], np.uint64),
                      np.random.default_rng(7).integers(1, 2**63, N - 4, dtype=np.int64).view(np.uint64) * np.uint64(3)])


def batches(seed=0, steps=STEPS, untouched=range(N - 5, N)):
    """(row indices with duplicates, float32 grads) per step; rows `untouched` never named."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        idx = rng.integers(0, N - len(untouched), BATCH)
        idx[: BATCH // 4] = idx[BATCH // 4: BATCH // 2]  # a quarter of the batch repeats ids
        out.append((idx, rng.normal(size=(BATCH, DIM)).astype(np.float32)))
    return out


def store_with(opt, init=rowstore.Initializer.normal(0.3, seed=11)):
    store = rowstore.RowStore(rowstore.RowStoreConfig(dim=DIM, initializer=init), opt)
    store.lookup(IDS)
    return store


def embedding_like(store):
    emb = torch.nn.Embedding(N, DIM, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(store.lookup(IDS, create=False)))
    return emb


def torch_step(emb, opt, idx, grads, extra_loss=None):
    opt.zero_grad(set_to_none=True)
    loss = (emb(torch.from_numpy(idx)) * torch.from_numpy(grads)).sum()
    if extra_loss is not None:
        loss = loss + extra_loss(emb, idx)
    loss.backward()
    opt.step()


def weight_decay_loss(wd):
    """0.5 wd |w|^2 over the batch's distinct rows: gradient wd * w on the touched rows only."""
    return lambda emb, idx: 0.5 * wd * (emb(torch.from_numpy(np.unique(idx))) ** 2).sum()


CASES = {
    "sgd": (sparse_optim.SGDConfig(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1), None),
    "sgd-weight-decay": (sparse_optim.SGDConfig(lr=0.05, weight_decay=0.2),
                         lambda p: torch.optim.SGD(p, lr=0.05), weight_decay_loss(0.2)),
    "adagrad": (sparse_optim.AdagradConfig(lr=0.1), lambda p: torch.optim.Adagrad(p, lr=0.1), None),
    "adagrad-decay-accumulator": (
        sparse_optim.AdagradConfig(lr=0.2, lr_decay=0.05, eps=1e-6, initial_accumulator_value=0.1),
        lambda p: torch.optim.Adagrad(p, lr=0.2, lr_decay=0.05, eps=1e-6, initial_accumulator_value=0.1), None),
    "sparse-adam": (sparse_optim.SparseAdamConfig(lr=0.01),
                    lambda p: torch.optim.SparseAdam(list(p), lr=0.01), None),
    "sparse-adam-betas": (sparse_optim.SparseAdamConfig(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6),
                          lambda p: torch.optim.SparseAdam(list(p), lr=0.05, betas=(0.8, 0.99), eps=1e-6), None),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_with_duplicate_ids(case):
    cfg, make_torch, extra = CASES[case]
    store = store_with(sparse_optim.build(cfg))
    initial = store.lookup(IDS, create=False)
    emb = embedding_like(store)
    opt = make_torch(emb.parameters())
    for idx, grads in batches():
        torch_step(emb, opt, idx, grads, extra)
        store.apply(IDS[idx], grads)
        np.testing.assert_allclose(store.lookup(IDS, create=False), emb.weight.detach().numpy(), **TOL)
    np.testing.assert_array_equal(store.lookup(IDS[N - 5:], create=False), initial[N - 5:])  # never named


@pytest.mark.parametrize("case", ["adagrad-decay-accumulator", "sparse-adam"])
def test_an_empty_push_counts_as_a_step_as_in_torch(case):
    """torch counts step() calls whose sparse gradient names no row (lr_decay, bias correction)."""
    cfg, make_torch, _ = CASES[case]
    store = store_with(sparse_optim.build(cfg))
    emb = embedding_like(store)
    opt = make_torch(emb.parameters())
    empty = (np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))
    for idx, grads in [batches()[0], empty, empty, batches()[1]]:
        torch_step(emb, opt, idx, grads)
        store.apply(IDS[idx], grads)
    assert store.stats().step == 4
    np.testing.assert_allclose(store.lookup(IDS, create=False), emb.weight.detach().numpy(), **TOL)


def test_sparse_adam_row_steps_match_one_torch_sparse_adam_per_row():
    """step="row": each row its own bias-correction count, i.e. torch.optim.SparseAdam with each
    row a separate parameter that only steps when named."""
    store = store_with(sparse_optim.build("sparse_adam", lr=0.02, step="row"))
    rows = [torch.nn.Embedding(1, DIM, sparse=True) for _ in range(N)]
    start = store.lookup(IDS, create=False)
    with torch.no_grad():
        for i, r in enumerate(rows):
            r.weight.copy_(torch.from_numpy(start[i:i + 1]))
    opt = torch.optim.SparseAdam([r.weight for r in rows], lr=0.02)
    for idx, grads in batches(seed=3):
        opt.zero_grad(set_to_none=True)
        loss = sum((rows[i](torch.zeros(1, dtype=torch.long)) * torch.from_numpy(g)).sum() for i, g in zip(idx, grads))
        loss.backward()
        opt.step()
        store.apply(IDS[idx], grads)
        expected = torch.cat([r.weight.detach() for r in rows]).numpy()
        np.testing.assert_allclose(store.lookup(IDS, create=False), expected, **TOL)


def test_sparse_adam_row_steps_differ_from_global_for_late_rows():
    late = IDS[:1]
    results = {}
    for mode in ("global", "row"):
        store = store_with(sparse_optim.build("sparse_adam", lr=0.1, step=mode))
        for _ in range(20):
            store.apply(IDS[1:2], np.ones((1, DIM), np.float32))
        before = store.lookup(late, create=False)
        store.apply(late, np.ones((1, DIM), np.float32))
        results[mode] = before - store.lookup(late, create=False)
    np.testing.assert_allclose(results["row"], 0.1, rtol=1e-4)  # Adam's first step: lr * sign(g)
    # torch's count is 21 by then: m = 0.1, v = 0.001, bias-corrected with t = 21
    t, b1, b2 = 21, 0.9, 0.999
    np.testing.assert_allclose(results["global"], 0.1 * np.sqrt(1 - b2**t) / (1 - b1**t) * (1 - b1) / np.sqrt(1 - b2),
                               rtol=1e-4)


# ---------------------------------------------------------------- FTRL

def ftrl_reference(batches_, alpha, beta, l1, l2, w0):
    """Algorithm 1 of McMahan et al. 2013, per coordinate, in float64 (duplicates summed first)."""
    w = w0.astype(np.float64).copy()
    z, n = np.zeros_like(w), np.zeros_like(w)
    out = []
    for idx, grads in batches_:
        g = np.zeros_like(w)
        np.add.at(g, idx, grads.astype(np.float64))
        for i in np.unique(idx):
            for j in range(w.shape[1]):
                sigma = (np.sqrt(n[i, j] + g[i, j] ** 2) - np.sqrt(n[i, j])) / alpha
                z[i, j] += g[i, j] - sigma * w[i, j]
                n[i, j] += g[i, j] ** 2
                if abs(z[i, j]) <= l1:
                    w[i, j] = 0.0
                else:
                    w[i, j] = -(z[i, j] - np.sign(z[i, j]) * l1) / ((beta + np.sqrt(n[i, j])) / alpha + l2)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("alpha,beta,l1,l2,init", [
    (0.1, 1.0, 0.0, 0.0, rowstore.Initializer()),
    (0.05, 0.5, 1.0, 0.1, rowstore.Initializer()),
    (0.2, 1.0, 0.5, 0.0, rowstore.Initializer.uniform(0.5, seed=2)),
])
def test_ftrl_matches_the_papers_pseudo_code(alpha, beta, l1, l2, init):
    store = store_with(sparse_optim.build("ftrl", alpha=alpha, beta=beta, l1=l1, l2=l2), init)
    steps = batches(seed=5)
    expected = ftrl_reference(steps, alpha, beta, l1, l2, store.lookup(IDS, create=False))
    for (idx, grads), want in zip(steps, expected):
        store.apply(IDS[idx], grads)
        np.testing.assert_allclose(store.lookup(IDS, create=False), want, **TOL)
    if l1 >= 1.0:  # the L1 term keeps coordinates exactly at zero: FTRL's point
        assert (store.lookup(IDS, create=False) == 0).mean() > 0.2


# ---------------------------------------------------------------- configs and registry

@pytest.mark.parametrize("name,params,needle", [
    ("sgd", dict(lr=0), "sgd lr must be > 0, got 0"),
    ("sgd", dict(lr=float("nan")), "sgd lr must be a finite number, got nan"),
    ("sgd", dict(weight_decay=-1), "weight_decay must be >= 0, got -1"),
    ("sgd", dict(lr=True), "lr must be a finite number, got True"),
    ("adagrad", dict(eps=0), "adagrad eps must be > 0"),
    ("adagrad", dict(lr_decay=-0.1), "lr_decay must be >= 0"),
    ("adagrad", dict(initial_accumulator_value=-1), "initial_accumulator_value must be >= 0"),
    ("sparse_adam", dict(beta1=1.0), "beta1 must be in [0, 1), got 1.0"),
    ("sparse_adam", dict(beta2=-0.1), "beta2 must be in [0, 1)"),
    ("sparse_adam", dict(step="per-row"), "step must be 'global' or 'row', got 'per-row'"),
    ("ftrl", dict(alpha=0), "ftrl alpha must be > 0"),
    ("ftrl", dict(l1=-1), "ftrl l1 must be >= 0"),
    ("ftrl", dict(l2="0.1"), "ftrl l2 must be a finite number, got '0.1'"),
    ("ftrl", dict(gamma=1), "ftrl has no parameter gamma"),
    ("adam", dict(), "unknown sparse optimizer 'adam'"),
])
def test_bad_configs_are_refused_naming_the_value(name, params, needle):
    with pytest.raises(InvalidArgument, match=None) as e:
        sparse_optim.build(name, **params)
    assert needle in str(e.value)


@pytest.mark.parametrize("name", sorted(sparse_optim.REGISTRY))
def test_configs_round_trip_through_plain_dicts(name):
    opt = sparse_optim.build(name)
    again = sparse_optim.from_dict(opt.cfg.to_dict())
    assert again.cfg == opt.cfg and type(again) is type(opt) and again.name == name


def test_from_dict_refuses_a_dict_without_a_name():
    with pytest.raises(InvalidArgument, match="with a name"):
        sparse_optim.from_dict({"lr": 0.1})


def test_put_rows_writes_whole_rows_and_nothing_else():
    slab = np.zeros((6, 3), np.float32)
    sparse_optim.put_rows(slab, np.array([4, 1]), np.array([[1, 2, 3], [4, 5, 6]], np.float64))
    expected = np.zeros((6, 3), np.float32)
    expected[4], expected[1] = [1, 2, 3], [4, 5, 6]
    np.testing.assert_array_equal(slab, expected)
