"""A whole training run through an in-process cluster (fast; the process-level run is in
tests/integration)."""
import json
import threading

import numpy as np
import pytest
import torch

from shardps.pscommon.config import CodecConfig, JobSpec, OptimizerConfig
from shardps import PSClient
from shardps.worker import data, models
from shardps.worker.train import Loop, MetricsWriter, TrainConfig, partition_batches

CTR_STEPS = 200


@pytest.mark.slow  # a training run: about 12 s
def test_inprocess_cluster_trains_digits(cluster):
    c = cluster(JobSpec(num_servers=2))
    model = models.build("digits-mlp", seed=0)
    split = data.digits()
    gen = torch.Generator().manual_seed(0)
    before = data.accuracy(model, split.x_test, split.y_test)
    with PSClient.connect(c.address, model) as ps:
        for _ in range(400):
            ps.pull()
            idx = torch.randint(len(split.x_train), (32,), generator=gen)
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            assert ps.push()
        ps.pull()
        assert ps.clock == 400
    after = data.accuracy(model, split.x_test, split.y_test)
    assert before < 0.5 and after >= 0.92
    shards = c.servers
    assert sum(s.shard.version for s in shards) == 2 * 400
    assert all(np.isfinite(e.value).all() for s in shards for e in s.shard.entries.values())


class RejoinMidPartition(Loop):
    """Comes back under a new incarnation after the first step of its first partition, as a
    worker declared dead (a long pause) does: the scheduler has given that partition back."""

    rejoined = False

    def step(self, idx):
        ok = super().step(idx)
        if not self.rejoined:
            self.rejoined = True
            self.ps.client.rejoin(self.ps.client.incarnation)
        return ok


def test_partition_of_a_lapsed_lease_is_dropped_not_trained_twice(cluster, tmp_path):
    parts, batch = 4, 32
    c = cluster(JobSpec(num_servers=2))
    split = data.digits()
    model = models.build("digits-mlp", seed=0)
    metrics = tmp_path / "m.jsonl"
    cfg = TrainConfig(scheduler=c.address, epochs=1, partitions=parts, batch_size=batch)
    with PSClient.connect(c.address, model) as ps:
        first_inc = ps.client.incarnation
        loop = RejoinMidPartition(cfg, ps, model, torch.device("cpu"), split,
                                  MetricsWriter(str(metrics)), threading.Event())
        loop.run_epochs()
        loop.metrics.close()
        assert ps.client.incarnation > first_inc
    done = [json.loads(line) for line in metrics.read_text().splitlines()]
    finished = sorted(r["partition"] for r in done if r.get("event") == "partition_done")
    assert finished == list(range(parts)), finished
    batches = sum(len(partition_batches(len(split.x_train), parts, 0, p, batch, cfg.seed)) for p in range(parts))
    # every batch once, plus the one step taken before the lease lapsed: the rest of that
    # partition was trained once, after it was assigned again
    assert loop.done == batches + 1, (loop.done, batches)


@pytest.mark.slow  # 20 s of training
def test_ctr_embedding_table_trains_sliced_over_two_shards(cluster):
    """The synthetic CTR task: its 100k-row embedding table is sliced into keys on both shards,
    top-k pushes carry the few rows a batch touches, and held-out accuracy climbs well above
    chance (50%)."""
    job = JobSpec(num_servers=2, slice_bytes=1 << 20, push_codec=CodecConfig.parse("topk:0.02"),
                  pull_codec=CodecConfig.parse("bf16"), optimizer=OptimizerConfig(kind="sgd", lr=3.0))
    c = cluster(job)
    model = models.build("ctr", seed=0)
    split = models.entry("ctr").dataset()
    gen = torch.Generator().manual_seed(0)
    with PSClient.connect(c.address, model) as ps:
        keys = ps.client.shard_map.keys_of_param("deep.weight")
        for _ in range(CTR_STEPS):
            ps.pull()
            idx = torch.randint(len(split.x_train), (256,), generator=gen)
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            assert ps.push()
        ps.pull()
        acc = data.accuracy(model, split.x_test, split.y_test)
        sent, logical = ps.bytes_sent, ps.client.traffic.logical_sent
    assert len(keys) > 2 and {k.shard for k in keys} == {0, 1}, keys
    assert acc >= 0.75, f"held-out accuracy {acc:.3f} after {CTR_STEPS} steps"
    assert logical / sent > 10, (logical, sent)   # top-k: a small part of the dense gradient
