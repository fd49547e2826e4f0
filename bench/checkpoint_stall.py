"""How long a checkpoint blocks training: the shard's lock hold time while a checkpoint is
written, and the latency of pushes and reads that arrive meanwhile.

An in-process shard (no network) holds ps-loop's large preset (25M float32 parameters in 50
tensors; bench/peers/README.md). Two threads keep it busy as a worker would: one pushes a
gradient of one tensor about every millisecond, one reads a value of one tensor as often.
Each repetition writes one checkpoint through the real CheckpointStore (temporary file,
fsync, rename, JSON) in each of two ways, interleaved:

- under_lock: the tensors file written while holding the shard's lock (what
  Shard.write_snapshot did before the copy; reimplemented here to compare);
- copy_then_write: Shard.write_snapshot as it is, a copy under the lock, the write outside.

    python bench/checkpoint_stall.py                       # large preset, sgd, 3 repetitions
    python bench/checkpoint_stall.py --optimizer adam      # 3x the bytes: values + 2 states
    python bench/checkpoint_stall.py --params 1000000 --tensors 8 --reps 5   # small preset

Prints one JSON document: per method the medians over repetitions of the longest single
lock hold by the checkpoint, its total lock time, the slowest push and read that overlapped
the checkpoint, and the checkpoint's own duration; the probes' latencies without any
checkpoint for reference. Figures, not assertions: they depend on the disk and the load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

from shardps.pscommon import sharding
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.wire.v1 import tensor_pb2
from shardps.psserver import checkpoint, ledger
from shardps.psserver.checkpoint import CheckpointStore
from shardps.psserver.shard import Shard, WorkerView

WORKER, INCARNATION = 1, 1
PROBE_PERIOD_S = 0.001


class TimedCondition(threading.Condition):
    """The shard's condition, timing how long one chosen thread holds it."""

    def __init__(self):
        super().__init__()
        self.watched: int | None = None
        self.holds: list[float] = []
        self._since = 0.0

    def __enter__(self):
        entered = super().__enter__()
        if threading.get_ident() == self.watched:
            self._since = time.perf_counter()
        return entered

    def __exit__(self, *exc):
        if threading.get_ident() == self.watched:
            self.holds.append(time.perf_counter() - self._since)
        return super().__exit__(*exc)


def build_shard(params: int, tensors: int, optimizer: str) -> tuple[Shard, dict]:
    job = JobSpec(mode="async", optimizer=OptimizerConfig(kind=optimizer, lr=0.01), slice_bytes=1 << 30)
    shapes = {f"t{i:03d}": (params // tensors + (i < params % tensors),) for i in range(tensors)}
    smap = sharding.build([sharding.Param(n, tensor_pb2.DTYPE_FLOAT32, s) for n, s in shapes.items()], 1,
                          job.slice_bytes)
    shard = Shard(0, job)
    shard.cond = TimedCondition()
    shard.set_view(1, [WorkerView(WORKER, INCARNATION, True, 0)])
    shard.declare(smap.fingerprint, smap.keys_of(0), {k.key: np.ones(k.length, np.float32) for k in smap.keys_of(0)})
    return shard, {"mode": "MODE_ASYNC", "optimizer": {"kind": optimizer}}


def write_under_lock(shard: Shard, path: str, job_json: dict) -> checkpoint.Snapshot:
    """The tensors file written while holding the lock, no copy: the method this replaced."""
    with shard.cond:
        checkpoint.save_tensors(dict(shard._checkpoint_arrays()), path)
        return checkpoint.Snapshot(
            shard=shard.shard_id, fingerprint=shard.fingerprint, job=job_json,
            keys=[dataclasses.asdict(e.spec) for e in shard.entries.values()],
            versions={k: e.version for k, e in shard.entries.items()}, shard_version=shard.version,
            ledger=ledger.to_json(shard.ledger),
            gate={"completed_step": shard.gate.completed_step,
                  "clocks": {str(w): c for w, c in shard.gate.clocks.items()},
                  "pending_from": sorted(shard.gate.pending_from)},
            tensors={})


METHODS = {
    "under_lock": write_under_lock,
    "copy_then_write": lambda shard, path, job_json: shard.write_snapshot(path, job_json),
}


class Probes:
    """A pusher and a reader, each recording (start, latency) of every call."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.stop = threading.Event()
        self.pushes: list[tuple[float, float]] = []
        self.reads: list[tuple[float, float]] = []
        key = sorted(shard.entries)[0]
        self.grad = {key: np.full(shard.entries[key].value.size, 1e-3, np.float32)}
        self.key = key
        self.threads = [threading.Thread(target=self._push, daemon=True),
                        threading.Thread(target=self._read, daemon=True)]
        self.step = 0
        for t in self.threads:
            t.start()

    def _push(self):
        while not self.stop.wait(PROBE_PERIOD_S):
            t0 = time.perf_counter()
            self.shard.push(WORKER, INCARNATION, self.step, self.shard.version, self.grad)
            self.pushes.append((t0, time.perf_counter() - t0))
            self.step += 1

    def _read(self):
        while not self.stop.wait(PROBE_PERIOD_S):
            t0 = time.perf_counter()
            self.shard.read(self.key, lambda v: float(v[0]))
            self.reads.append((t0, time.perf_counter() - t0))

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()


def worst_between(samples, start: float, end: float) -> float:
    """The slowest call that was waiting at any moment of [start, end]."""
    return max((lat for t0, lat in samples if t0 <= end and t0 + lat >= start), default=0.0)


def one_checkpoint(shard: Shard, store: CheckpointStore, probes: Probes, method, job_json: dict) -> dict:
    shard.cond.watched, shard.cond.holds = threading.get_ident(), []
    start = time.perf_counter()
    store.write(lambda path: method(shard, path, job_json))
    end = time.perf_counter()
    shard.cond.watched = None
    return {"lock_hold_max_s": max(shard.cond.holds), "lock_hold_total_s": sum(shard.cond.holds),
            "push_worst_s": worst_between(probes.pushes, start, end),
            "read_worst_s": worst_between(probes.reads, start, end), "checkpoint_s": end - start}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=25_000_000)
    ap.add_argument("--tensors", type=int, default=50)
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp folder)")
    a = ap.parse_args(argv)

    shard, job_json = build_shard(a.params, a.tensors, a.optimizer)
    root = pathlib.Path(tempfile.mkdtemp(prefix="ckpt-stall-", dir=a.dir))
    try:
        store = CheckpointStore(root, 0)
        probes = Probes(shard)
        try:
            time.sleep(1.0)   # probes without any checkpoint: the reference
            idle_until = time.perf_counter()
            reference = {"push_p50_s": statistics.median(lat for t0, lat in probes.pushes if t0 < idle_until),
                         "read_p50_s": statistics.median(lat for t0, lat in probes.reads if t0 < idle_until)}
            runs = {name: [] for name in METHODS}
            for _ in range(a.reps):
                for name, method in METHODS.items():
                    runs[name].append(one_checkpoint(shard, store, probes, method, job_json))
                    time.sleep(0.2)
        finally:
            probes.close()
        bytes_per_checkpoint = sum(arr.nbytes for _, arr in shard._checkpoint_arrays())
    finally:
        shutil.rmtree(root, ignore_errors=True)

    result = {
        "bench": "checkpoint_stall", "params": a.params, "tensors": a.tensors, "optimizer": a.optimizer,
        "checkpoint_bytes": bytes_per_checkpoint, "reps": a.reps, "cpus": os.cpu_count(),
        "no_checkpoint": {k: round(v, 6) for k, v in reference.items()},
        "methods": {name: {field: round(statistics.median(r[field] for r in rs), 6) for field in rs[0]}
                    for name, rs in runs.items()},
    }
    old, new = result["methods"]["under_lock"], result["methods"]["copy_then_write"]
    result["lock_hold_ratio"] = round(old["lock_hold_max_s"] / new["lock_hold_max_s"], 1)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
