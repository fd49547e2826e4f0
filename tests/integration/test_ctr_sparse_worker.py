"""`psctl worker --model ctr-sparse` as real processes: a scheduler (adagrad, async), two
servers and two workers started by hand, training the built-in click log's wide & deep model
on rows of a sharded table keyed by the raw 64-bit ids. Mid-run shard 1's server is killed
with kill -9 and restarted from its checkpoints: it restores the table's rows of its last
checkpoint, and the job goes on. Each worker exits 0 and its final record reports held-out
AUC and log loss beside the planted teacher's AUC; both shards hold rows of the table."""
from __future__ import annotations

import math
import re

import pytest
from safetensors.numpy import load_file

from shardps.pscommon import grpcutil
from shardps.pscommon.framing import parameter_server_stub
from shardps.pscommon.wire.v1 import ps_pb2

from .helpers import newest_checkpoint, poll, read_metrics, start_server

STEPS = 40          # per worker, batches of 1024: 80 steps in all, 0.41 of a pass over the 200k samples
BATCH = "1024"
JOB = ("--mode", "async", "--servers", "2", "--optimizer", "adagrad", "--lr", "0.02",
       "--initial-accumulator", "1e-6", "--heartbeat-timeout", "3")
KILL_AFTER = 10     # steps each worker has trained when shard 1 is killed
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
def test_ctr_sparse_workers_reach_the_auc_bar_through_a_shard_restart(procs):
    ckpt = procs.root / "ckpt"
    flags = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "1")
    sched = procs.scheduler(*JOB)
    servers = [procs.server(sched.address, shard, *flags) for shard in range(2)]
    workers = [procs.worker(sched.address, i, STEPS, "--batch-size", BATCH, "--min-workers", "2",
                            model="ctr-sparse") for i in range(2)]

    def trained_and_checkpointed():
        for w in workers:
            assert w.running() or w.popen.returncode == 0, w.log_text()[-3000:]
        steps = [len([r for r in read_metrics(w.metrics) if "step" in r]) if w.metrics.exists() else 0
                 for w in workers]
        c = newest_checkpoint(ckpt, 1)
        return c if min(steps) >= KILL_AFTER and c and "tables" in c else None
    poll(trained_and_checkpointed, 240, interval_s=0.3, what=f"{KILL_AFTER} steps each and a checkpoint of shard 1")
    servers[1].kill9()
    last = newest_checkpoint(ckpt, 1)   # nothing writes there any more
    saved_rows = len(load_file(str(ckpt / "shard-1" / last["tables"]["file"]))["ctr/ids"])
    assert saved_rows > 0
    servers[1] = start_server(procs, sched.address, 1, "server-1-restarted", *flags)
    restored = re.search(r"restored from \S+: version (\d+), \d+ keys, table ctr (\d+) rows",
                         servers[1].log_text())
    assert restored, servers[1].log_text()[-3000:]
    assert int(restored.group(2)) == saved_rows and int(restored.group(1)) == last["shard_version"]

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
