"""The emb-loop workload of bench/peers/README.md, run on shardps.

Same presets, id stream, step, timing and JSON fields as the peer scripts there
(torch_rpc_emb.py, emb_limit.py), so one table holds all of them (`bench/emb_compare_table.py`,
or the peers' own `bench/peers/emb_table.py`). What
is shardps here: a real `psctl scheduler` (mode async, optimizer adagrad, lr 0.01, initial
accumulator 0.1, eps 1e-10: the servers apply exactly the workload's sparse Adagrad) and S
real `psctl server` processes; W worker processes, each driving a ShardClient. Rows move only
through shardps's gRPC path (RowBlocks in PushPullBatch, or PullRows and Push with --no-fuse);
the multiprocessing Queue,
Events and Barrier only coordinate the benchmark's own processes, as in ps_loop.py.

Tables and keys. One embedding table per field (`f00`, `f01`, ...; the workload's "F fields,
each an embedding table"), TableSpec(dim D, "constant" 1.0). A row's key
is `emb_spec.id64(idx, f)`; shardps places it by its own hash of that key
(`pscommon.tables.shard_of`), which the workload allows, instead of idx % S (the JSON says
`"placement": "shard_of(id64)"`). Rows are created
on first touch, so a server holds only the rows the run touches, not F x N. `--tables shared`
puts every field in one table instead (id64 keys are distinct across fields): a variant that
shows what a table per field costs (a table per field has a RowBlock and a row-store call
per table). The model is tables only: no dense parameter.

Step, per worker: per table, `np.unique` of the batch's keys (drawn and keyed before the
clock starts, as the peers do); `pull_rows` of those keys; g = rows * 1e-3; `push({},
row_grads=..., next_rows=...)`: one call per shard (PushPullBatch) carrying every table's
gradients and the next step's unique keys, whose reply brings those rows, read right after
this push applied; the next step's `pull_rows` of exactly those keys answers from them, so a
step is one round trip per shard (the next step's `np.unique` is done one step ahead; the
run's last push carries none). Rows come only from the servers' lookups either way, so
the checks below are the same. `--no-fuse`: two calls per shard and step (PullRows, then
Push), the path before the fused call (impl "shardps[two-call]").

Checks. Every server counts, per table, the rows it served (answered to pulls) and the rows
it updated (the optimizer's applies); the driver reads them after the timed run (the Inspect
RPC's TableStatus.rows_served and rows_updated). To check them against the rows themselves,
every server then writes a checkpoint (the Checkpoint RPC, `--checkpoint-dir` set) and the
driver reads each table's ids, values, per-row touch counts and Adagrad sums from it:

- rows served, from the checkpoint = sum of the rows' touch counts (a training lookup adds 1
  per row); it must equal the servers' counter;
- rows updated, from the checkpoint = per row, the number of Adagrad steps its value has taken:
  every row starts at 1.0 with every element equal, so its value after k updates is the
  float32 recurrence v_k, computed here exactly as the server computes it; the nearest v_k
  gives k (consecutive v_k are ~3e-5 apart, float32 resolution near 1 is 6e-8); it must equal
  the servers' counter;
- `rows_ok`: served (the counter, and the checkpoint's) equals the rows the workers' clients
  received (their byte counters) and the rows the workers asked for, and updated (both)
  equals the rows the workers pushed;
- `update_ok`: updated equals `emb_spec.expected_rows` (the id generator alone), and more: every
  row's own count equals the generator's, the rows created equal the distinct keys touched;
- `acc_ok`, `acc_ratio`: as the peers, from the checkpointed Adagrad sums.

With --no-check only the counters are read (rows_ok from them alone; no update_ok, acc_ok).

    python bench/emb_loop.py --preset small --servers 1 --workers 1 --json
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
import multiprocessing as mp

# Run as a script, sys.path[0] is bench/; the repository root makes the packages importable
# without an installed copy, bench/peers the workload's own definition (emb_spec.py). Spawned
# children inherit this sys.path.
_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(1, str(_HERE.parent))
sys.path.insert(2, str(_HERE / "peers"))
sys.path.insert(3, str(_HERE))   # ps_loop, when this file is imported rather than run

import numpy as np  # noqa: E402

import emb_spec  # noqa: E402  (bench/peers: presets, id64, expected rows, constants)
# the process plumbing is ps-loop's: the same timing, barrier and failure handling
from ps_loop import Deadline, gather, lo_tx_bytes, malloc_tuned, own_peak_rss_mb, proc_status_bytes  # noqa: E402

WARMUP = emb_spec.WARMUP_STEPS
LR, EPS, GRAD_SCALE = emb_spec.LR, emb_spec.EPS, emb_spec.GRAD_SCALE
ROW_INIT, ACC_INIT = emb_spec.ROW_INIT, emb_spec.ACC_INIT
PEER_MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"  # the peers' marker of tuned glibc malloc


# -- the workload -------------------------------------------------------------------------------
def preset_of(a) -> dict:
    """The preset's F, N, D, B, with --rows (tests only) replacing N."""
    p = dict(emb_spec.PRESETS[a.preset])
    if a.rows:
        p["rows"] = a.rows
    return p


def draw(w: int, f: int, s: int, p: dict) -> np.ndarray:
    """emb_spec.draw with N taken from `p` (equal to it for an unmodified preset)."""
    rng = np.random.default_rng(seed=(1000 * w + f) * 100003 + s)
    return (rng.zipf(emb_spec.ZIPF_A, p["batch"]) - 1) % p["rows"]


def table_names(p: dict, layout: str) -> list[str]:
    return [f"f{f:02d}" for f in range(p["fields"])] if layout == "per-field" else ["emb"]


def keyed_batches(w: int, p: dict, layout: str, n_steps: int) -> list[list[np.ndarray]]:
    """Every batch of worker w as uint64 keys, [step][table], before the clock starts (the
    generator and the keying are the benchmark's cost; emb_limit[id64] keys before timing too)."""
    out = []
    for s in range(n_steps):
        keys = [emb_spec.id64(draw(w, f, s, p), f) for f in range(p["fields"])]
        out.append(keys if layout == "per-field" else [np.concatenate(keys)])
    return out


def expected_touches(p: dict, n_workers: int, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, how many steps of all workers touched each): from the generator alone."""
    keys = [emb_spec.id64(np.unique(draw(w, f, s, p)), f)
            for w in range(n_workers) for f in range(p["fields"]) for s in range(n_steps)]
    return np.unique(np.concatenate(keys), return_counts=True)


def adagrad_trajectory(n: int) -> np.ndarray:
    """v[k]: a row's value (every element alike) after k updates, starting at 1.0 with the
    accumulator at 0.1: the float32 operations of psserver/sparse_optim.SparseAdagrad on the
    workload's fake gradient g = row * 1e-3."""
    f32 = np.float32
    v, acc = np.array([ROW_INIT], f32), np.array([ACC_INIT], f32)
    out = np.empty(n + 1, f32)
    out[0] = v[0]
    for k in range(1, n + 1):
        g = v * GRAD_SCALE
        acc += g * g
        std = np.sqrt(acc)
        std += f32(EPS)
        upd = g / std
        upd *= f32(LR)
        v = v - upd
        out[k] = v[0]
    return out


def updates_from_values(values: np.ndarray, trajectory: np.ndarray) -> tuple[np.ndarray, float]:
    """Per row, the k whose v_k is nearest the row's first element; and the largest distance
    from its v_k over the gap between neighbours (near 0: every row sits on the trajectory)."""
    x = values[:, 0].astype(np.float64)
    desc = trajectory.astype(np.float64)  # decreasing in k
    asc = desc[::-1]
    i = np.clip(np.searchsorted(asc, x), 1, len(asc) - 1)
    nearer_low = (x - asc[i - 1]) < (asc[i] - x)
    j = np.where(nearer_low, i - 1, i)
    k = len(asc) - 1 - j
    gap = float(np.min(-np.diff(desc))) if len(desc) > 1 else 1.0
    off = float(np.max(np.abs(x - desc[k]))) / gap if len(x) else 0.0
    spread = float(np.max(np.abs(values - values[:, :1]))) if len(x) else 0.0  # elements of a row alike
    return k, max(off, spread / gap)


# -- small helpers ------------------------------------------------------------------------------
def impl_name(a) -> str:
    return ("shardps" + ("[shared-table]" if a.tables == "shared" else "") + ("" if a.fuse else "[two-call]")
            + ("+malloc" if malloc_tuned() else ""))


# -- worker process -----------------------------------------------------------------------------
def worker_main(w: int, a, scheduler: str, q, declared, go, barrier) -> None:
    import ctypes
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the launcher
    if os.environ.get("SHARDPS_MALLOC_TUNING", "1") != "0":
        from shardps.pscommon.lifecycle import tune_malloc
        tune_malloc()
    from shardps.pscommon.tables import TableSpec
    from shardps.worker.client import ClientConfig, ShardClient

    p = preset_of(a)
    D = p["dim"]
    names = table_names(p, a.tables)
    total = WARMUP + a.steps
    batches = iter(keyed_batches(w, p, a.tables, total))
    client = ShardClient(ClientConfig(scheduler=scheduler, name=f"emb-loop-{w}", fuse=a.fuse))
    try:
        client.join()
        client.wait_for_servers()
        if w > 0:
            declared.wait(a.timeout)  # worker 0 creates the tables; declare is idempotent
        client.declare({}, tuple(TableSpec(n, D, "constant", ROW_INIT, 0) for n in names))
        q.put(("declared", w, None))
        go.wait(a.timeout)

        moved: list[int] = []  # distinct rows pulled (= pushed) per step
        phase = dict.fromkeys(("dedup", "pull", "grad", "push"), 0.0)
        timing = [False]
        ahead = [None]  # fused: the next step's unique keys, asked for with this step's push
        done = [0]

        def unique_of(keys):
            return {n: np.unique(k) for n, k in zip(names, keys)}

        def step():
            t0 = time.perf_counter()
            uniq = ahead[0] if ahead[0] is not None else unique_of(next(batches))
            done[0] += 1
            ahead[0] = unique_of(next(batches)) if a.fuse and done[0] < total else None
            t1 = time.perf_counter()
            rows = client.pull_rows(uniq)
            t2 = time.perf_counter()
            grads = {n: (u, rows[n] * GRAD_SCALE) for n, u in uniq.items()}  # one row per distinct id
            t3 = time.perf_counter()
            client.push({}, row_grads=grads, next_rows=ahead[0])
            t4 = time.perf_counter()
            moved.append(sum(len(u) for u in uniq.values()))
            if timing[0]:
                for k, dt in zip(phase, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    phase[k] += dt

        for _ in range(WARMUP):
            step()
        barrier.wait(a.timeout)
        timing[0] = True
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        for _ in range(a.steps):
            step()
        t1 = time.perf_counter()
        every, timed = sum(moved), sum(moved[WARMUP:])
        q.put(("worker", w, {
            "t0": t0, "t1": t1, "rss_mb": own_peak_rss_mb(),
            "rows_pulled": every, "rows_pushed": every, "timed_pulled": timed, "timed_pushed": timed,
            # what the client itself received, from its byte counter (rows x D x 4 bytes)
            "rows_received": client.traffic.logical_received // (D * 4),
            "phase_s": {k: v / a.steps for k, v in phase.items()}}))
    except BaseException as exc:
        q.put(("error", w, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        client.leave()


# -- launcher -----------------------------------------------------------------------------------
def start_server(cluster, shard: int, ckpt_dir: pathlib.Path) -> str:
    """cluster.start_server with a checkpoint folder (written only when asked: the timer is
    set past any run), so the tables can be read back after the run."""
    name = f"server-{shard}"
    ready = cluster.run_dir / f"{name}.addr"
    cluster.spawn(name, ["server", "--scheduler", cluster.scheduler_address, "--listen", "127.0.0.1:0",
                         "--shard-id", str(shard), "--ready-file", str(ready),
                         "--checkpoint-dir", str(ckpt_dir), "--checkpoint-every", "1000000"])
    return cluster.wait_ready(name, ready)


def read_tables(servers: list[dict], timeout: float) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """Every server writes a checkpoint now (the Checkpoint RPC); its tables file, per table:
    ids, values, touches and state.sum (the Adagrad accumulators)."""
    from safetensors.numpy import load_file
    from shardps.pscommon import grpcutil
    from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc
    from shardps.psserver.checkpoint import TABLE_SEP

    out = {}
    for s in servers:
        stub = ps_pb2_grpc.ParameterServerStub(grpcutil.channel(s["address"]))
        reply = grpcutil.call(stub.Checkpoint, ps_pb2.CheckpointRequest(), timeout)
        meta_path = pathlib.Path(reply.path)
        meta = json.loads(meta_path.read_text())
        tables: dict[str, dict[str, np.ndarray]] = {}
        if "tables" in meta:
            for name, arr in load_file(str(meta_path.parent / meta["tables"]["file"])).items():
                table, _, key = name.rpartition(TABLE_SEP)
                tables.setdefault(table, {})[key] = arr
        out[s["shard"]] = tables
    return out


def read_counters(servers: list[dict], timeout: float) -> dict[str, int]:
    """The servers' rows served and rows updated, summed over their tables (Inspect's TableInfo)."""
    from shardps.pscommon import grpcutil
    from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc

    served = updated = 0
    for s in servers:
        stub = ps_pb2_grpc.ParameterServerStub(grpcutil.channel(s["address"]))
        reply = grpcutil.call(stub.Inspect, ps_pb2.InspectRequest(sample=0), timeout)
        served += sum(t.status.rows_served for t in reply.tables)
        updated += sum(t.status.rows_updated for t in reply.tables)
    return {"rows_served": served, "rows_updated": updated}


def check_state(a, p: dict, tables_by_shard: dict, status_servers: list[dict]) -> dict:
    """The server-side counts and checks (module docstring) from the checkpointed tables."""
    W = a.workers
    n_steps = WARMUP + a.steps
    traj = adagrad_trajectory(W * n_steps)
    ids, counts, served, acc_growth, fit = [], [], 0, 0.0, 0.0
    start = float(np.float32(ACC_INIT))
    for tables in tables_by_shard.values():
        for arrays in tables.values():
            k, off = updates_from_values(arrays["values"], traj)
            ids.append(arrays["ids"])
            counts.append(k)
            served += int(arrays["touches"].sum())
            acc = arrays["state.sum"]
            acc_growth += float(acc.sum(dtype=np.float64)) - start * acc.size
            fit = max(fit, off)
    ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
    counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    order = np.argsort(ids)
    want_ids, want_counts = expected_touches(p, W, n_steps)
    per_row_ok = bool(np.array_equal(ids[order], want_ids) and np.array_equal(counts[order], want_counts))
    updated = int(counts.sum())
    admitted = sum(t["admitted"] for s in status_servers for t in s.get("tables", {}).values())
    stored = sum(t["rows"] for s in status_servers for t in s.get("tables", {}).values())
    return dict(ckpt_rows_served=served, ckpt_rows_updated=updated, per_row_ok=per_row_ok,
                rows_created=admitted, rows_stored=stored, rows_expected_distinct=len(want_ids),
                acc_growth=acc_growth, row_fit=round(fit, 4),
                expected_rows=int(want_counts.sum()))


def run(a) -> dict:
    from shardps.pscommon.config import JobSpec, OptimizerConfig
    from shardps.psctl import ops
    from shardps.psctl.up import Cluster

    p = preset_of(a)
    S, W, N, D = a.servers, a.workers, a.steps, p["dim"]
    deadline = Deadline(a.timeout)
    run_dir = pathlib.Path(a.run_dir or tempfile.mkdtemp(prefix="shardps-emb-loop-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(run_dir)
    ctx = mp.get_context("spawn")  # never fork: this process has imported grpc
    q, declared, go, barrier = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Barrier(W)
    procs = []
    ok = False
    state = None
    try:
        job = JobSpec(mode="async", num_servers=S,
                      optimizer=OptimizerConfig(kind="adagrad", lr=LR, eps=EPS, initial_accumulator_value=ACC_INIT))
        scheduler = cluster.start_scheduler(job)
        for s in range(S):
            start_server(cluster, s, run_dir / f"ckpt-{s}")
        base_rss = max(proc_status_bytes(cluster.procs[f"server-{s}"].pid, "VmRSS") for s in range(S))
        procs = [ctx.Process(target=worker_main, args=(w, a, scheduler, q, declared, go, barrier), daemon=True)
                 for w in range(W)]
        for pr in procs:
            pr.start()
        gather(q, "declared", 1, deadline, procs, cluster)
        declared.set()
        if W > 1:
            gather(q, "declared", W - 1, deadline, procs, cluster)
        lo0 = lo_tx_bytes()  # from here: the 2 + N steps of every worker, as the peers count
        go.set()
        wres = gather(q, "worker", W, deadline, procs, cluster)
        lo = lo_tx_bytes() - lo0

        status = ops.collect_status(scheduler, 30.0)
        servers = sorted((s for s in status["servers"] if s["state"] == "alive"), key=lambda s: s["shard"])
        if len(servers) != S or any("tables" not in s for s in servers):
            raise RuntimeError(f"server status incomplete: {servers}")
        rss = {s["shard"]: proc_status_bytes(cluster.procs[f"server-{s['shard']}"].pid, "VmHWM") for s in servers}
        counters = read_counters(servers, max(30.0, deadline.left()))
        if a.check:
            state = check_state(a, p, read_tables(servers, max(30.0, deadline.left())), servers)
        ok = True
    finally:
        for pr in procs:
            pr.join(timeout=10 if ok else 0.1)
        for pr in procs:
            if pr.is_alive():
                pr.kill()  # by pid, only this launcher's own children
                pr.join()
        try:
            cluster.stop(grace_s={"worker": 5.0, "server": 10.0, "scheduler": 5.0})  # per tier (psctl/up.py TIERS)
        finally:
            for proc in cluster.procs.values():  # the daemons do not die with this launcher: never leave one
                if proc.poll() is None:
                    proc.kill()  # by pid, only this launcher's own children
                    proc.wait()
        if ok and not a.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif not ok:
            print(f"emb_loop: logs kept in {run_dir}", file=sys.stderr)

    # Same formulas as the peers' summarize() (bench/peers/emb_spec.py).
    wall = max(w["t1"] for w in wres) - min(w["t0"] for w in wres)
    timed_pulled = sum(w["timed_pulled"] for w in wres)
    moved = timed_pulled + sum(w["timed_pushed"] for w in wres)
    pulled, pushed = sum(w["rows_pulled"] for w in wres), sum(w["rows_pushed"] for w in wres)
    received = sum(w["rows_received"] for w in wres)
    import grpc
    record = dict(
        impl=impl_name(a), preset=a.preset, fields=p["fields"], rows=p["rows"], dim=D, batch=p["batch"],
        servers=S, workers=W, steps=N, wall_s=round(wall, 4),
        rows_per_s=round(moved / wall),
        MBps=round(moved * D * 4 / wall / 1e6, 1),
        steps_per_s=round(sum(N / (w["t1"] - w["t0"]) for w in wres), 2),
        unique_frac=round(timed_pulled / (W * N * p["fields"] * p["batch"]), 4),
        server_rss_mb=round(max(rss.values()) / 2**20, 1),
        worker_rss_mb=round(max(w["rss_mb"] for w in wres), 1),
    )
    served, updated = counters["rows_served"], counters["rows_updated"]
    record["rows_ok"] = served == received == pulled and updated == pushed
    if state is not None:
        acc_ratio = state["acc_growth"] / (D * GRAD_SCALE ** 2) / max(1, updated)
        record.update(
            rows_ok=(record["rows_ok"] and state["ckpt_rows_served"] == served
                     and state["ckpt_rows_updated"] == updated),
            update_ok=(updated == state["expected_rows"] and state["per_row_ok"] and state["row_fit"] < 0.5
                       and state["rows_created"] == state["rows_stored"] == state["rows_expected_distinct"]),
            acc_ok=abs(acc_ratio - 1) < 0.05, acc_ratio=round(acc_ratio, 4))
    record["lo_bytes_per_logical"] = round(lo / ((pulled + pushed) * D * 4), 3)
    record.update(
        grpc=grpc.__version__,
        # shardps-only fields
        malloc_tuned=malloc_tuned(), placement="shard_of(id64)", tables=a.tables, fused=a.fuse,
        server_base_rss_mb=round(base_rss / 2**20, 1),
        worker_phase_s={k: round(sum(w["phase_s"][k] for w in wres) / W, 6) for k in ("dedup", "pull", "grad", "push")},
        rows_received=received,
        per_server=[{"shard": s["shard"], "rss_mb": round(rss[s["shard"]] / 2**20, 1), "pushes": s["pushes"],
                     "pulls": s["pulls"], "rows": sum(t["rows"] for t in s["tables"].values()),
                     "table_mb": round(sum(t["bytes"] for t in s["tables"].values()) / 2**20, 1)}
                    for s in servers],
    )
    record["state"] = dict(counters)
    if state is not None:
        record["state"].update({k: state[k] for k in ("ckpt_rows_served", "ckpt_rows_updated", "expected_rows",
                                                      "per_row_ok", "rows_created", "rows_stored",
                                                      "rows_expected_distinct", "row_fit")})
    return record


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(emb_spec.PRESETS), default="small")
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: the preset's, small 200, large 20)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--timeout", type=float, default=180, help="abort the run after this many seconds")
    ap.add_argument("--tables", choices=["per-field", "shared"], default="per-field",
                    help="one table per field (the workload's layout, default) or one table for all fields")
    ap.add_argument("--rows", type=int, default=None, help="rows per field, replacing the preset's N (tests only)")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false",
                    help="two calls per shard and step (PullRows, then Push) instead of one PushPullBatch")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the checkpoint read-back (rows_ok, update_ok, acc_ok): for profiling runs")
    ap.add_argument("--run-dir", default=None, help="keep the daemons' logs here (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    a.steps = a.steps or emb_spec.PRESETS[a.preset]["steps"]
    if a.servers < 1 or a.workers < 1 or a.steps < 1 or (a.rows is not None and a.rows < 1):
        ap.error("--servers, --workers, --steps and --rows must be >= 1")
    return a


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends TERM: run the cleanup
    a = parse(argv)
    r = run(a)
    print(json.dumps(r) if a.json else "\n".join(f"{k:>22}: {v}" for k, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
