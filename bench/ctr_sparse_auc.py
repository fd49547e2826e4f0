"""ctr-sparse: held-out AUC against time, shardps beside a single-process torch reference
(issue 13's accuracy goals).

One invocation runs, one after the other on this machine, on the same click log:

  reference     bench/ctr_sparse_reference.py's model (nn.EmbeddingBag(sparse=True)) in this
                process, one pass over the training set in random batches
  async         shardps: a scheduler, 2 servers and 3 `psctl worker --model ctr-sparse`
                processes, one epoch of assigned partitions (--epochs 1): together one pass
  ssp           the same in SSP with --staleness (default 2)
  async-admit2  async again, every server with --admit-after 2

What matches: the samples (the built-in log, 200k training and 50k held-out samples of seed
0; the reference drops the short last batch of its pass, 320 samples, the workers train the
16 partitions' short batches), the batch size, one pass, the optimizer (Adagrad, lr 0.02,
initial accumulator 1e-6, eps 1e-10) for the embedding rows and for the dense MLP alike (a
shardps job has one optimizer; the reference's docstring default of Adam on the MLP is not
this run's), torch's single thread per process. What cannot match: the batch order (the
scheduler's partitions against a permutation), the initial values (the table's rows come from
its (seed, id) initializer, the wide column too, where the reference starts it at zero), and
in async and SSP the gradients are computed on parameters up to a few pushes old.

Held-out AUC is measured while training: the reference every --eval-every steps (its
evaluation time left out of its clock), the clusters once the workers together have made
--eval-every more steps, by reading the served parameters as an observer (as
`evaluate_served`, what `psctl up` ends with), which runs beside the training and takes CPU
from it. A cluster's point is dated by the time and step count right after its last read, so
it never credits a model to an earlier moment than it existed; on a busy machine one
evaluation takes seconds, so the points are sparser than the reference's and a time to AUC
is an upper bound, coarse to the spacing of the points. Times count from the end of the first
step (the earliest worker's), so data generation and process start are left out of both. The
clusters' last point is the served model once every worker has finished, at the time of the
last step. Rows stored are the servers' TableStatus (`psctl status --json`). Under --quick the
workers train on the small log through `psctl worker --data ctr_sparse_auc:quick_log` (bench/
appended to their PYTHONPATH), as any click log of another size or seed can be given.

    .venv/bin/python bench/ctr_sparse_auc.py --out runs/ctr_sparse_auc.json   # 7-8 min on a busy 2-core VM
    .venv/bin/python bench/ctr_sparse_auc.py --quick                          # a small log: 1.5-3 min
    .venv/bin/python bench/ctr_sparse_auc.py --runs async --workers 1         # no staleness, for contrast

Prints the time-to-AUC table (markdown) on stderr and the JSON document on stdout: per run
the final held-out AUC and log loss, the curve ({step, time, auc, logloss}), seconds and steps
to each --thresholds AUC, and for the clusters the rows the servers store; the teacher's AUC;
and `goals`, issue 13's lines (AUC within 0.005 of the reference; admission with N = 2 within
0.005 of async with fewer rows) with the measured gaps.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

_HERE = pathlib.Path(__file__).resolve().parent
# Run as a script, sys.path[0] is bench/; the repository root makes the packages importable.
sys.path.insert(1, str(_HERE.parent))
sys.path.insert(2, str(_HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ctr_sparse_reference as ref  # noqa: E402
from shardps.pscommon.config import JobSpec, OptimizerConfig  # noqa: E402
from shardps.worker import models  # noqa: E402
from shardps.worker.models import ctr_sparse  # noqa: E402

LR, INIT_ACC, EPS = 0.02, ref.ADAGRAD_INIT, 1e-10
OPTIMIZER = OptimizerConfig(kind="adagrad", lr=LR, eps=EPS, initial_accumulator_value=INIT_ACC)
PRESETS = {   # train, test, batch, partitions, eval every (steps of all workers together)
    "full": dict(train=ctr_sparse.TRAIN_SAMPLES, test=ctr_sparse.TEST_SAMPLES, batch=1024, partitions=16,
                 eval_every=26),
    "quick": dict(train=6_000, test=3_000, batch=256, partitions=6, eval_every=8),
}
THRESHOLDS = (0.70, 0.75, 0.78, 0.80)
RUNS = ("reference", "async", "ssp", "async-admit2")
QUICK_DATA = f"{pathlib.Path(__file__).stem}:quick_log"   # the workers' --data under --quick (bench/ on their path)
SERVED = "served-auc.jsonl"   # in each cluster run's folder: plot it with the workers' files


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small log (6k/3k samples, batches of 256)")
    ap.add_argument("--runs", default=",".join(RUNS), help="which of " + ", ".join(RUNS))
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--staleness", type=int, default=2, help="of the ssp run")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (preset's)")
    ap.add_argument("--order-seed", type=int, default=0,
                    help="of the reference's batch order (its spread across orders is the noise floor)")
    ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)), help="AUCs to time")
    ap.add_argument("--run-dir", default=None, help="logs and metrics (default: a new temp dir)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per cluster run")
    ap.add_argument("--out", default=None, help="also write the JSON document here")
    a = ap.parse_args(argv)
    a.preset = dict(PRESETS["quick" if a.quick else "full"])
    if a.eval_every is not None:
        if a.eval_every < 1:
            ap.error(f"--eval-every must be positive, got {a.eval_every}")
        a.preset["eval_every"] = a.eval_every
    a.runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    unknown = sorted(set(a.runs) - set(RUNS))
    if unknown or not a.runs:
        ap.error(f"--runs: {', '.join(unknown) or 'none given'}; choose among {', '.join(RUNS)}")
    try:
        a.thresholds = sorted(float(t) for t in a.thresholds.split(","))
    except ValueError:
        ap.error(f"--thresholds must be numbers separated by commas, got {a.thresholds!r}")
    if a.workers < 1 or a.servers < 1 or a.staleness < 0 or a.timeout <= 0 or not 0 <= a.order_seed < 2**63:
        ap.error("--workers and --servers must be positive, --staleness >= 0, --timeout > 0, "
                 "--order-seed in [0, 2**63)")
    return a


def quick_log() -> ctr_sparse.ClickSplit:
    """The --quick preset's click log (seed 0): the workers' `--data`."""
    return ctr_sparse.click_data(PRESETS["quick"]["train"], PRESETS["quick"]["test"])


def click_log(preset: dict) -> ctr_sparse.ClickSplit:
    """The log a preset trains and evaluates on; the full preset's is the built-in one."""
    return ctr_sparse.click_data(preset["train"], preset["test"])


def source_tree() -> dict:
    """The commit measured and whether the working tree differed from it (figures from a
    dirty tree name what they measured only approximately)."""
    def git(*args):
        try:
            # --no-optional-locks: a status does not refresh the index (another git may be at work)
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=_HERE.parent, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def loadavg() -> str:
    return pathlib.Path("/proc/loadavg").read_text().strip()


def first_reaching(curve: list[dict], thresholds, key: str) -> dict:
    """`key` ("time" or "step") of the first evaluation at or above each threshold; None when
    never reached."""
    return {f"{t:g}": next((p[key] for p in curve if p["auc"] >= t), None) for t in thresholds}


# -- the reference ------------------------------------------------------------------------------
def run_reference(a) -> dict:
    p = a.preset
    ns = argparse.Namespace(train=p["train"], test=p["test"], seed=ctr_sparse.DATA_SEED, vocab=ctr_sparse.VOCAB,
                            zipf_a=ctr_sparse.ZIPF_A)
    torch.set_num_threads(1)
    torch.sparse.check_sparse_tensor_invariants.disable()
    d = ref.load(ns)
    torch.manual_seed(0)
    model = ctr_sparse.CTRSparseModel(d.num_rows)
    sparse_opt = ref.embedding_optimizer("adagrad", model.sparse_parameters(), LR)
    dense_opt = torch.optim.Adagrad(model.dense_parameters(), lr=LR, eps=EPS, initial_accumulator_value=INIT_ACC)
    steps = p["train"] // p["batch"]          # one pass; ref.batches drops the short last batch
    curve, train_s = [], 0.0
    for step, idx in zip(range(1, steps + 1), ref.batches(len(d.y_train), p["batch"], a.order_seed)):
        t = time.perf_counter()
        sparse_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(d.rows_train[idx], d.dense_train[idx]), d.y_train[idx]).backward()
        sparse_opt.step()
        dense_opt.step()
        train_s += time.perf_counter() - t
        if step % p["eval_every"] == 0 or step == steps:
            auc, logloss = ref.evaluate(model, d.rows_test, d.dense_test, d.y_test)
            curve.append({"step": step, "time": round(train_s, 2), "auc": round(auc, 4), "logloss": round(logloss, 4)})
    return {"final_auc": curve[-1]["auc"], "final_logloss": curve[-1]["logloss"], "steps": steps,
            "train_s": round(train_s, 2), "curve": curve, **d.teacher, "table_rows": d.num_rows,
            "order_seed": a.order_seed}


# -- a cluster ----------------------------------------------------------------------------------
def cluster_runs(a) -> dict:
    """name -> (job, server flags) of the cluster runs asked for."""
    async_job = JobSpec(mode="async", num_servers=a.servers, optimizer=OPTIMIZER)
    ssp_job = JobSpec(mode="ssp", staleness=a.staleness, num_servers=a.servers, optimizer=OPTIMIZER)
    runs = {"async": (async_job, ()), "ssp": (ssp_job, ()), "async-admit2": (async_job, ("--admit-after", "2"))}
    return {n: runs[n] for n in a.runs if n in runs}


def worker_argv(a, address: str, index: int, metrics: pathlib.Path) -> list[str]:
    p = a.preset
    args = ["worker", "--scheduler", address, "--model", "ctr-sparse", "--epochs", "1",
            "--partitions", str(p["partitions"]), "--batch-size", str(p["batch"]), "--seed", "0",
            "--min-workers", str(a.workers), "--metrics-out", str(metrics), "--no-progress",
            "--name", f"worker-{index}"]
    if (p["train"], p["test"]) != (ctr_sparse.TRAIN_SAMPLES, ctr_sparse.TEST_SAMPLES):
        args += ["--data", QUICK_DATA]
    return [sys.executable, "-m", "shardps.psctl", *args]


def spawn_worker(cluster, name: str, argv: list[str]) -> subprocess.Popen:
    """A worker in the cluster's process table (stopped with it), its log beside the others'.
    bench/ goes last on its path, for --data QUICK_DATA: a tree shim's entries keep precedence."""
    path = os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(_HERE))))
    with open(cluster.run_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path), process_group=0)
    cluster.procs[name] = proc
    return proc


def write_curve(path: pathlib.Path, curve: list[dict], teacher_auc: float) -> None:
    """The served model's AUC curve as metrics JSON lines ({"step", "time", "auc", "logloss"},
    the teacher's AUC on the last), for `psctl plot` beside the workers' files."""
    from shardps.worker.train import MetricsWriter
    out = MetricsWriter(str(path))
    for i, point in enumerate(curve):
        out.write(**point, **({"teacher_auc": teacher_auc} if i == len(curve) - 1 else {}))
    out.close()


def read_records(path: pathlib.Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass   # a line being written
    return out


def step_times(path: pathlib.Path) -> tuple[list[float], dict]:
    """A finished worker's step records as absolute times, and its final record. Its records'
    times count from its own start; the file's last write is its final record's, so the file's
    mtime less that record's time is that start."""
    records = read_records(path)
    final = records[-1] if records and "step" not in records[-1] else {}
    start = path.stat().st_mtime - final.get("time", 0.0)
    return [start + r["time"] for r in records if "step" in r and "loss" in r], final


def served_snapshot(address: str, steps_now, split: ctr_sparse.ClickSplit) -> tuple[float, int, dict]:
    """The served model's held-out metrics (as `evaluate_served`: an observer's reads), with
    the time and the workers' step count right after its reads: the model evaluated is no
    newer than that. (Stamped before the reads, a busy machine would date it seconds and many
    steps too early: the test ids' rows are tens of MB.) The dense parameters are read last,
    after the rows; `read_from_step` and `read_s` say over how many steps the reads spread."""
    from shardps.worker.embedding import sharded_embeddings
    from shardps.worker.train import ObservedRows, load_served

    t_begin = time.time()
    model = models.build("ctr-sparse", 0)
    reads = {}


    def fetch(ids_by_module) -> None:   # the task's evaluation calls it once, before its forward
        reads["from"] = (time.time(), steps_now())
        rows.fetch(ids_by_module)
        load_served(model, address)
        reads["to"] = (time.time(), steps_now())
    with ObservedRows(address, sharded_embeddings(model)) as rows:
        metrics = ctr_sparse.CLICK.evaluate(model, split, fetch)
    (t_from, s_from), (t_to, s_to) = reads["from"], reads["to"]
    return t_to, s_to, {**metrics, "read_from_step": s_from, "read_s": round(t_to - t_from, 2),
                        "eval_s": round(time.time() - t_begin, 2)}


def run_cluster(a, name: str, job: JobSpec, server_flags: tuple[str, ...], run_dir: pathlib.Path) -> dict:
    from shardps.psctl import ops
    from shardps.psctl.up import Cluster

    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(run_dir)
    split = click_log(a.preset)   # the evaluator's: made in main(), before the first run
    t_start = time.time()
    try:
        address = cluster.start_scheduler(job)
        for shard in range(job.num_servers):
            cluster.start_server(shard, server_flags)
        metrics = [run_dir / f"worker-{i}.jsonl" for i in range(a.workers)]
        workers = [spawn_worker(cluster, f"worker-{i}", worker_argv(a, address, i, m)) for i, m in enumerate(metrics)]
        evals, first_step, next_eval = [], None, a.preset["eval_every"]
        deadline = time.monotonic() + a.timeout

        def steps_now() -> int:
            return sum(sum(1 for r in read_records(m) if "loss" in r) for m in metrics)
        while any(w.poll() is None for w in workers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: workers still running after {a.timeout:.0f}s; logs in {run_dir}")
            steps = steps_now()
            if first_step is None and steps:
                first_step = time.time()
            if steps >= next_eval:
                evals.append(served_snapshot(address, steps_now, split))
                next_eval = (evals[-1][1] // a.preset["eval_every"] + 1) * a.preset["eval_every"]
            time.sleep(0.1)
        failed = [f"worker-{i} exited {w.returncode}" for i, w in enumerate(workers) if w.returncode != 0]
        if failed:
            raise RuntimeError(f"{name}: {', '.join(failed)}; logs in {run_dir}")
        final = served_snapshot(address, steps_now, split)[2]
        status = ops.collect_status(address, 10.0)
    finally:
        cluster.stop()
    times, finals = zip(*(step_times(m) for m in metrics))
    t0 = min(t[0] for t in times if t)    # the end of the earliest first step
    end = max(t[-1] for t in times if t)
    total = sum(len(t) for t in times)
    # an evaluation begun after the last step (workers still evaluating) is the final one's twin
    curve = [{"step": s, "time": round(at - t0, 2), "auc": e["eval_auc"], "logloss": e["eval_logloss"],
              "read_from_step": e["read_from_step"], "read_s": e["read_s"], "eval_s": e["eval_s"]}
             for at, s, e in evals if at < end]
    curve.append({"step": total, "time": round(end - t0, 2), "auc": final["eval_auc"],
                  "logloss": final["eval_logloss"]})
    write_curve(run_dir / SERVED, curve, final["teacher_auc"])
    tables = [s.get("tables", {}).get(ctr_sparse.TABLE, {}) for s in status["servers"]]
    return {"final_auc": final["eval_auc"], "final_logloss": final["eval_logloss"], "steps": total,
            "train_s": round(end - t0, 2), "wall_s": round(time.time() - t_start, 2),
            "first_step_after_s": round((first_step or t0) - t_start, 2), "curve": curve,
            "mode": job.mode, "staleness": job.staleness, "server_flags": list(server_flags),
            "worker_final_auc": [f.get("eval_auc") for f in finals],
            "teacher_auc": final["teacher_auc"], "teacher_logloss": final["teacher_logloss"],
            "rows": sum(t.get("rows", 0) for t in tables), "table_bytes": sum(t.get("bytes", 0) for t in tables),
            "admitted": sum(t.get("admitted", 0) for t in tables),
            "dropped_gradients": sum(t.get("dropped_gradients", 0) for t in tables),
            "unadmitted_lookups": sum(t.get("unadmitted_lookups", 0) for t in tables),
            "run_dir": str(run_dir)}


# -- the report ---------------------------------------------------------------------------------
GOAL_AUC = 0.005


def goals(runs: dict) -> dict:
    """Issue 13's lines: each cluster's AUC within 0.005 of the reference's; admission (N = 2)
    within 0.005 of async with fewer rows stored."""
    out = {}
    if "reference" in runs:
        for name in ("async", "ssp"):
            if name in runs:
                gap = round(runs["reference"]["final_auc"] - runs[name]["final_auc"], 4)
                out[f"{name}_vs_reference"] = {"auc_below_reference": gap, "met": gap <= GOAL_AUC}
    if "async" in runs and "async-admit2" in runs:
        base, adm = runs["async"], runs["async-admit2"]
        loss = round(base["final_auc"] - adm["final_auc"], 4)
        out["admission_vs_async"] = {"auc_lost": loss, "rows": adm["rows"], "rows_async": base["rows"],
                                     "rows_fraction": round(adm["rows"] / max(base["rows"], 1), 4),
                                     "met": loss <= GOAL_AUC and adm["rows"] < base["rows"]}
    return out


def table(doc: dict) -> str:
    """The time-to-AUC table, markdown: seconds (and steps of all workers) to each AUC."""
    ths = [f"{t:g}" for t in doc["thresholds"]]
    lines = ["| run | final AUC | log loss | " + " | ".join(f"s (steps) to {t}" for t in ths) +
             " | train s | steps | rows stored |",
             "|---" * (6 + len(ths)) + "|"]
    for name, r in doc["runs"].items():
        cells = ["-" if r["time_to_auc"][t] is None else f"{r['time_to_auc'][t]:.1f} ({r['steps_to_auc'][t]})"
                 for t in ths]
        rows = r.get("rows", "-")   # the reference's table has a row for every id of the log
        lines.append(f"| {name} | {r['final_auc']:.4f} | {r['final_logloss']:.4f} | " + " | ".join(cells) +
                     f" | {r['train_s']:.1f} | {r['steps']} | {rows} |")
    lines.append(f"| teacher | {doc['teacher_auc']:.4f} | {doc['teacher_logloss']:.4f} |" + " |" * (len(ths) + 3))
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    p = a.preset
    run_dir = pathlib.Path(a.run_dir or tempfile.mkdtemp(prefix="ctr-sparse-auc-"))
    doc = {"preset": "quick" if a.quick else "full", **p, "workers": a.workers, "servers": a.servers,
           "ssp_staleness": a.staleness, "optimizer": {"kind": "adagrad", "lr": LR, "initial_accumulator": INIT_ACC,
                                                       "eps": EPS},
           "thresholds": a.thresholds, **source_tree(), "loadavg_start": loadavg(), "run_dir": str(run_dir), "runs": {}}
    if set(a.runs) - {"reference"}:
        click_log(p)   # the evaluator's log, made now: not in a run's first point
    t0 = time.time()
    for name in a.runs:
        print(f"ctr_sparse_auc: {name} (load {loadavg()})", file=sys.stderr, flush=True)
        if name == "reference":
            r = run_reference(a)
        else:
            job, flags = cluster_runs(a)[name]
            r = run_cluster(a, name, job, flags, run_dir / name)
        r["time_to_auc"] = first_reaching(r["curve"], a.thresholds, "time")
        r["steps_to_auc"] = first_reaching(r["curve"], a.thresholds, "step")
        doc["runs"][name] = r
        doc["teacher_auc"], doc["teacher_logloss"] = r["teacher_auc"], r["teacher_logloss"]
        print(f"ctr_sparse_auc: {name}: AUC {r['final_auc']:.4f} in {r['train_s']:.1f} s", file=sys.stderr,
              flush=True)
    doc.update(goals=goals(doc["runs"]), loadavg_end=loadavg(), total_s=round(time.time() - t0, 1))
    text = json.dumps(doc, indent=1)
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(text + "\n")
    print(table(doc), file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
