"""`psctl worker --model ctr-sparse` as real processes: a scheduler (adagrad, async), two
servers and two workers started by hand, training the built-in click log's wide & deep model
on rows of a sharded table keyed by the raw 64-bit ids. Each worker exits 0 and its final
record reports held-out AUC and log loss beside the planted teacher's AUC; both shards hold
rows of the table."""
from __future__ import annotations

import math

import pytest

from shardps.pscommon import grpcutil
from shardps.pscommon.framing import parameter_server_stub
from shardps.pscommon.wire.v1 import ps_pb2

from .helpers import read_metrics

STEPS = 40          # per worker, batches of 1024: 80 steps in all, 0.41 of a pass over the 200k samples
BATCH = "1024"
JOB = ("--mode", "async", "--servers", "2", "--optimizer", "adagrad", "--lr", "0.02",
       "--initial-accumulator", "1e-6")
# The bars, from two runs of exactly this test's cluster on a 2-core machine under heavy
# load (2026-12-07): the two workers' final records read 0.7928 and 0.7921, then 0.7936 and
# 0.7928. The worker that finishes last evaluates after all 80 steps were applied, so the
# best record is that model's: bar 0.775, 0.017 below the lowest measured. The other
# evaluates when it finished, after its own 40 steps and however many of the other's:
# alone, 40 steps reach 0.7757 (one worker in process, same seed and job), so 0.75 holds
# whichever worker was starved of CPU. For scale: the single-process torch reference
# (bench/ctr_sparse_reference.py) is at 0.783 after 50 steps and 0.803 after 100; the
# teacher at 0.8323 on this test set, where a model that learned nothing is at 0.5.
BAR_LAST, BAR_EACH = 0.775, 0.75
TEACHER_AUC = 0.8323   # seed 0's 50k held-out samples (worker/models/ctr_sparse.py)


@pytest.mark.slow
def test_ctr_sparse_workers_reach_the_auc_bar(procs):
    sched = procs.scheduler(*JOB)
    servers = [procs.server(sched.address, shard) for shard in range(2)]
    workers = [procs.worker(sched.address, i, STEPS, "--batch-size", BATCH, "--min-workers", "2",
                            model="ctr-sparse") for i in range(2)]
    for w in workers:
        assert w.wait(240) == 0, f"{w.name} exited {w.popen.returncode}:\n{w.log_text()[-3000:]}"

    finals = []
    for w in workers:
        records = read_metrics(w.metrics)
        final = records[-1]
        assert [r["step"] for r in records[:-1]] == list(range(1, STEPS + 1))
        assert final["steps"] == STEPS and not final["stopped"], final
        assert "eval_accuracy" not in final
        assert final["teacher_auc"] == TEACHER_AUC, final
        assert math.isfinite(final["eval_logloss"]) and final["eval_logloss"] < 0.6, final
        assert final["eval_auc"] >= BAR_EACH, final
        line = w.log_text().strip().splitlines()[-1]
        assert line.startswith(f"worker {final['worker']} finished: {STEPS} steps") and \
            f"auc {final['eval_auc']:.4f} (teacher {TEACHER_AUC:.4f})" in line, line
        finals.append(final)
    assert max(f["eval_auc"] for f in finals) >= BAR_LAST, finals

    # the rows live on both shards; a 1024-sample batch reads about 13k distinct ids
    for srv in servers:
        with grpcutil.channel(srv.address) as ch:
            reply = parameter_server_stub(ch).ShardStatus(ps_pb2.ShardStatusRequest(), timeout=30)
        (table,) = [t for t in reply.tables if t.name == "ctr"]
        assert table.dim == 17 and table.rows > 20_000, table
