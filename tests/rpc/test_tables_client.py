"""ShardClient with embedding tables on an in-process cluster (a scheduler and two servers):
rows spread over the shards by id, a batch's repeated ids pulled and pushed once, and training
that moves exactly the rows it touched, in every mode."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from shardps.pscommon import tables
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tables import TableSpec
from shardps.worker.client import ClientConfig, ShardClient

EMB = TableSpec("emb", 8, "uniform", 0.05, 3)
LR = 0.5
STEPS = 30


def target(ids: np.ndarray) -> np.ndarray:
    """Where each id's row should go: a fixed function of the id."""
    return tables.initial_rows(TableSpec("t", EMB.dim, "normal", 1.0, 99), ids)


def client(c, name: str) -> ShardClient:
    w = ShardClient(ClientConfig(scheduler=c.address, name=name))
    w.join()
    w.wait_for_servers()
    w.declare({"bias": np.zeros(4, np.float32)}, (EMB,))
    return w


def train(w: ShardClient, ids: np.ndarray, steps: int) -> None:
    """Rows pulled, squared distance to target() as the loss, its gradient pushed."""
    bias = {"bias": np.zeros(4, np.float32)}
    for _ in range(steps):
        w.pull(bias)
        rows = w.pull_rows({"emb": ids})["emb"]
        w.push({"bias": np.zeros(4, np.float32)}, row_grads={"emb": (ids, rows - target(ids))})


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_one_worker_trains_rows_on_both_shards(cluster, mode):
    c = cluster(JobSpec(mode=mode, staleness=1 if mode == "ssp" else 0, num_servers=2,
                        optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    w = client(c, "w0")
    ids = np.array([5, -7, 2**40 + 1, 12, 5, 5, 999], dtype=np.int64)   # repeats, and both shards
    assert set(tables.shard_of(np.unique(ids), 2)) == {0, 1}
    first = w.pull_rows({"emb": ids})["emb"]
    np.testing.assert_array_equal(first, tables.initial_rows(EMB, ids))
    assert np.array_equal(first[0], first[4]) and np.array_equal(first[0], first[5])
    before = w.traffic.logical_received
    w.pull_rows({"emb": ids})
    assert w.traffic.logical_received - before == 5 * EMB.dim * 4   # 5 unique ids, not 7
    train(w, ids, STEPS)
    got = w.pull_rows({"emb": ids})["emb"]
    # each step moves a row by lr x (its count in the batch) x its distance to the target:
    # id 5 appears 3 times, so it overshoots and comes back; all end close to their targets
    np.testing.assert_allclose(got, target(ids), atol=1e-3)
    untouched = np.array([6, 2**50], dtype=np.int64)
    np.testing.assert_array_equal(w.pull_rows({"emb": untouched})["emb"], tables.initial_rows(EMB, untouched))
    stores = [s.shard.tables.stores["emb"].stats().rows for s in c.servers]
    assert sum(stores) == 5 + 2 and min(stores) >= 1   # rows live where shard_of puts them
    w.leave()


def test_sync_workers_average_the_rows_they_share(cluster):
    c = cluster(JobSpec(mode="sync", num_servers=2, optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    workers = [client(c, f"w{i}") for i in range(2)]
    for w in workers:
        w.wait_for_workers(2)
    shared, own = np.array([1, 2, 3], np.int64), [np.array([10, 11], np.int64), np.array([20], np.int64)]
    batches = [np.concatenate([shared, own[i]]) for i in range(2)]
    errors = []

    def run(w, ids):
        try:
            train(w, ids, STEPS)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(w, ids)) for w, ids in zip(workers, batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    everything = np.concatenate([shared, *own])
    got = workers[0].pull_rows({"emb": everything})["emb"]
    # a shared row gets both workers' (equal) gradients averaged; a row one worker touched gets
    # half of its gradient each step (the step's average over two workers): both converge
    np.testing.assert_allclose(got, target(everything), atol=1e-3)
    for w in workers:
        w.leave()


def test_rows_of_an_undeclared_table_are_refused_before_anything_moves(cluster):
    c = cluster(JobSpec(num_servers=2))
    w = client(c, "w0")
    with pytest.raises(InvalidArgument, match="table 'nope' is not one of the declared tables"):
        w.pull_rows({"nope": np.array([1], np.int64)})
    clock = w.clock
    with pytest.raises(InvalidArgument, match="gradients of shape"):
        w.push({"bias": np.zeros(4, np.float32)}, row_grads={"emb": (np.array([1, 2]), np.zeros((3, 8), np.float32))})
    assert w.clock == clock and all(s.shard.version == 0 for s in c.servers)
    w.leave()


def test_rows_come_back_when_a_server_restarts_from_its_checkpoint(cluster, tmp_path):
    """Drained (final checkpoint) and started again on the same folder, the shard serves the
    rows it had, not their initial values; training goes on from them."""
    from shardps.psserver.daemon import ServerConfig, ServerProcess
    c = cluster(JobSpec(num_servers=1, heartbeat_timeout_s=2.0, optimizer=OptimizerConfig(kind="adagrad", lr=LR)))
    c.servers[0].drain()   # the cluster's own server has no checkpoint folder: replace it
    cfg = ServerConfig(scheduler=c.address, shard_id=0, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=3600)
    c.servers[0] = ServerProcess(cfg)
    c.servers[0].start()
    w = client(c, "w0")
    ids = np.array([4, -9, 2**61, 4], np.int64)
    train(w, ids, 5)
    before = w.pull_rows({"emb": ids})["emb"]
    assert not np.array_equal(before, tables.initial_rows(EMB, ids))
    c.servers[0].drain()
    c.servers[0] = ServerProcess(cfg)
    c.servers[0].start()
    assert c.servers[0].shard.tables.stores["emb"].stats().rows == 3
    np.testing.assert_array_equal(w.pull_rows({"emb": ids})["emb"], before)
    train(w, ids, 2)
    w.leave()


def test_export_writes_every_stored_row_beside_the_model_and_inspect_names_the_hottest(cluster, tmp_path, capsys):
    from safetensors.numpy import load_file

    from shardps.psctl import export
    from shardps.pscommon.wire.v1 import ps_pb2
    c = cluster(JobSpec(num_servers=2, optimizer=OptimizerConfig(kind="sgd", lr=LR)))
    w = client(c, "w0")
    ids = np.array([5, -7, 2**40 + 1, 12, 5, 5, 999], dtype=np.int64)
    train(w, ids, 3)
    assert export.run(c.address, str(tmp_path / "m.safetensors"), 30.0) == 0
    model = load_file(str(tmp_path / "m.safetensors"))
    assert sorted(model) == ["bias"]                      # the model file stays loadable strictly
    side = load_file(str(tmp_path / "m.tables.safetensors"))
    assert side["emb.ids"].dtype == np.uint64 and side["emb.values"].shape == (5, EMB.dim)
    order = np.argsort(side["emb.ids"])
    unique = np.unique(ids.view(np.uint64))
    assert np.array_equal(side["emb.ids"][order], unique)
    np.testing.assert_array_equal(side["emb.values"][order], w.pull_rows({"emb": unique})["emb"])
    assert "m.tables.safetensors: emb 5 rows" in capsys.readouterr().out
    # inspect names each shard's most looked-up rows: every id was read once a pull (4 pulls)
    for shard in range(2):
        (info,) = w.transport.call(shard, lambda stub: stub.Inspect(ps_pb2.InspectRequest(sample=2), timeout=10)).tables
        held = unique[tables.shard_of(unique, 2) == shard]
        assert info.status.name == "emb" and info.status.rows == len(held)
        assert set(info.hottest_ids) <= set(held.tolist()) and list(info.hottest_touches) == [4] * min(2, len(held))
    w.leave()
