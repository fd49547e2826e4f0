"""A whole training run through an in-process cluster (fast; the process-level run is in
tests/integration)."""
import numpy as np
import torch

from pscommon.config import JobSpec
from worker import PSClient, data, models


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
