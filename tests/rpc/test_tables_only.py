"""A job whose model is embedding tables only (no dense parameter): the scheduler fixes it,
its fingerprint covers the tables, rows train in every mode, a worker declaring other tables is
refused, and an observer learns the tables from the shard map alone."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from shardps.pscommon import tables
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import FailedPrecondition
from shardps.pscommon.tables import TableSpec
from shardps.pscommon.wire.v1 import scheduler_pb2, scheduler_pb2_grpc
from shardps.worker.client import ClientConfig, ShardClient

EMB = TableSpec("emb", 4, "uniform", 0.05, 1)
LR = 0.5


def joined(c, name: str) -> ShardClient:
    w = ShardClient(ClientConfig(scheduler=c.address, name=name))
    w.join()
    w.wait_for_servers()
    return w


@pytest.mark.parametrize("mode", ["async", "sync", "ssp"])
def test_a_model_of_tables_only_trains_its_rows(cluster, mode):
    c = cluster(JobSpec(mode=mode, staleness=1 if mode == "ssp" else 0, num_servers=2,
                        optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    w = joined(c, "w0")
    smap = w.declare({}, (EMB,))
    assert smap.keys == () and smap.tables == (EMB,)
    ids = np.array([3, 2**50 + 9, -4, 77], np.int64)
    assert set(tables.shard_of(ids, 2)) == {0, 1}
    start = w.pull_rows({"emb": ids})["emb"]
    np.testing.assert_array_equal(start, tables.initial_rows(EMB, ids))
    for step in range(3):
        w.pull({})
        w.push({}, row_grads={"emb": (ids, np.ones((len(ids), EMB.dim), np.float32))})
        w.step_done(step)
    np.testing.assert_allclose(w.pull_rows({"emb": ids})["emb"], start - 3 * LR, rtol=0, atol=1e-6)
    with grpc.insecure_channel(c.address) as ch:
        fp = scheduler_pb2_grpc.SchedulerStub(ch).Status(scheduler_pb2.StatusRequest(), timeout=30).model_fingerprint
    assert fp == smap.fingerprint
    w.leave()


def test_another_table_set_is_refused_and_an_observer_learns_the_tables_from_the_map(cluster):
    c = cluster(JobSpec(num_servers=2))
    w = joined(c, "w0")
    smap = w.declare({}, (EMB,))
    other = joined(c, "w1")
    with pytest.raises(FailedPrecondition, match="table emb \\(dim 8"):
        other.declare({}, (TableSpec("emb", 8, "uniform", 0.05, 1),))
    with pytest.raises(FailedPrecondition, match="it has bias \\[2\\]"):
        other.declare({"bias": np.zeros(2, np.float32)}, (EMB,))
    other.leave()
    w.push({}, row_grads={"emb": (np.array([5], np.int64), np.ones((1, EMB.dim), np.float32))})
    observer = ShardClient(ClientConfig(scheduler=c.address, name="observer"))
    assert observer.attach().fingerprint == smap.fingerprint
    assert observer.tables == {"emb": EMB}
    np.testing.assert_allclose(observer.pull_rows({"emb": np.array([5], np.int64)})["emb"],
                               tables.initial_rows(EMB, np.array([5], np.int64)) - 0.1, atol=1e-6)
    w.leave()


def test_psclient_trains_a_torch_model_of_one_sharded_table(cluster):
    """PSClient.connect with a model whose only parameters are a ShardedEmbeddingBag's rows."""
    import torch

    from shardps import PSClient
    from shardps.worker.embedding import EmbeddingClient, ShardedEmbeddingBag, sharded_embeddings

    c = cluster(JobSpec(num_servers=2, optimizer=OptimizerConfig(kind="sgd", lr=0.5)))
    model = torch.nn.Module()
    model.bag = ShardedEmbeddingBag("items", 4, mode="sum", initializer="zeros", scale=0.0, seed=0)
    ids, offsets = torch.tensor([1, 2**40, 7, 7], dtype=torch.int64), torch.tensor([0, 2])
    with PSClient.connect(c.address, model) as ps:
        assert ps.client.shard_map.keys == () and sorted(ps.client.tables) == ["items"]
        rows = EmbeddingClient(ps.client, sharded_embeddings(model))
        losses = []
        for _ in range(5):
            ps.pull()
            rows.fetch({model.bag: ids})
            loss = ((model.bag(ids, offsets) - 1.0) ** 2).mean()
            loss.backward()
            assert ps.push(row_grads=rows.row_grads())
            losses.append(loss.item())
        rows.close()
    assert losses[0] == 1.0 and losses[-1] < 0.5 * losses[0], losses
