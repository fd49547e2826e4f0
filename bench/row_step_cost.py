"""The server's cost of one fused emb-loop step, per stage and per table, in process, no gRPC.

emb-loop (bench/peers/README.md; bench/emb_loop.py) sends each shard one PushPullBatch per
step: every table's row gradients, and the next step's ids, whose rows come back in the reply.
With one table per field (the workload's layout) a step costs the server more than the same
rows in one table; this measures where, on a real Shard and ParameterServer servicer:

  decode   the push's row blocks to checked, summed RowGrads and the pull's asks to checked
           ids: the servicer's own `_row_grads`, `_finite` and `_row_asks`
  apply    Shard.push of those gradients (ledger, gate, the tables' optimizer step, clock tick)
  lookup   Shard.read_rows of the next step's ids (a training lookup: rows stamped, created)
  encode   pscommon.tables.row_blocks of the rows read, as the reply carries them
  handler  the whole call, on a second shard fed the same steps: PushPullRequest.FromString of
           the request's bytes, then Servicer.PushPullBatch (its reply bytes included)

The steps are emb-loop's small preset for worker 0 (bench/emb_loop.py's draw and keys: 512
zipf ids per field and step, np.unique per table), async Adagrad as emb-loop's scheduler
(lr 0.01, eps 1e-10, initial accumulator 0.1), rows created on first touch, constant 1.0.
The gradients are g = 1e-3 (the values do not change the work). For each T in --tables, the
first T fields as T tables ("per-field") and as one table of the same rows ("shared"); per
stage, the median ms per step over --steps steps after --warmup (with --rounds R, the least
of R such medians, the configurations measured round-robin), and the marginal cost of a
table, `per_table_ms`: the least-squares slope of (per-field - shared) over (T - 1), i.e.
what a step pays per table beyond one for the same rows.

    .venv/bin/python bench/row_step_cost.py                # a table on stdout
    .venv/bin/python bench/row_step_cost.py --json
    .venv/bin/python bench/row_step_cost.py --quick --json # seconds: the test's mode
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(1, str(_HERE.parent))
sys.path.insert(2, str(_HERE / "peers"))

import numpy as np  # noqa: E402

import emb_spec  # noqa: E402  (bench/peers: presets, id64, Adagrad constants)
from shardps.pscommon import tables  # noqa: E402
from shardps.pscommon.config import JobSpec, OptimizerConfig  # noqa: E402
from shardps.pscommon.framing import BATCH_BYTES  # noqa: E402
from shardps.pscommon.tables import TableSpec  # noqa: E402
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2  # noqa: E402
from shardps.psserver.servicer import ParameterServerServicer as Servicer  # noqa: E402
from shardps.psserver.shard import Shard  # noqa: E402

STAGES = ("decode", "apply", "lookup", "encode")
FP32 = tensor_pb2.DTYPE_FLOAT32
FINGERPRINT = "row-step-cost"
WORKER, INCARNATION = 0, 1


def step_ids(s: int, n_tables: int, layout: str, p: dict) -> list[np.ndarray]:
    """Step s's unique keys per table, as the worker sends them (np.unique, uint64)."""
    keys = [emb_spec.id64(emb_spec.draw(0, f, s, "small"), f) for f in range(n_tables)]
    return [np.unique(k) for k in keys] if layout == "per-field" else [np.unique(np.concatenate(keys))]


def names(n: int) -> list[str]:
    return [f"f{i:02d}" for i in range(n)]


def make_servicer(p: dict, n_tables: int) -> Servicer:
    job = JobSpec(mode="async", optimizer=OptimizerConfig(
        kind="adagrad", lr=emb_spec.LR, eps=emb_spec.EPS, initial_accumulator_value=emb_spec.ACC_INIT))
    shard = Shard(0, job)
    shard.declare(FINGERPRINT, [], {}, [TableSpec(n, p["dim"], "constant", emb_spec.ROW_INIT, 0)
                                        for n in names(n_tables)])
    return Servicer(shard)


def blocks(ids: list[np.ndarray], dim: int, with_values: bool) -> list[ps_pb2.RowBlock]:
    grad = np.float32(emb_spec.GRAD_SCALE)
    return [b for t, i in zip(names(len(ids)), ids)
            for b in tables.row_blocks(t, i, np.full((len(i), dim), grad) if with_values else None, FP32)]


def header(step: int) -> ps_pb2.PushHeader:
    return ps_pb2.PushHeader(caller=ps_pb2.Caller(worker_id=WORKER, incarnation=INCARNATION), shard=0,
                             step=step, model_fingerprint=FINGERPRINT)


def staged_step(svc: Servicer, step: int, push: list, pull: list) -> dict[str, float]:
    """One step through the servicer's row path, stage by stage: seconds per stage."""
    clock = time.perf_counter
    t0 = clock()
    grads = svc._finite(header(step), svc._row_grads(push))
    asks = svc._row_asks(pull, "PushPullBatch pull_rows", FP32, BATCH_BYTES)
    t1 = clock()
    svc.shard.push(WORKER, INCARNATION, step, 0, grads)
    t2 = clock()
    rows = svc.shard.read_rows([(t, i) for t, i, _ in asks], observer=False)
    t3 = clock()
    out = [b for (t, i, data), r in zip(asks, rows) for b in tables.row_blocks(t, i, r, FP32, ids_bytes=data)]
    t4 = clock()
    assert len(out) >= len(asks)
    return dict(zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)))


def handler_step(svc: Servicer, step: int, push: list, pull: list) -> float:
    """One step as the handler sees it: its request's bytes parsed, PushPullBatch, its reply."""
    wire = ps_pb2.PushPullRequest(header=header(step), rows=push, pull_rows=pull,
                                  pull_rows_dtype=FP32).SerializeToString()
    t0 = time.perf_counter()
    reply = svc.PushPullBatch(ps_pb2.PushPullRequest.FromString(wire), None)
    dt = time.perf_counter() - t0
    assert isinstance(reply, bytes) and len(reply) > 0
    return dt


def run_config(p: dict, n_tables: int, layout: str, warmup: int, steps: int) -> dict:
    """Median ms per step of each stage and of the handler, for one layout of T fields."""
    n_out = n_tables if layout == "per-field" else 1
    staged, whole = make_servicer(p, n_out), make_servicer(p, n_out)
    ids = step_ids(0, n_tables, layout, p)
    for svc in (staged, whole):   # step 0's rows, as the worker's first pull creates them
        svc.shard.read_rows(list(zip(names(n_out), ids)), observer=False)
    per_stage = {k: [] for k in STAGES}
    handler, rows = [], []
    for s in range(warmup + steps):
        nxt = step_ids(s + 1, n_tables, layout, p)
        push, pull = blocks(ids, p["dim"], True), blocks(nxt, p["dim"], False)
        times = staged_step(staged, s, push, pull)
        dt = handler_step(whole, s, push, pull)
        if s >= warmup:
            for k in STAGES:
                per_stage[k].append(times[k])
            handler.append(dt)
            rows.append(sum(len(i) for i in ids))
        ids = nxt
    ms = {k: 1e3 * statistics.median(v) for k, v in per_stage.items()}
    ms["stages"] = sum(ms[k] for k in STAGES)
    ms["handler"] = 1e3 * statistics.median(handler)
    return {"fields": n_tables, "layout": layout, "tables": n_out, "rows_per_step": statistics.mean(rows),
            "ms": {k: round(v, 4) for k, v in ms.items()}}


def per_table(configs: list[dict]) -> dict[str, float | None]:
    """Per measure, the least-squares slope through 0 of (per-field - shared) ms over (T - 1)."""
    by = {(c["fields"], c["layout"]): c["ms"] for c in configs}
    ts = sorted({c["fields"] for c in configs if c["fields"] > 1})
    out = {}
    for k in (*STAGES, "stages", "handler"):
        num = sum((t - 1) * (by[t, "per-field"][k] - by[t, "shared"][k]) for t in ts)
        den = sum((t - 1) ** 2 for t in ts)
        out[k] = round(num / den, 4) if den else None
    return out


def best_of(runs: list[dict]) -> dict:
    """Per measure, the least of the rounds' medians: a burst of other load on a shared
    machine lands on some rounds, not all."""
    return {**runs[0], "ms": {k: min(r["ms"][k] for r in runs) for k in runs[0]["ms"]}}


def measure(a) -> dict:
    p = dict(emb_spec.PRESETS["small"])
    layouts = [(t, layout) for t in a.tables for layout in (("per-field", "shared") if t > 1 else ("per-field",))]
    runs = {key: [] for key in layouts}
    for _ in range(a.rounds):   # round-robin: every configuration sees the same spread of load
        for t, layout in layouts:
            runs[t, layout].append(run_config(p, t, layout, a.warmup, a.steps))
    configs = [best_of(runs[key]) for key in layouts]
    if 1 in a.tables:   # one field: the two layouts are the same tables
        configs.append({**configs[[c["fields"] for c in configs].index(1)], "layout": "shared"})
    return {"bench": "row_step_cost", "preset": "small", "optimizer": "adagrad", "mode": "async",
            "warmup": a.warmup, "steps": a.steps, "rounds": a.rounds, "field_counts": list(a.tables), "configs": configs,
            "per_table_ms": per_table(configs), "loadavg": _loadavg()}


def _loadavg() -> str:
    try:
        return pathlib.Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def table(result: dict) -> str:
    cols = (*STAGES, "stages", "handler")
    lines = [f"{'T':>3} {'layout':<9} {'rows':>6} " + " ".join(f"{c:>8}" for c in cols)]
    for c in result["configs"]:
        lines.append(f"{c['fields']:>3} {c['layout']:<9} {c['rows_per_step']:>6.0f} "
                     + " ".join(f"{c['ms'][k]:>8.3f}" for k in cols))
    pt = result["per_table_ms"]
    lines.append(f"{'':>3} {'per table':<9} {'':>6} " + " ".join(
        f"{pt[k]:>8.3f}" if pt[k] is not None else f"{'-':>8}" for k in cols))
    lines.append(f"ms per step, median of {result['steps']} after {result['warmup']} warm-up, least of "
                 f"{result['rounds']} round(s); loadavg {result['loadavg']}")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default="1,2,4,8", help="field counts T, comma-separated (each 1 to 8)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1, help="measure every configuration this many times, "
                    "round-robin, and keep each measure's least median")
    ap.add_argument("--quick", action="store_true", help="T = 1,2, 3 steps after 1 warm-up (a test's mode)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.tables, a.steps, a.warmup, a.rounds = "1,2", 3, 1, 1
    try:
        a.tables = sorted({int(t) for t in a.tables.split(",")})
    except ValueError:
        ap.error(f"--tables {a.tables!r}: comma-separated integers")
    if not all(1 <= t <= emb_spec.PRESETS["small"]["fields"] for t in a.tables):
        ap.error("--tables: each count from 1 to 8")
    if a.steps < 1 or a.warmup < 0 or a.rounds < 1:
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    result = measure(a)
    print(json.dumps(result, indent=1) if a.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
