"""The end of a data epoch when the partitions do not share out evenly: the workers that run
out of data while another trains the epoch's last partition must not hold the sync or ssp
gate that this worker's steps wait at (issue 14: every worker used to wait for the others
for ever). Real psctl processes; every worker exits 0 and each sample is trained once per
epoch."""
from __future__ import annotations

import math

import numpy as np
import pytest

from .helpers import read_metrics, status_json

pytestmark = pytest.mark.slow

TRAIN_SAMPLES = 1347          # the digits training split (shardps.worker.data.digits)
PARTITIONS, EPOCHS, BATCH, WORKERS = 3, 2, 32, 2   # 3 partitions over 2 workers: uneven
EXIT_BY_S = 120.0             # a deadline, not a timing: the run takes a few seconds


def batches_per_epoch() -> int:
    # the worker cuts a permutation into PARTITIONS contiguous parts (torch.tensor_split: the
    # same sizes as numpy's array_split), each into batches of BATCH
    return sum(math.ceil(len(part) / BATCH) for part in np.array_split(np.arange(TRAIN_SAMPLES), PARTITIONS))


@pytest.mark.parametrize("mode", ["ssp", "sync"])
def test_every_worker_finishes_when_the_last_partitions_leave_others_without_data(procs, mode):
    flags = ("--mode", "ssp", "--staleness", "1") if mode == "ssp" else ("--mode", "sync")
    sched = procs.scheduler(*flags, "--servers", "1")
    procs.server(sched.address, 0)
    # --min-workers: all start together, so the first to finish its partition takes the last
    # one and the other has none while it trains it
    workers = [procs.worker(sched.address, i, 1, "--epochs", str(EPOCHS), "--partitions", str(PARTITIONS),
                            "--batch-size", str(BATCH), "--min-workers", str(WORKERS)) for i in range(WORKERS)]
    for w in workers:
        assert w.wait(timeout=EXIT_BY_S) == 0, f"{w.name} failed; log tail:\n{w.log_text()[-3000:]}"

    records = [read_metrics(w.metrics) for w in workers]
    finals = [r[-1] for r in records]
    assert all(not f["stopped"] for f in finals), finals
    # every partition of every epoch trained once, by one worker ...
    done = sorted((r["epoch"], r["partition"]) for rs in records for r in rs if r.get("event") == "partition_done")
    assert done == [(e, p) for e in range(EPOCHS) for p in range(PARTITIONS)]
    # ... and all of it: the steps the workers counted are each batch of each epoch once
    assert sum(f["steps"] for f in finals) == EPOCHS * batches_per_epoch()
    # some worker sat out steps for want of data: the case this test is about did occur
    assert sum(f["idle_steps"] for f in finals) > 0
    data = status_json(sched.address)["data"]
    assert data["finished"] and data["epoch"] == EPOCHS, data
    assert {e: len(by) for e, by in data["history"].items()} == {str(e): PARTITIONS for e in range(EPOCHS)}
