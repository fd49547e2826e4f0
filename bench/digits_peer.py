"""The "digits" time-to-accuracy workload of bench/peers/README.md, run on shardps.

Same data split, model, seeds, learning rate, batch, batch generators, evaluation cadence,
stop rule and JSON fields as the peers' digits_single.py and torch_rpc_digits.py, so one
table holds all of them (`--table`). What is shardps here: a real `psctl scheduler`
(`--mode async --optimizer sgd --lr 0.1`, fp32 both ways) and one real `psctl server`, which
applies p -= 0.1 * g to each push on arrival, pushes serialized by the shard's lock; and W
trainer processes (multiprocessing spawn), each driving a ShardClient:
pull all 4 tensors -> mean cross-entropy gradient on 32 samples drawn with
torch.randint(1347, (32,), generator=g), g seeded seed*1000+r -> push the 4 gradients.
All parameters and gradients cross shardps's gRPC path; the multiprocessing queue, events,
barrier and shared doubles only coordinate the benchmark's own processes (who declares
first, when to start, when to stop, the time of update 1).

The one deviation, recorded per run in `eval_method`: the peer server evaluates inline,
under its lock, right after update n (n % 25 == 0, or n == 3000, or t >= 120 s). A shardps
server does not evaluate, so here the trainer whose push was applied as update n (its
PushReply says shard_version == n) evaluates the parameters of its very next pull, which it
makes anyway, and sets the shared stop flag when the stop rule holds. With W = 1 that pull
returns exactly the parameters after update n (nothing else pushes), so the run replays the
single-process reference update for update. With W >= 2 other trainers keep pushing
meanwhile (the peer's lock would hold them off), so the evaluated parameters are those of
version n + j; j is recorded per evaluation (`eval_versions`, `eval_lag_mean/max`).
Times: t = (time the push of update n was acknowledged) - (time update 1 was
acknowledged), CLOCK_MONOTONIC, comparable across processes. Pushes applied after the stop
update are counted as `ignored_pushes` (shardps applies them; the result ignores them).

By default each push carries the next step's pull (PushPullBatch: one round trip a step);
`--no-fuse` pulls in a call of its own (impl `shardps[no-fuse]`). `--compare ROUNDS` runs, in
one invocation and interleaved so that both see the same machine load, shardps without and
with fusion and the torch_rpc_digits[uv] peer (bench/peers/torch_rpc_digits.py), for each of
`--seeds`, ROUNDS times, printing every run's JSON line and then each one's medians.

    python bench/digits_peer.py --workers 2 --seed 0 --json
    python bench/digits_peer.py --workers 3 --compare 3 --seeds 0 1 2 --out runs.jsonl
    python bench/digits_peer.py --table results/digits_results.jsonl > DIGITS.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import multiprocessing as mp
from collections import defaultdict

# Run as a script, sys.path[0] is bench/; the repository root makes the packages importable
# (spawned children inherit this sys.path).
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))

# The workload, as bench/peers/README.md (section digits) defines it.
LR, BATCH, EVAL_EVERY = 0.1, 32, 25
MAX_UPDATES, MAX_SECONDS = 3000, 120.0
N_TRAIN = 1347

EVAL_METHOD = ("trainer_next_pull: the trainer whose push was applied as update n (n % 25 == 0, "
               "n >= 3000 or t >= 120 s; n from PushReply.shard_version) evaluates the parameters of "
               "its next pull (version n+j, j = pushes by other trainers meanwhile: eval_versions) and "
               "raises the shared stop flag; not under the server's lock, other trainers keep pushing "
               "during the evaluation; t = push acknowledged (monotonic clock) minus update 1 acknowledged")


def lo_tx_bytes() -> int:
    """Bytes sent over loopback so far (with the logical volume: did the data cross TCP)."""
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    return 0


def peak_rss_mb(pid: int | None = None) -> float:
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stop_rule(n: int, t: float, acc: float | None, target: float) -> str | None:
    """The peer Tracker's order: target first, then the update cap, then the time cap."""
    if acc is not None and acc >= target:
        return "target"
    if n >= MAX_UPDATES:
        return "max_updates"
    if t >= MAX_SECONDS:
        return "max_seconds"
    return None


# -- trainer process ---------------------------------------------------------------------------
def trainer_main(r: int, a, scheduler: str, q, declared, barrier, stop, t0) -> None:
    import ctypes
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the launcher
    import torch
    import torch.nn.functional as F
    from shardps.worker import data, models
    from shardps.worker.client import ClientConfig, ShardClient

    torch.set_num_threads(1)  # as every peer process: 2 cores shared by 1 + W processes
    split = data.digits()
    xtr, ytr, xte, yte = split.x_train, split.y_train, split.x_test, split.y_test
    assert len(xtr) == N_TRAIN and len(xte) == 450, (len(xtr), len(xte))
    model = models.build("digits-mlp", a.seed)  # torch.manual_seed(seed) + default init, as the peer
    params = dict(model.named_parameters())
    client = ShardClient(ClientConfig(scheduler=scheduler, name=f"digits-{r}", fuse=not a.no_fuse))
    try:
        client.join()
        client.wait_for_servers()
        # trainer 0 creates the keys with its initial values; the others declare the same
        # model afterwards, which keeps the values (declare is idempotent)
        if r > 0:
            declared.wait(a.timeout)
        flat = {n: p.detach().reshape(-1).numpy().copy() for n, p in params.items()}
        client.declare(flat)
        if r == 0:
            declared.set()
        gen = torch.Generator().manual_seed(a.seed * 1000 + r)
        views = {n: torch.from_numpy(flat[n]).view(p.shape) for n, p in params.items()}
        pulls = pushes = 0
        applied = []      # (n, staleness) of every push of this trainer
        curve = []        # [t_abs, n, accuracy, version evaluated]
        pending = None    # (n, t_abs): evaluate on the next pull
        barrier.wait(a.timeout)  # all trainers start together, as the peer's
        while not stop.is_set():
            client.pull(flat)  # the 4 tensors, fp32; the header carries the shard version
            pulls += 1
            version = client.shard_versions()[0]
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(views[n])
            if pending is not None:
                n, t_abs = pending
                pending = None
                with torch.no_grad():
                    acc = int((model(xte).argmax(1) == yte).sum()) / len(yte)
                curve.append([t_abs, n, acc, version])
                if stop_rule(n, t_abs - t0.value if t0.value else 0.0, acc, a.target):
                    stop.set()
                    break
            idx = torch.randint(N_TRAIN, (BATCH,), generator=gen)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            grads = {n: p.grad.reshape(-1).numpy() for n, p in params.items()}
            reply = client.push(grads)[0]  # one shard
            t_abs = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
            pushes += 1
            n = reply.shard_version  # this push was applied as update n (applies are serialized)
            applied.append((n, reply.staleness))
            if n == 1:
                t0.value = t_abs
            t = t_abs - t0.value if t0.value else 0.0
            if n % EVAL_EVERY == 0 or n >= MAX_UPDATES or t >= MAX_SECONDS:
                pending = (n, t_abs)
        # fused: our last push's reply held a pull the server counted; take it, so that the
        # server's pulls and ours agree (updates_ok) whichever way the loop ended
        client.pull(flat)
        pulls += 1
        q.put(("trainer", r, {"pulls": pulls, "pushes": pushes, "applied": applied, "curve": curve,
                              "rss_mb": peak_rss_mb()}))
    except BaseException as exc:  # the launcher reports it instead of waiting out its timeout
        q.put(("error", r, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        client.leave()


# -- launcher ----------------------------------------------------------------------------------
def gather(q, kind: str, n: int, deadline: float, procs, cluster) -> list:
    import queue
    out = {}
    while len(out) < n:
        try:
            k, i, v = q.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"trainer exited with code {dead[0].exitcode}")
            gone = [(name, p.returncode) for name, p in cluster.procs.items() if p.poll() is not None]
            if gone:
                raise RuntimeError(f"{gone[0][0]} exited with code {gone[0][1]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {kind} ({len(out)} of {n})")
            continue
        if k == "error":
            raise RuntimeError(f"trainer {i}: {v}")
        out[i] = v
    return [out[i] for i in sorted(out)]


def run(a) -> dict:
    import torch
    from shardps.pscommon.config import CodecConfig, JobSpec, OptimizerConfig
    from shardps.psctl import ops
    from shardps.psctl.up import Cluster

    W = a.workers
    deadline = time.monotonic() + a.timeout
    run_dir = pathlib.Path(a.run_dir or tempfile.mkdtemp(prefix="shardps-digits-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(run_dir)
    ctx = mp.get_context("spawn")  # never fork: this process imports grpc
    q, declared, barrier, stop = ctx.Queue(), ctx.Event(), ctx.Barrier(W), ctx.Event()
    t0 = ctx.Value("d", 0.0, lock=False)  # written once, by the trainer whose push is update 1
    procs, ok = [], False
    lo0, t_launch = lo_tx_bytes(), time.perf_counter()
    try:
        job = JobSpec(mode="async", optimizer=OptimizerConfig(kind="sgd", lr=LR),
                      push_codec=CodecConfig("fp32"), pull_codec=CodecConfig("fp32"), num_servers=1)
        scheduler = cluster.start_scheduler(job)
        cluster.start_server(0)
        procs = [ctx.Process(target=trainer_main, args=(r, a, scheduler, q, declared, barrier, stop, t0),
                             daemon=True) for r in range(W)]
        for p in procs:
            p.start()
        ts = gather(q, "trainer", W, deadline, procs, cluster)
        lo = lo_tx_bytes() - lo0
        status = ops.collect_status(scheduler, 30.0)
        server = next(s for s in status["servers"] if s["shard"] == 0)
        server_rss = peak_rss_mb(cluster.procs["server-0"].pid)
        ok = True
    finally:
        for p in procs:
            p.join(timeout=10 if ok else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()  # by pid, only this launcher's own children
                p.join()
        cluster.stop(grace_s=5.0)
        if ok and not a.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif not ok:
            print(f"digits_peer: logs kept in {run_dir}", file=sys.stderr)

    # The evaluations, in update order, up to the first one at which the stop rule held.
    # Trainers evaluate concurrently, so one with a larger n may have finished after the stop
    # update's evaluation raised the flag: those are not part of the run.
    t_first = t0.value
    evals = sorted((c for t in ts for c in t["curve"]), key=lambda c: c[1])
    curve, why = [], None
    for t_abs, n, acc, version in evals:
        t = t_abs - t_first
        curve.append((t, n, acc, version))
        why = stop_rule(n, t, acc, a.target)
        if why:
            break
    n_stop = curve[-1][1] if curve else 0
    hit = next(((t, n) for t, n, acc, _ in curve if acc >= a.target), None)
    t_last = curve[-1][0] if curve else 0.0
    accs = [round(c[2], 4) for c in curve]  # as the peers' Tracker records them
    pulls, pushes = sum(t["pulls"] for t in ts), sum(t["pushes"] for t in ts)
    kept = [[(n, s) for n, s in t["applied"] if n <= n_stop] for t in ts]
    stale = [s for k in kept for _, s in k]
    lags = [version - n for _, n, _, version in curve]
    params = 9610
    return dict(
        impl="shardps[no-fuse]" if a.no_fuse else "shardps", workers=W, seed=a.seed, target=a.target, reached=hit is not None,
        time_to_target_s=round(hit[0], 4) if hit else None,
        updates_to_target=hit[1] if hit else None,
        final_accuracy=round(accs[-1], 4) if accs else None,
        updates_per_s=round(n_stop / t_last, 1) if t_last > 0 else None,
        torch=torch.__version__, updates=n_stop, elapsed_s=round(t_last, 4), stop=why,
        first_accuracy=accs[0] if accs else None, best_accuracy=max(accs) if accs else None,
        pulls=pulls, pushes=pushes, ignored_pushes=pushes - n_stop,
        applied_per_trainer=[len(k) for k in kept],
        staleness_mean=round(sum(stale) / max(1, len(stale)), 3), staleness_max=max(stale, default=0),
        params=params, startup_s=round(t_first - t_launch, 4),
        # the server saw exactly the trainers' pulls and pushes, applied every push, and the
        # run's updates are the pushes before the stop
        updates_ok=(server["pulls"] == pulls and server["pushes"] == pushes and server["version"] == pushes
                    and server["duplicates"] == 0 and n_stop == sum(len(k) for k in kept)),
        lo_bytes_per_logical=round(lo / ((pulls + pushes) * params * 4), 3),
        server_rss_mb=round(server_rss, 1), trainer_rss_mb=round(max(t["rss_mb"] for t in ts), 1),
        eval_method=EVAL_METHOD,
        eval_lag_mean=round(sum(lags) / max(1, len(lags)), 3), eval_lag_max=max(lags, default=0),
        server_staleness_mean=round(server["staleness"]["mean"], 3),
        server_staleness_max=server["staleness"]["max"],
        eval_versions=[c[3] for c in curve],
        curve=[[round(t, 4), n, round(acc, 4)] for t, n, acc, _ in curve])  # the long field last


# -- table -------------------------------------------------------------------------------------
def machine() -> str:
    import grpc, numpy, torch
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return (f"nproc={os.cpu_count()} ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, grpcio {grpc.__version__}, numpy {numpy.__version__}")


def table(paths: list[str]) -> str:
    """DIGITS_RESULTS.md's table (the peer baselines' columns), shardps rows beside the
    peers', the W=1 replay check per implementation, and shardps's evaluation lag."""
    runs = [json.loads(l) for p in paths for l in open(p) if l.startswith("{")]
    groups = defaultdict(list)
    for r in runs:
        groups[(r["impl"], r["workers"], r["target"])].append(r)
    inf = math.inf
    med = lambda xs: statistics.median(xs) if xs else None
    rng = lambda xs, f: f"{f(min(xs))}-{f(max(xs))}" if xs else "-"
    sec = lambda x: "-" if x is None or x == inf else f"{x:.2f}"
    cnt = lambda x: "-" if x is None or x == inf else f"{x:.0f}"
    single = {t: med([r["time_to_target_s"] if r["reached"] else inf for r in rs])
              for (i, w, t), rs in groups.items() if i == "single_process"}
    out = [f"# digits time-to-accuracy: shardps beside the peer baselines\n\nMachine: {machine()}\n",
           "Workload: bench/peers/README.md, section digits (sklearn digits, MLP 64-128-10, SGD lr 0.1, "
           "batch 32, async PS, 1 server). Times start at the first applied update (process start-up and "
           "connection set-up excluded, shown as start-up). Median over runs (seeds 0, 1, 2 unless stated); a run "
           "that missed the target counts as infinitely slow; [min-max] over the runs that reached it.\n",
           "| impl | W | target | reached | time to target s [min-max] | x single | updates to target [min-max] "
           "| updates/s | staleness | final acc | start-up s | ok |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda k: (k[0] != "single_process", k[0] != "shardps", k[0], k[1], k[2])
    for k in sorted(groups, key=order):
        rs = groups[k]
        hit = [r for r in rs if r["reached"]]
        t = med([r["time_to_target_s"] if r["reached"] else inf for r in rs])
        u = med([r["updates_to_target"] if r["reached"] else inf for r in rs])
        ts, us = [r["time_to_target_s"] for r in hit], [r["updates_to_target"] for r in hit]
        base = single.get(k[2])
        ratio = f"{t / base:.1f}" if base and t not in (None, inf) and base != inf else "-"
        stale = med([r["staleness_mean"] for r in rs if "staleness_mean" in r])
        ok = all(r["best_accuracy"] > r["first_accuracy"] and r.get("updates_ok", True) for r in rs)
        name = f"**{k[0]}**" if k[0] == "shardps" else k[0]
        out.append(f"| {name} | {k[1]} | {k[2]} | {len(hit)}/{len(rs)} | **{sec(t)}** [{rng(ts, sec)}] | {ratio} "
                   f"| {cnt(u)} [{rng(us, cnt)}] | {med([r['updates_per_s'] for r in rs]):.0f} "
                   f"| {'-' if stale is None else f'{stale:.2f}'} | {med([r['final_accuracy'] for r in rs]):.3f} "
                   f"| {med([r['startup_s'] for r in rs]):.1f} | {'yes' if ok else 'NO'} |")
    ref = {(r["seed"], r["target"]): [c[1:] for c in r["curve"]] for r in runs if r["impl"] == "single_process"}
    out.append("\nW=1 PS runs whose (updates, accuracy) curve equals the single-process run of the same seed:")
    for impl in sorted({r["impl"] for r in runs} - {"single_process"}):
        w1 = [r for r in runs if r["impl"] == impl and r["workers"] == 1 and (r["seed"], r["target"]) in ref]
        same = sum([c[1:] for c in r["curve"]] == ref[(r["seed"], r["target"])] for r in w1)
        out.append(f"- {impl}: {same}/{len(w1)}")
    lag = defaultdict(list)
    for r in runs:
        if r["impl"].startswith("shardps"):
            lag[r["workers"]].append(r)
    if lag:
        out += ["\nshardps evaluation (see `eval_method` in the JSON): the trainer that pushed update n evaluates "
                "the parameters of its next pull, version n + j. Median over runs of the mean and the max of j, "
                "and of the pushes applied after the stop update (peer: ignored pushes):\n",
                "| W | lag j mean | lag j max | ignored pushes | lo bytes / logical |", "|---|---|---|---|---|"]
        for w in sorted(lag):
            rs = lag[w]
            out.append(f"| {w} | {med([r['eval_lag_mean'] for r in rs]):.2f} | {med([r['eval_lag_max'] for r in rs]):.0f} "
                       f"| {med([r['ignored_pushes'] for r in rs]):.0f} "
                       f"| {med([r['lo_bytes_per_logical'] for r in rs]):.2f} |")
    out += ["\nColumns: x single = median time to target over the single-process median; updates/s = updates "
            "applied / seconds from the first to the last applied update; staleness = mean number of updates "
            "applied by other trainers between a trainer's pull and its push; final acc = held-out accuracy at "
            "the last evaluation; start-up = launch to first applied update (spawn, imports, data, connection "
            "set-up; shardps: scheduler and server start, join, declare); ok = accuracy climbed and (PS) every push "
            "arrived and every push before the stop was applied.\n",
            "Notes: 2 cores shared by the server (shardps: and the scheduler) and W trainer processes; "
            "torch.set_num_threads(1) in every trainer. torch_rpc_digits[uv] = TensorPipe over TCP loopback; [auto] = "
            "TensorPipe's own choice (shared memory on one host); shardps = gRPC over TCP loopback, fp32 both ways. "
            "With W>=2 the order in which pushes arrive is not deterministic, so results vary run to run even for a "
            "fixed seed. shardps's server applies p -= fp32(0.1) * g with two roundings where torch's "
            "p.sub_(g, alpha=0.1) fuses them (one rounding): parameters can differ in the last bit from the "
            "single-process run's; the W=1 line above shows whether any evaluated accuracy changed."]
    return "\n".join(out)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.95, help="held-out accuracy that stops training")
    ap.add_argument("--workers", type=int, default=1, help="trainer processes W")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--timeout", type=float, default=200, help="abort after this many seconds")
    ap.add_argument("--run-dir", default=None, help="keep the daemons' logs here (default: a temp dir, removed)")
    ap.add_argument("--table", nargs="+", metavar="JSONL", help="render these JSON-lines files as markdown")
    ap.add_argument("--no-fuse", action="store_true", help="pull in a call of its own (no PushPullBatch)")
    ap.add_argument("--compare", type=int, default=0, metavar="ROUNDS",
                    help="shardps without and with fusion and torch_rpc_digits[uv], interleaved, ROUNDS times")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --compare: the seeds of each round")
    ap.add_argument("--out", default=None, help="with --compare: append every run's JSON line here too")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error("--workers must be >= 1")
    return a


def compare(a) -> list[dict]:
    """Each round, each seed: shardps --no-fuse, shardps, torch_rpc_digits[uv], one after the
    other (a subprocess each, so no run inherits another's threads or imports)."""
    peer = pathlib.Path(__file__).resolve().parent / "peers" / "torch_rpc_digits.py"
    common = ["--workers", str(a.workers), "--target", str(a.target), "--timeout", str(a.timeout), "--json"]
    runs = []
    for rnd in range(a.compare):
        for seed in a.seeds:
            for cmd in ([__file__, "--no-fuse"], [__file__], [str(peer), "--tp", "uv"]):
                out = subprocess.run([sys.executable, *cmd, "--seed", str(seed), *common], capture_output=True,
                                     text=True, timeout=a.timeout + 60)
                line = next((l for l in out.stdout.splitlines() if l.startswith("{")), None)
                if out.returncode or line is None:
                    raise RuntimeError(f"{' '.join(cmd)} --seed {seed} failed ({out.returncode}): {out.stderr[-2000:]}")
                run = json.loads(line)
                run["round"] = rnd
                runs.append(run)
                print(line, flush=True)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(line + "\n")
    return runs


def compare_summary(runs: list[dict]) -> str:
    """Per implementation: median time to target and updates/s, [min-max], and the ratios of
    the medians to torch_rpc_digits[uv]'s."""
    by = defaultdict(list)
    for r in runs:
        by[r["impl"]].append(r)
    med = lambda rs, k: statistics.median(r[k] if r["reached"] or k != "time_to_target_s" else math.inf
                                          for r in rs)
    peer = by.get("torch_rpc_digits[uv]")
    lines = []
    for impl, rs in by.items():
        t, u = med(rs, "time_to_target_s"), med(rs, "updates_per_s")
        ts = [r["time_to_target_s"] for r in rs if r["reached"]]
        ratio = f", x{t / med(peer, 'time_to_target_s'):.2f} of torch_rpc_digits[uv]'s time" if peer else ""
        lines.append(f"{impl}: reached {len(ts)}/{len(rs)}, time to target median {t:.3f} s "
                     f"[{min(ts, default=math.inf):.3f}-{max(ts, default=math.inf):.3f}], "
                     f"updates/s median {u:.0f} [{min(r['updates_per_s'] for r in rs):.0f}-"
                     f"{max(r['updates_per_s'] for r in rs):.0f}]{ratio}, all ok: "
                     f"{all(r.get('updates_ok', True) for r in rs)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends TERM: run the cleanup
    a = parse(argv)
    if a.table:
        print(table(a.table))
        return 0
    if a.compare:
        print(compare_summary(compare(a)), flush=True)
        return 0
    r = run(a)
    print(json.dumps(r) if a.json else "\n".join(f"{k:>22}: {v}" for k, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
