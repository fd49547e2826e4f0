"""ShardedEmbedding, ShardedEmbeddingBag and EmbeddingClient on an in-process cluster (a
scheduler and two servers): forwards equal torch's modules on the same rows, a step moves
exactly the rows it touched, training learns, prefetch changes nothing a step computes, and
bad inputs are refused before anything is pushed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shardps.pscommon import tables
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import FailedPrecondition, InvalidArgument
from shardps.pscommon.tables import TableSpec
from shardps.worker.client import ClientConfig, ShardClient
from shardps.worker.embedding import EmbeddingClient, ShardedEmbedding, ShardedEmbeddingBag, sharded_embeddings

# ids anywhere in the 64-bit range, on both shards, with repeats
IDS = torch.tensor([5, -7, 2**62 + 3, 12, 5, -2**63, 2**40, 5, 999, -7, 0, 2**63 - 1], dtype=torch.int64)


@pytest.fixture
def one_thread():
    """One intra-op thread: reductions sum in one order, so two runs give the same floats."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Model(nn.Module):
    def __init__(self, dim: int = 8, mode: str = "mean", scale: float = 0.1):
        super().__init__()
        self.bag = ShardedEmbeddingBag("items", dim, mode=mode, scale=scale, seed=7)
        self.head = nn.Linear(dim, 1)

    def forward(self, ids, offsets=None):
        return self.head(self.bag(ids, offsets)).squeeze(-1)


class Worker:
    """One worker of `model` on a fresh cluster: dense weights pulled into the model, rows
    through an EmbeddingClient, dense and row gradients pushed together."""

    def __init__(self, cluster, model: nn.Module, mode: str = "async", lr: float = 0.1):
        c = cluster(JobSpec(mode=mode, staleness=1 if mode == "ssp" else 0, num_servers=2,
                            optimizer=OptimizerConfig(kind="sgd", lr=lr)))
        self.cluster, self.model = c, model
        self.client = ShardClient(ClientConfig(scheduler=c.address, name="w0"))
        self.client.join()
        self.client.wait_for_servers()
        self.params = dict(model.named_parameters())
        self.weights = {n: p.detach().numpy().reshape(-1).copy() for n, p in self.params.items()}
        self.client.declare(self.weights, tuple(m.spec for m in sharded_embeddings(model)))
        if mode == "sync":
            self.client.wait_for_workers(1)
        self.rows = EmbeddingClient(self.client, sharded_embeddings(model))

    def step(self, ids, offsets, y) -> float:
        self.client.pull(self.weights)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(torch.from_numpy(self.weights[n]).view(p.shape))
        self.rows.fetch({self.model.bag: ids})
        self.model.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(self.model(ids, offsets), y)
        loss.backward()
        self.client.push({n: p.grad.reshape(-1).numpy() for n, p in self.params.items()},
                         row_grads=self.rows.row_grads())
        return loss.item()

    def close(self):
        self.rows.close()
        self.client.leave()


def reference_rows(spec: TableSpec, ids: torch.Tensor):
    """(positions of ids among their unique ids, the unique ids' initial rows as a tensor)."""
    unique = np.unique(ids.numpy())
    return torch.searchsorted(torch.from_numpy(unique), ids), torch.from_numpy(tables.initial_rows(spec, unique))


def test_forward_equals_torch_modules_on_the_same_rows(cluster):
    emb = ShardedEmbedding("tok", 6, seed=1)
    bag_sum = ShardedEmbeddingBag("bag_s", 5, mode="sum", initializer="uniform", scale=0.5, seed=2)
    bag_mean = ShardedEmbeddingBag("bag_m", 5, mode="mean", seed=3)
    holder = nn.ModuleList([emb, bag_sum, bag_mean, nn.Linear(1, 1)])
    w = Worker(cluster, holder)
    grid = IDS.reshape(3, 4)
    offsets = torch.tensor([0, 3, 3, 7], dtype=torch.int64)   # an empty bag among them
    w.rows.fetch({emb: grid, "bag_s": IDS, bag_mean: IDS})
    assert w.rows.pulls == 1   # every table in one pull_rows

    pos, rows = reference_rows(emb.spec, grid)
    assert torch.equal(emb(grid), nn.Embedding.from_pretrained(rows)(pos))
    assert emb(grid).shape == (3, 4, 6)
    w.rows.fetch({emb: grid.numpy().view(np.uint64)})   # uint64 ids: the same ids by their bits
    assert torch.equal(emb(grid), nn.Embedding.from_pretrained(rows)(pos))
    with pytest.raises(FailedPrecondition, match="'bag_s' has no rows for this step"):
        bag_sum(grid)   # that fetch named only emb: the other modules' rows are gone
    w.rows.fetch({emb: grid, "bag_s": IDS, bag_mean: IDS})
    for bag in (bag_sum, bag_mean):
        pos, rows = reference_rows(bag.spec, IDS)
        ref = nn.EmbeddingBag.from_pretrained(rows, mode=bag.mode)
        assert torch.equal(bag(IDS, offsets), ref(pos, offsets))
        assert torch.equal(bag(grid), ref(pos.reshape(3, 4)))
    w.close()


def test_one_step_moves_exactly_the_touched_rows(cluster):
    torch.manual_seed(0)
    lr = 0.1
    model = Model(dim=4, mode="sum")
    w = Worker(cluster, model, lr=lr)
    ids, offsets = IDS, torch.tensor([0, 4, 9], dtype=torch.int64)
    extra = torch.tensor([31337], dtype=torch.int64)      # fetched, never read by the forward
    y = torch.tensor([1.0, -1.0, 0.5])
    head0 = {n: p.detach().clone() for n, p in model.head.named_parameters()}

    w.client.pull(w.weights)
    w.rows.fetch({model.bag: torch.cat([ids, extra])})
    loss = nn.functional.mse_loss(model(ids, offsets), y)
    loss.backward()
    pushed_ids, pushed = w.rows.row_grads()["items"]
    assert extra.item() not in pushed_ids and sorted(pushed_ids) == sorted(set(ids.tolist()))

    # torch on the same rows: nn.EmbeddingBag over the unique ids' initial rows, same head
    pos, rows0 = reference_rows(model.bag.spec, ids)
    ref_bag = nn.EmbeddingBag.from_pretrained(rows0.clone(), mode="sum", freeze=False)
    ref_head = nn.Linear(4, 1)
    ref_head.load_state_dict(model.head.state_dict())
    nn.functional.mse_loss(ref_head(ref_bag(pos, offsets)).squeeze(-1), y).backward()
    assert torch.equal(torch.from_numpy(pushed), ref_bag.weight.grad)   # duplicates summed by autograd

    w.client.push({n: p.grad.reshape(-1).numpy() for n, p in w.params.items()}, row_grads=w.rows.row_grads())
    after = w.client.pull_rows({"items": np.unique(ids.numpy())})["items"]
    np.testing.assert_allclose(after, (rows0 - lr * ref_bag.weight.grad).numpy(), rtol=0, atol=1e-6)
    assert not np.array_equal(after, rows0.numpy())
    untouched = np.array([31337, 6, -2**40], np.int64)
    np.testing.assert_array_equal(w.client.pull_rows({"items": untouched})["items"],
                                  tables.initial_rows(model.bag.spec, untouched))
    w.client.pull(w.weights)   # the dense head moved by its own gradient
    for n, p in model.head.named_parameters():
        np.testing.assert_allclose(w.weights[f"head.{n}"], (head0[n] - lr * p.grad).reshape(-1).numpy(), atol=1e-6)
    w.close()


def batches(steps: int, seed: int = 0, n_ids: int = 200, batch: int = 32, bag: int = 4):
    """A planted linear teacher: each id has a hidden scalar, a sample's label is the sum of
    its bag's; ids are 64-bit values drawn with repeats (a few much more often)."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(-2**63, 2**63 - 1, size=n_ids, dtype=np.int64, endpoint=True)
    truth = tables.initial_rows(TableSpec("teacher", 1, "normal", 1.0, 11), pool)[:, 0]
    weights = 1.0 / np.arange(1, n_ids + 1) ** 0.5
    for _ in range(steps):
        pick = rng.choice(n_ids, size=(batch, bag), p=weights / weights.sum())
        yield torch.from_numpy(pool[pick]), None, torch.from_numpy(truth[pick].sum(axis=1))


def train(cluster, steps: int, prefetch: bool, mode: str = "async") -> tuple[list[float], Worker]:
    torch.manual_seed(0)
    w = Worker(cluster, Model(dim=8, mode="sum", scale=0.1), mode=mode, lr=0.2)
    data = list(batches(steps))
    losses = []
    for i, (ids, offsets, y) in enumerate(data):
        losses.append(w.step(ids, offsets, y))
        if prefetch and i + 1 < len(data):
            assert w.rows.prefetch({w.model.bag: data[i + 1][0]})
    return losses, w


def test_training_lowers_the_loss(cluster, one_thread):
    losses, w = train(cluster, 60, prefetch=False)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.2 * first, (first, last)   # torch alone on this data and seed: 3.2 -> 0.07
    w.close()


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_prefetch_changes_no_loss_and_is_used(cluster, one_thread, mode):
    plain, w0 = train(cluster, 20, prefetch=False, mode=mode)
    w0.close()
    ahead, w1 = train(cluster, 20, prefetch=True, mode=mode)
    assert ahead == plain   # the same floats, step by step
    assert (w0.rows.pulls, w0.rows.prefetch_hits) == (20, 0)
    assert (w1.rows.pulls, w1.rows.prefetch_hits) == (20, 19)   # every fetch after the first prefetched
    # another batch than the prefetched one: pulled again, the prefetch dropped
    ids = torch.tensor([1, 2, 3], dtype=torch.int64)
    assert w1.rows.prefetch({"items": ids})
    w1.rows.fetch({"items": ids + 1})
    assert (w1.rows.pulls, w1.rows.prefetch_hits) == (22, 19)
    w1.close()


def test_prefetch_is_off_in_sync_mode(cluster):
    model = Model(dim=4)
    w = Worker(cluster, model, mode="sync")
    assert not w.rows.prefetch_enabled and "sync" in w.rows.prefetch_disabled_reason
    data = list(batches(2, n_ids=20, batch=4))
    w.step(*data[0])
    assert w.rows.prefetch({model.bag: data[1][0]}) is False
    assert w.rows.pulls == 1
    w.step(*data[1])    # the next step pulls for itself, at its own clock
    assert (w.rows.pulls, w.rows.prefetch_hits) == (2, 0) and w.client.clock == 2
    w.close()


def test_bad_inputs_are_refused_before_anything_is_pushed(cluster):
    model = Model(dim=4)
    w = Worker(cluster, model)
    bag, ids = model.bag, IDS[:4]
    with pytest.raises(FailedPrecondition, match="'items' has no rows for this step"):
        bag(ids, torch.tensor([0, 2]))
    with pytest.raises(InvalidArgument, match="'items': ids must be an int64 or int32 tensor, not torch.float32"):
        w.rows.fetch({bag: ids.float()})
    with pytest.raises(InvalidArgument, match="'items': ids must be an integer tensor or numpy array, not float64"):
        w.rows.fetch({bag: ids.numpy().astype(np.float64)})
    with pytest.raises(InvalidArgument, match="'nope' is not one of this client's modules"):
        w.rows.fetch({"nope": ids})
    w.rows.fetch({bag: ids})
    with pytest.raises(InvalidArgument, match="ids must be an int64 or int32 tensor, not torch.float32"):
        bag(ids.float(), torch.tensor([0, 2]))
    with pytest.raises(InvalidArgument, match="1-D ids need offsets"):
        bag(ids)
    with pytest.raises(InvalidArgument, match=r"offsets must be 1-D, not of shape \(1, 2\)"):
        bag(ids, torch.tensor([[0, 2]]))
    with pytest.raises(InvalidArgument, match="offsets must start at 0, not 1"):
        bag(ids, torch.tensor([1, 2]))
    with pytest.raises(InvalidArgument, match=r"offsets\[2\]=1 < offsets\[1\]=3"):
        bag(ids, torch.tensor([0, 3, 1]))
    with pytest.raises(InvalidArgument, match="last offset 9 is past the 4 ids"):
        bag(ids, torch.tensor([0, 9]))
    with pytest.raises(InvalidArgument, match="offsets must be None when ids are 2-D"):
        bag(ids.reshape(2, 2), torch.tensor([0]))
    with pytest.raises(FailedPrecondition, match=r"ids \[2\] were not fetched"):
        bag(torch.tensor([5, 2]), torch.tensor([0]))
    with pytest.raises(InvalidArgument, match="mode='max' must be 'sum' or 'mean'"):
        ShardedEmbeddingBag("m", 4, mode="max")
    with pytest.raises(FailedPrecondition, match="before the push of step 0 returned"):
        w.rows.prefetch({bag: ids})
    with pytest.raises(FailedPrecondition, match="table 'other' is not declared at the client"):
        EmbeddingClient(w.client, [ShardedEmbedding("other", 4)])
    assert w.client.clock == 0 and all(s.shard.version == 0 for s in w.cluster.servers)
    np.testing.assert_array_equal(w.client.pull_rows({"items": ids.numpy()})["items"],
                                  tables.initial_rows(bag.spec, ids.numpy()))
    w.close()


def test_psclient_declares_the_tables_and_pushes_their_rows(cluster, one_thread):
    """The torch-level loop: PSClient.connect declares the model's sharded tables beside its
    dense parameters, push(row_grads=...) sends both, and the same run as the ShardClient
    loop above computes the same losses."""
    from shardps import PSClient
    c = cluster(JobSpec(num_servers=2, optimizer=OptimizerConfig(kind="sgd", lr=0.2)))
    torch.manual_seed(0)
    model = Model(dim=8, mode="sum", scale=0.1)
    losses = []
    with PSClient.connect(c.address, model) as ps:
        assert sorted(ps.client.tables) == ["items"]
        rows = EmbeddingClient(ps.client, sharded_embeddings(model))
        for ids, offsets, y in batches(20):
            ps.pull()
            rows.fetch({model.bag: ids})
            model.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(ids, offsets), y)
            loss.backward()
            assert ps.push(row_grads=rows.row_grads())
            losses.append(loss.item())
        rows.close()
    plain, w = train(cluster, 20, prefetch=False)
    w.close()
    assert losses == plain
