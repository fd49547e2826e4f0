"""Bytes a step moves for one embedding table: as a dense parameter against as table rows.

The same model, a table of ROWS x DIM float32 (1M x 16 = 64 MB) and a batch of BATCH ids drawn
as emb-loop draws them (Zipf 1.2 over the rows: about half of a batch's ids are unique), is
trained two ways on a real cluster in this process (a scheduler and two servers, gRPC on
loopback, async, sgd):

- dense: the table is an ordinary parameter, sliced into keys over the shards; a step pulls all
  of it and pushes a dense gradient (zero but for the batch's rows), as any model whose table
  fits the worker does;
- rows: the table is a shardps embedding table; a step pulls the batch's unique rows
  (ShardClient.pull_rows) and pushes their gradients (push(row_grads=...)).

Bytes are the tensor payload each worker sent and received (TransferCounts: values, and for
rows the 8-byte ids too), per step, averaged over STEPS timed steps after one warm-up step;
gRPC and TCP framing add a little to both. fp32 on the wire in both arms. Figures, not
assertions:

    python bench/emb_bytes.py            # 1M x 16, batch 512, 3 steps
    python bench/emb_bytes.py --json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.tables import TableSpec
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.worker.client import ClientConfig, ShardClient


def batch_ids(rows: int, batch: int, step: int) -> np.ndarray:
    """emb-loop's draw for worker 0, field 0 (bench/peers/emb_spec.py)."""
    rng = np.random.default_rng(seed=100003 * 0 + step)
    return (rng.zipf(1.2, batch) - 1) % rows


class Cluster:
    def __init__(self, job: JobSpec):
        self.scheduler = SchedulerProcess(SchedulerConfig(job=job))
        self.scheduler.start()
        self.servers = [ServerProcess(ServerConfig(scheduler=self.scheduler.address, shard_id=s))
                        for s in range(job.num_servers)]
        for s in self.servers:
            s.start()

    def client(self) -> ShardClient:
        w = ShardClient(ClientConfig(scheduler=self.scheduler.address, name="bench"))
        w.join()
        w.wait_for_servers()
        return w

    def close(self) -> None:
        for s in self.servers:
            s.drain()
        self.scheduler.drain()


def per_step(w: ShardClient, step_fn, steps: int) -> dict:
    step_fn(0)   # warm-up: rows are created, channels open
    t = w.traffic
    sent, received, start = t.wire_sent, t.wire_received, time.perf_counter()
    for s in range(1, steps + 1):
        step_fn(s)
    t = w.traffic
    return {"bytes_sent": (t.wire_sent - sent) / steps, "bytes_received": (t.wire_received - received) / steps,
            "step_s": (time.perf_counter() - start) / steps}


def dense_arm(args, job: JobSpec) -> dict:
    c = Cluster(job)
    try:
        w = c.client()
        table = np.zeros((args.rows, args.dim), np.float32)
        w.declare({"emb": table})
        flat = {"emb": table.reshape(-1)}

        def step(s):
            w.pull(flat)
            ids = batch_ids(args.rows, args.batch, s)
            grad = np.zeros((args.rows, args.dim), np.float32)
            np.add.at(grad, ids, table[ids] * 1e-3 + 1e-3)
            w.push({"emb": grad.reshape(-1)})
        out = per_step(w, step, args.steps)
        w.leave()
        return out
    finally:
        c.close()


def rows_arm(args, job: JobSpec) -> dict:
    c = Cluster(job)
    try:
        w = c.client()
        w.declare({"bias": np.zeros(1, np.float32)}, (TableSpec("emb", args.dim, "zeros", 0.0, 0),))
        unique = []

        def step(s):
            ids = batch_ids(args.rows, args.batch, s)
            unique.append(len(np.unique(ids)))
            rows = w.pull_rows({"emb": ids})["emb"]
            w.push({"bias": np.zeros(1, np.float32)}, row_grads={"emb": (ids, rows * 1e-3 + 1e-3)})
        out = per_step(w, step, args.steps)
        out["unique_ids_per_step"] = float(np.mean(unique[1:]))
        w.leave()
        return out
    finally:
        c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    job = JobSpec(num_servers=args.servers, optimizer=OptimizerConfig(kind="sgd", lr=0.1))
    dense, rows = dense_arm(args, job), rows_arm(args, job)
    total = {name: arm["bytes_sent"] + arm["bytes_received"] for name, arm in (("dense", dense), ("rows", rows))}
    result = {"rows": args.rows, "dim": args.dim, "batch": args.batch, "servers": args.servers, "steps": args.steps,
              "dense": dense, "table_rows": rows, "bytes_ratio": total["dense"] / total["rows"]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"table {args.rows:,} x {args.dim} float32, batch {args.batch} "
          f"({rows['unique_ids_per_step']:.0f} unique ids a step), {args.servers} servers, {args.steps} steps")
    for name, arm in (("dense parameter", dense), ("table rows", rows)):
        print(f"  {name:16s} sent {arm['bytes_sent'] / 1e6:10.3f} MB  received {arm['bytes_received'] / 1e6:10.3f} MB"
              f"  a step; {arm['step_s'] * 1e3:8.1f} ms a step")
    print(f"  rows move {result['bytes_ratio']:,.0f}x fewer bytes a step")


if __name__ == "__main__":
    main()
