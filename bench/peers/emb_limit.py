"""The one-core, no-IPC ceiling for emb-loop: one process pinned to one core does the whole
step itself, per field: dedup the batch, gather the rows, fake gradient, Adagrad apply.
Timed like the parameter-server runs (2 warm-up steps, then N). A PS splits this work across
its processes (dedup on the workers, gather and apply on the servers) and adds IPC, so with
more than one core it can beat this rate: read it as a per-core yardstick.

--keys dense: rows indexed by idx directly, as torch_rpc_emb.py does.
--keys id64:  rows keyed by emb_spec.id64: each field's N keys sorted once, a batch's keys
              found with np.searchsorted; what arbitrary 64-bit keys cost in numpy.

Worker 0's ids, reported as S = W = 1; --servers and --workers are accepted and ignored.

    python bench/peers/emb_limit.py --preset small --keys id64 --json
"""
import os
import threading

import numpy as np

import harness
from emb_spec import (ACC_INIT, EPS, GRAD_SCALE, LR, PRESETS, ROW_INIT, acc_growth, all_draws, id64,
                      parse_args, summarize)


def main():
    a = parse_args(lambda ap: ap.add_argument("--keys", choices=["dense", "id64"], default="dense"))
    harness.deadline(a.timeout)
    a.servers = a.workers = 1
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    p = PRESETS[a.preset]
    shape = (p["rows"], p["dim"])
    tables = [np.full(shape, ROW_INIT, np.float32) for _ in range(p["fields"])]
    accs = [np.full(shape, ACC_INIT, np.float32) for _ in range(p["fields"])]
    batches = all_draws(0, a.preset, harness.WARMUP_STEPS + a.steps)
    if a.keys == "id64":
        # a row's slot is its key's rank among the field's sorted keys; the batches carry keys
        sorted_keys = [np.sort(id64(np.arange(p["rows"]), f)) for f in range(p["fields"])]
        batches = [[id64(b, f) for f, b in enumerate(step)] for step in batches]
    pending, per_step = iter(batches), []

    def step():
        rows = 0
        for f, raw in enumerate(next(pending)):
            u = np.unique(raw)
            slot = np.searchsorted(sorted_keys[f], u) if a.keys == "id64" else u
            x = np.take(tables[f], slot, axis=0)  # same as tables[f][slot], measurably faster
            g = x * GRAD_SCALE
            acc = np.take(accs[f], slot, axis=0)
            acc += g * g
            accs[f][slot] = acc
            tables[f][slot] = x - LR * g / (np.sqrt(acc) + EPS)  # x is still current: nobody else writes
            rows += len(u)
        per_step.append(rows)

    res = harness.timed_steps(step, a.steps, threading.Barrier(1))
    every, timed = sum(per_step), sum(per_step[harness.WARMUP_STEPS:])
    res.update(rows_pulled=every, rows_pushed=every, timed_pulled=timed, timed_pushed=timed)
    server = dict(rows_served=every, rows_updated=every, acc_growth=acc_growth(accs), rss_mb=harness.peak_rss_mb())
    harness.emit(summarize(f"emb_limit[{a.keys}]", a, [res], [server], numpy=np.__version__), a.json)


if __name__ == "__main__":
    main()
