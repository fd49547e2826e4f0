"""Convergence by consistency model: sync, async and ssp, with and without a straggler.

digits-mlp (64-128-10, the peers' digits model and split), W workers (default 4), plain SGD
lr 0.1 on the servers, batch 32, each worker a fixed number of steps. For every mode, with
and without a straggler (worker 0 sleeps a fixed time per step, chosen so its step takes
about --straggler-factor times a normal one), and every seed: the wall time to reach the
target held-out accuracy (default 0.95), the final accuracy, the staleness the servers saw
and the time pulls waited at the consistency gate (both from the servers' histograms in
`psctl status --json`'s form, psctl.ops.collect_status).

Processes: a real `psctl scheduler` and S `psctl server` processes (psctl.up.Cluster), and W
worker processes (multiprocessing spawn) running the built-in training loop of `psctl
worker` (worker.train.Loop over PSClient, with its --step-delay straggler and its JSON-lines
metrics). Why not `psctl up` as a whole: its workers start training as soon as each one has
connected, and on a loaded 2-core host the last one connects seconds after the first, so
early sync steps complete with 1-3 workers and the first seconds of every mode run with
fewer workers. Here every worker connects (join, declare, first pull) and then waits at a
barrier; t = 0 is the barrier's release, just before every worker's first step.

Accuracy over time: this process attaches read-only (ShardClient.attach(), observer pulls
that skip the consistency gate and count in no statistic but pull traffic), pulls the
served parameters every --eval-interval seconds and evaluates them on the 450 held-out
samples, recording [t, server version, accuracy]. Time to target = t of the first evaluation
at or above the target (resolution: the interval).

All data crosses shardps's gRPC path; the multiprocessing queue, event and barrier only
coordinate the benchmark's processes.

    python bench/convergence.py --seeds 0 --modes async --steps 100 --out-dir /tmp/conv
    python bench/convergence.py --render bench/results/convergence.jsonl --out-dir bench/results
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import signal
import statistics
import sys
import tempfile
import time
import multiprocessing as mp
from collections import defaultdict

# Run as a script, sys.path[0] is bench/; the repository root makes the packages importable
# (spawned children inherit this sys.path).
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))

MODEL = "digits-mlp"
T_ORIGIN = ("barrier release: every worker has joined, declared and pulled; t=0 just before every "
            "worker's first step")


# -- shared helpers (also used by codec_convergence.py) -------------------------------------------
def hist_merge(hists: list[dict]) -> dict:
    """Several servers' histogram dicts (pscommon.stats.histogram_dict) as one: total, mean, max."""
    total = sum(h["total"] for h in hists)
    return {"total": total, "mean": sum(h["mean"] * h["total"] for h in hists) / total if total else 0.0,
            "max": max((h["max"] for h in hists), default=0.0)}


def traffic_ratio(servers: list[dict], kind: str) -> float | None:
    """Logical fp32 bytes over wire payload bytes, summed over servers (kind: push or pull)."""
    logical = sum(s[f"{kind}_traffic"]["logical_bytes"] for s in servers)
    wire = sum(s[f"{kind}_traffic"]["wire_bytes"] for s in servers)
    return round(logical / wire, 3) if wire else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def step_times(path: pathlib.Path) -> list[float]:
    """Seconds between consecutive step records of a worker's metrics file."""
    try:
        times = [r["time"] for r in map(json.loads, path.read_text().splitlines()) if "step" in r and "clock" in r]
    except (OSError, ValueError):
        return []
    return [b - a for a, b in zip(times, times[1:])]


# -- worker process -------------------------------------------------------------------------------
def worker_main(i: int, spec: dict, scheduler: str, q, declared, barrier) -> None:
    import ctypes
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the launcher
    import threading
    import torch
    from shardps.worker import data, models
    from shardps.worker.api import PSClient
    from shardps.worker.train import Loop, MetricsWriter, TrainConfig

    try:
        cfg = TrainConfig(scheduler=scheduler, model=MODEL, steps=spec["steps"], batch_size=32,
                          seed=spec["seed"], device="cpu", metrics_out=spec["metrics"][i],
                          step_delay_s=spec["delay"] if i == 0 else 0.0, progress=False,
                          name=f"convergence-{i}")
        torch.set_num_threads(1)  # as `psctl worker`: the host's cores are shared
        model = models.build(MODEL, cfg.seed)
        split = models.entry(MODEL).dataset()
        # worker 0 creates the keys; the others declare the same model afterwards, which keeps
        # the values (declare is idempotent; the order keeps the benchmark off its races)
        if i > 0:
            declared.wait(spec["timeout"])
        with PSClient.connect(scheduler, model, name=cfg.name) as ps:  # join, declare, pull
            if i == 0:
                declared.set()
            metrics = MetricsWriter(cfg.metrics_out)
            loop = Loop(cfg, ps, model, torch.device("cpu"), split, metrics, threading.Event())
            q.put(("ready", i, None))
            barrier.wait(spec["timeout"])
            t_start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
            loop.run_steps()
            t_end = time.perf_counter()
            ps.pull()
            acc = data.accuracy(model, split.x_test, split.y_test)
            metrics.write(worker=ps.worker_id, steps=loop.done, skipped=loop.skipped, eval_accuracy=round(acc, 4))
            metrics.close()
            q.put(("done", i, {"worker_id": ps.worker_id, "steps": loop.done, "skipped": loop.skipped,
                               "t_start": t_start, "t_end": t_end, "eval_accuracy": round(acc, 4),
                               "final_loss": round(loop.loss, 5)}))
    except BaseException as exc:  # the launcher reports it instead of waiting out its timeout
        q.put(("error", i, f"{type(exc).__name__}: {exc}"))
        raise


# -- the live evaluator (this process) -------------------------------------------------------------
class Evaluator:
    """Held-out accuracy of the served parameters, read-only (observer pulls skip the gate)."""

    def __init__(self, scheduler: str, timeout: float):
        import numpy as np
        import torch
        from shardps.worker import models
        from shardps.worker.client import ClientConfig, ShardClient
        from shardps.pscommon.errors import PSError

        torch.set_num_threads(1)
        self.model = models.build(MODEL)
        self.split = models.entry(MODEL).dataset()
        # short retries: at the end the servers go away and a pull must fail fast
        self.client = ShardClient(ClientConfig(scheduler=scheduler, name="convergence-eval",
                                               retry_deadline_s=2.0, connect_timeout_s=timeout))
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.attach()
                break
            except PSError:  # no model declared yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.flat = {n: np.empty(p.numel(), np.float32) for n, p in self.model.named_parameters()}

    def __call__(self) -> tuple[int, float]:
        """(server version, accuracy) now. With several shards, the version is the smallest."""
        import torch
        from shardps.worker import data
        self.client.pull(self.flat)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(torch.from_numpy(self.flat[n]).view(p.shape))
        return min(self.client.shard_versions().values()), data.accuracy(self.model, self.split.x_test,
                                                                       self.split.y_test)

    def close(self) -> None:
        self.client.leave()


# -- one run ---------------------------------------------------------------------------------------
def run_one(a, mode: str, seed: int, delay: float, run_dir: pathlib.Path, steps: int | None = None) -> dict:
    """One cluster, W workers, `steps` steps each; the live accuracy curve and server statistics."""
    import queue
    from shardps.pscommon.config import CodecConfig, JobSpec, OptimizerConfig
    from shardps.psctl import ops
    from shardps.psctl.up import Cluster

    steps = steps or a.steps
    W = a.workers
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("*"):  # a rerun into the same folder starts clean
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    metrics = [str(run_dir / f"worker-{i}.jsonl") for i in range(W)]
    spec = {"steps": steps, "seed": seed, "delay": delay, "metrics": metrics, "timeout": a.timeout}
    deadline = time.monotonic() + a.timeout
    cluster = Cluster(run_dir)
    ctx = mp.get_context("spawn")  # never fork: this process imports grpc
    q, declared, barrier = ctx.Queue(), ctx.Event(), ctx.Barrier(W + 1)  # + this process
    procs, ok, evaluator = [], False, None
    t_launch = time.perf_counter()
    try:
        job = JobSpec(mode=mode, staleness=a.staleness if mode == "ssp" else 0,
                      optimizer=OptimizerConfig(kind="sgd", lr=a.lr), push_codec=CodecConfig("fp32"),
                      pull_codec=CodecConfig("fp32"), num_servers=a.servers)
        scheduler = cluster.start_scheduler(job)
        for s in range(a.servers):
            cluster.start_server(s)
        procs = [ctx.Process(target=worker_main, args=(i, spec, scheduler, q, declared, barrier), daemon=True)
                 for i in range(W)]
        for p in procs:
            p.start()
        evaluator = Evaluator(scheduler, a.timeout)
        ready = set()
        while len(ready) < W:  # every worker at the barrier; give up when one died on the way
            try:
                kind, i, v = q.get(timeout=1.0)
            except queue.Empty:
                _check_alive(q, procs, cluster, deadline)
                continue
            if kind == "error":
                raise RuntimeError(f"worker {i}: {v}")
            ready.add(i)
        barrier.wait(a.timeout)
        t0 = time.perf_counter()
        curve, done, next_eval = [], {}, t0
        while len(done) < W:
            now = time.perf_counter()
            if now >= next_eval:
                version, acc = evaluator()
                curve.append([round(time.perf_counter() - t0, 3), version, round(acc, 4)])
                next_eval += a.eval_interval
                continue
            try:
                kind, i, v = q.get(timeout=max(0.001, next_eval - now))
            except queue.Empty:
                _check_alive(q, procs, cluster, deadline)
                continue
            if kind == "error":
                raise RuntimeError(f"worker {i}: {v}")
            done[i] = v
        version, acc = evaluator()  # every worker has finished: the final parameters
        curve.append([round(time.perf_counter() - t0, 3), version, round(acc, 4)])
        status = ops.collect_status(scheduler, 30.0)
        step_s = [median(step_times(pathlib.Path(m))) for m in metrics]  # before the logs go
        ok = True
    finally:
        if evaluator is not None:
            evaluator.close()
        for p in procs:
            p.join(timeout=10 if ok else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()  # by pid, only this launcher's own children
                p.join()
        cluster.stop(grace_s=5.0)
        if ok and not a.keep_logs:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif not ok:
            print(f"convergence: logs kept in {run_dir}", file=sys.stderr)

    servers = [s for s in status["servers"] if "keys" in s]
    stale, wait = hist_merge([s["staleness"] for s in servers]), hist_merge([s["pull_wait_s"] for s in servers])
    hit = next(((t, v) for t, v, acc in curve if acc >= a.target), None)
    ws = [done[i] for i in range(W)]
    others = median(step_s[1:]) if W > 1 else None
    return dict(
        mode=mode, staleness_bound=a.staleness if mode == "ssp" else None, seed=seed, workers=W,
        servers=a.servers, steps=steps, lr=a.lr, target=a.target, straggler=delay > 0,
        straggler_delay_s=round(delay, 5), reached=hit is not None,
        time_to_target_s=hit[0] if hit else None, updates_to_target=hit[1] if hit else None,
        final_accuracy=curve[-1][2], worker_eval_accuracy=[w["eval_accuracy"] for w in ws],
        train_s=round(max(w["t_end"] for w in ws) - t0, 3), startup_s=round(t0 - t_launch, 3),
        version=min(s["version"] for s in servers), pushes=sum(s["pushes"] for s in servers),
        steps_done=[w["steps"] for w in ws], skipped=[w["skipped"] for w in ws],
        staleness_mean=round(stale["mean"], 3), staleness_max=stale["max"], staleness_n=stale["total"],
        pull_wait_mean_s=round(wait["mean"], 5), pull_wait_max_s=round(wait["max"], 5), pull_wait_n=wait["total"],
        step_s=[round(s, 5) if s is not None else None for s in step_s],
        straggler_ratio=round(step_s[0] / others, 2) if delay > 0 and others and step_s[0] else None,
        eval_interval_s=a.eval_interval, t_origin=T_ORIGIN, curve=curve)


def _check_alive(q, procs, cluster, deadline: float) -> None:
    dead = [p for p in procs if p.exitcode not in (None, 0)]
    if dead:
        try:
            kind, i, v = q.get_nowait()
            if kind == "error":
                raise RuntimeError(f"worker {i}: {v}")
        except Exception as exc:
            if isinstance(exc, RuntimeError):
                raise
        raise RuntimeError(f"worker process exited with code {dead[0].exitcode}")
    gone = [(name, p.returncode) for name, p in cluster.procs.items() if p.poll() is not None]
    if gone:
        raise RuntimeError(f"{gone[0][0]} exited with code {gone[0][1]}")
    if time.monotonic() > deadline:
        raise TimeoutError("run timed out")


def calibrate(a, run_root: pathlib.Path) -> tuple[float, float]:
    """A short async run without a straggler: (median normal step s, delay s that makes worker
    0's step about --straggler-factor times as long)."""
    r = run_one(a, "async", a.seeds[0], 0.0, run_root / "calibration", steps=a.calibration_steps)
    normal = median(r["step_s"])
    return normal, (a.straggler_factor - 1.0) * normal


# -- rendering -------------------------------------------------------------------------------------
def render_table(runs: list[dict]) -> str:
    inf = math.inf
    groups = defaultdict(list)
    for r in runs:
        groups[(r["straggler"], r["mode"])].append(r)
    sec = lambda x: "-" if x is None or x == inf else f"{x:.2f}"
    rng = lambda xs, f: f"{f(min(xs))}-{f(max(xs))}" if xs else "-"
    r0 = runs[0]
    delays = sorted({r["straggler_delay_s"] for r in runs if r["straggler"]})
    cal = median([r.get("calibration_step_s") for r in runs if r["straggler"]])
    fac = median([r.get("straggler_factor") for r in runs if r["straggler"]])
    out = ["# Convergence by consistency model\n",
           f"digits-mlp, {r0['workers']} workers, {r0['servers']} server(s), SGD lr {r0['lr']:g} on the servers, batch 32, "
           f"{r0['steps']} steps per worker; target held-out accuracy {r0['target']}. Median over {len({r['seed'] for r in runs})} "
           "seed(s) (a run that missed the target counts as infinitely slow; [min-max] over the runs that reached it). "
           f"t = 0: {T_ORIGIN}. Accuracy of the served parameters every {r0['eval_interval_s']} s (read-only pulls). "
           "Straggler: worker 0 sleeps " + (", ".join(f"{d * 1000:.1f}" for d in delays) or "-") + " ms per step"
           + (f" ((factor - 1) x the median step of a {r0['workers']}-worker async calibration run, "
              f"{cal * 1000:.1f} ms" + (f", factor {fac:g})" if fac else ")") if cal else " (given)") + ".\n",
           "| straggler | mode | reached | time to target s [min-max] | updates to target | final acc [min-max] "
           "| train s | staleness mean / max | pull wait ms mean / max | step ms (w0 / others) | skipped |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"sync": 0, "ssp": 1, "async": 2}
    for key in sorted(groups, key=lambda k: (k[0], order.get(k[1], 9), k[1])):
        rs = groups[key]
        hit = [r for r in rs if r["reached"]]
        t = median([r["time_to_target_s"] if r["reached"] else inf for r in rs])
        u = median([r["updates_to_target"] if r["reached"] else inf for r in rs])
        fa = [r["final_accuracy"] for r in rs]
        mode = rs[0]["mode"] + (f"({rs[0]['staleness_bound']})" if rs[0]["mode"] == "ssp" else "")
        w0 = median([r["step_s"][0] for r in rs])
        oth = median([median(r["step_s"][1:]) for r in rs])
        ms = lambda x: "-" if x is None else f"{x * 1000:.1f}"
        out.append(
            f"| {'yes' if key[0] else 'no'} | {mode} | {len(hit)}/{len(rs)} | **{sec(t)}** "
            f"[{rng([r['time_to_target_s'] for r in hit], sec)}] | {'-' if u in (None, inf) else f'{u:.0f}'} "
            f"| {median(fa):.3f} [{min(fa):.3f}-{max(fa):.3f}] | {median([r['train_s'] for r in rs]):.1f} "
            f"| {median([r['staleness_mean'] for r in rs]):.2f} / {max(r['staleness_max'] for r in rs):.0f} "
            f"| {median([r['pull_wait_mean_s'] * 1000 for r in rs]):.2f} / {max(r['pull_wait_max_s'] for r in rs) * 1000:.0f} "
            f"| {ms(w0)} / {ms(oth)} | {median([sum(r['skipped']) for r in rs]):.0f} |")
    out += ["\nColumns: updates to target = the servers' version (updates applied; in sync one update = the "
            "average of every worker's gradient for that step) at that evaluation; train s = t at which the last "
            "worker finished its steps; staleness = version at apply minus the version the gradient was computed on "
            "(servers' histogram; sync applies on complete steps and records none); pull wait = time pulls waited at "
            "the consistency gate (servers' histogram; async pulls never wait and record none); step ms = median "
            "time between a worker's consecutive steps; skipped = sync steps completed without a worker (its push "
            "was refused and it pulled again), summed over workers."]
    return "\n".join(out)


def render_plot(runs: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sync": "tab:red", "ssp": "tab:orange", "async": "tab:blue"}
    panels = [False, True]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, straggler in zip(axes, panels):
        by_mode = defaultdict(list)
        for r in runs:
            if r["straggler"] == straggler:
                by_mode[r["mode"]].append(r)
        for mode, rs in sorted(by_mode.items()):
            color = colors.get(mode, None)
            for r in rs:  # each seed, thin
                ts, accs = [c[0] for c in r["curve"]], [c[2] for c in r["curve"]]
                ax.step(ts, accs, where="post", color=color, alpha=0.25, linewidth=0.8)
            # the median over seeds on a common grid (accuracy held between evaluations)
            end = max(r["curve"][-1][0] for r in rs)
            grid = [i * end / 400 for i in range(401)]
            def at(r, t):
                acc = r["curve"][0][2]
                for c in r["curve"]:
                    if c[0] > t:
                        break
                    acc = c[2]
                return acc
            med = [statistics.median(at(r, t) for r in rs) for t in grid]
            label = mode + (f"({rs[0]['staleness_bound']})" if mode == "ssp" else "")
            ax.plot(grid, med, color=color, linewidth=2, label=f"{label} (median of {len(rs)})")
        ax.axhline(runs[0]["target"], color="gray", linestyle="--", linewidth=1)
        ax.set_title("worker 0 straggling" if straggler else "no straggler")
        ax.set_xlabel("wall time since all workers started (s)")
        ax.grid(alpha=0.3)
        if by_mode:
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "no runs", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("held-out accuracy of the served parameters")
    axes[0].set_ylim(0.0, 1.0)
    fig.suptitle(f"digits-mlp, {runs[0]['workers']} workers: accuracy vs wall time by consistency mode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(runs: list[dict], out_dir: pathlib.Path) -> None:
    md = render_table(runs)
    (out_dir / "CONVERGENCE.md").write_text(md + "\n\n![accuracy vs wall time](convergence.png)\n")
    render_plot(runs, out_dir / "convergence.png")
    print(md)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", choices=["sync", "async", "ssp"], default=["sync", "ssp", "async"])
    ap.add_argument("--staleness", type=int, default=2, help="ssp bound in clocks")
    ap.add_argument("--steps", type=int, default=800, help="steps per worker")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--straggler", choices=["both", "no", "yes"], default="both",
                    help="runs without and/or with worker 0 slowed")
    ap.add_argument("--straggler-factor", type=float, default=3.0,
                    help="worker 0's step time over a normal one (delay from a calibration run)")
    ap.add_argument("--straggler-delay", type=float, default=None,
                    help="seconds of sleep per straggler step (skips the calibration)")
    ap.add_argument("--calibration-steps", type=int, default=100)
    ap.add_argument("--eval-interval", type=float, default=0.25, help="seconds between accuracy probes")
    ap.add_argument("--reps", type=int, default=1, help="runs per (seed, mode, straggler)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--json-out", default=None, help="JSON lines, one per run (default OUT_DIR/convergence.jsonl)")
    ap.add_argument("--append", action="store_true", help="keep earlier lines of --json-out")
    ap.add_argument("--keep-logs", action="store_true", help="keep each run's daemon logs under OUT_DIR/runs")
    ap.add_argument("--render", nargs="+", metavar="JSONL", help="only render these files into OUT_DIR")
    a = ap.parse_args(argv)
    if a.workers < 2 and a.straggler != "no":
        ap.error("a straggler run needs --workers >= 2")
    return a


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends TERM: run the cleanup
    a = parse(argv)
    out_dir = pathlib.Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.render:
        render([json.loads(l) for p in a.render for l in open(p) if l.startswith("{")], out_dir)
        return 0
    json_out = pathlib.Path(a.json_out or out_dir / "convergence.jsonl")
    if not a.append:
        json_out.write_text("")
    run_root = out_dir / "runs" if a.keep_logs else pathlib.Path(tempfile.mkdtemp(prefix="shardps-convergence-"))
    stragglers = {"both": [False, True], "no": [False], "yes": [True]}[a.straggler]
    delay, normal = a.straggler_delay, None
    if True in stragglers and delay is None:
        normal, delay = calibrate(a, run_root)
        print(f"calibration: normal step {normal * 1000:.1f} ms -> straggler delay {delay * 1000:.1f} ms",
              file=sys.stderr)
    failures = 0
    for seed in a.seeds:
        for rep in range(a.reps):
            for straggler in stragglers:
                for mode in a.modes:
                    name = f"{mode}-{'straggler' if straggler else 'even'}-s{seed}-r{rep}"
                    t = time.monotonic()
                    try:
                        r = run_one(a, mode, seed, delay if straggler else 0.0, run_root / name)
                    except Exception as exc:  # one failed run must not lose the others
                        failures += 1
                        print(f"FAIL {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    r.update(rep=rep, calibration_step_s=normal,
                             straggler_factor=a.straggler_factor if normal is not None else None)
                    with open(json_out, "a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(f"ok   {name}: {time.monotonic() - t:.0f}s, reached {r['reached']} at "
                          f"{r['time_to_target_s']}s, final {r['final_accuracy']}", file=sys.stderr)
    if not a.keep_logs and not failures:
        shutil.rmtree(run_root, ignore_errors=True)
    runs = [json.loads(l) for l in open(json_out) if l.startswith("{")]
    if runs:
        render(runs, out_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
