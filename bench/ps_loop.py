"""The ps-loop workload of bench/peers/README.md, run on shardps.

Same model, presets, configurations, timing and JSON fields as the peer scripts there
(torch_rpc_ps.py, grpc_raw_limit.py), so one table holds all of them. What is shardps here:
a real `psctl scheduler` and S real `psctl server` processes (mode async, optimizer sgd,
lr 0.01, so servers apply p -= 0.01 * g on arrival), and W worker processes each driving a
ShardClient. All data moves through shardps's gRPC path; the multiprocessing Queue, Event
and Barrier below only coordinate the benchmark's own processes, as in the peer scripts.

One difference from the workload text, recorded in the JSON as `placement`: shardps places
tensors byte-balanced (largest first onto the lightest shard), not tensor i on server i % S.
The presets' tensors are equal-sized within one element, so the load per server is the same.

    python bench/ps_loop.py --preset small --servers 1 --workers 1 --json
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import signal
import sys
import tempfile
import time
import multiprocessing as mp

# Run as a script, sys.path[0] is bench/; the repository root makes the packages importable
# without an installed copy (spawned children inherit this sys.path).
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

# The workload, as bench/peers/README.md defines it.
PRESETS = {"small": (1_000_000, 8), "large": (25_000_000, 50)}  # (params, tensors)
DEFAULT_STEPS = {"small": 200, "large": 10}
WARMUP, LR, GRAD_SCALE = 2, 0.01, 1e-3
PEER_MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"  # the peers' marker of tuned glibc malloc


def tensor_sizes(preset: str) -> list[int]:
    p, t = PRESETS[preset]
    return [p // t + (i < p % t) for i in range(t)]


def tensor_names(preset: str) -> list[str]:
    return [f"t{i:03d}" for i in range(PRESETS[preset][1])]


def malloc_tuned() -> bool:
    """Whether this run's processes use tuned glibc malloc: psctl tunes itself unless
    SHARDPS_MALLOC_TUNING=0, and the peers' environment variables tune any process."""
    return os.environ.get("SHARDPS_MALLOC_TUNING", "1") != "0" or bool(os.environ.get(PEER_MALLOC_ENV))


def impl_name(a) -> str:
    codecs = [f"{k}={v}" for k, v in (("pull", a.pull_codec), ("push", a.push_codec)) if v != "fp32"]
    return "shardps" + (f"[{','.join(codecs)}]" if codecs else "") + ("+malloc" if malloc_tuned() else "")


def lo_tx_bytes() -> int:
    """Bytes sent over loopback so far; with the logical volume it shows the data crossed TCP."""
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])  # tx bytes
    return 0


def proc_status_bytes(pid: int, field: str) -> int:
    """A memory line of /proc/PID/status, e.g. VmHWM (peak resident set: ru_maxrss seen from
    outside, while the process still runs) or VmRSS (resident now)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def own_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -- worker process --------------------------------------------------------------------------
def worker_main(w: int, a, scheduler: str, q, declared, go, barrier) -> None:
    import ctypes
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the launcher
    if os.environ.get("SHARDPS_MALLOC_TUNING", "1") != "0":
        from shardps.pscommon.lifecycle import tune_malloc
        tune_malloc()  # what `psctl worker` does at start-up, so workers match the daemons
    from shardps.pscommon.config import CodecConfig
    from shardps.worker.client import ClientConfig, ShardClient
    import_rss = current_rss_mb()  # what the imports alone cost (worker/__init__ pulls in torch)

    client = ShardClient(ClientConfig(scheduler=scheduler, name=f"ps-loop-{w}",
                                      push_codec=CodecConfig.parse(a.push_codec)))
    try:
        client.join()
        client.wait_for_servers()
        # Worker 0 creates the keys; the others then declare the same model, which keeps the
        # values: declare is idempotent, and this order keeps the benchmark off its races.
        if w > 0:
            declared.wait(a.timeout)
        params = {n: np.ones(size, np.float32) for n, size in zip(tensor_names(a.preset), tensor_sizes(a.preset))}
        client.declare(params)  # these arrays then serve as the pull buffers
        q.put(("declared", w, None))
        go.wait(a.timeout)  # the launcher reads the loopback counter between declare and step 1

        phase = {"pull": 0.0, "grad": 0.0, "push": 0.0}
        timing = [False]  # accumulate phase times only over the measured steps

        def step():
            t0 = time.perf_counter()
            client.pull(params)
            t1 = time.perf_counter()
            grads = {n: p * GRAD_SCALE for n, p in params.items()}  # fake gradient, a new array as in the peers
            t2 = time.perf_counter()
            client.push(grads)
            t3 = time.perf_counter()
            if timing[0]:
                phase["pull"] += t1 - t0
                phase["grad"] += t2 - t1
                phase["push"] += t3 - t2

        for _ in range(WARMUP):
            step()
        barrier.wait(a.timeout)
        timing[0] = True
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        for _ in range(a.steps):
            step()
        t1 = time.perf_counter()
        q.put(("worker", w, {"t0": t0, "t1": t1, "rss_mb": own_peak_rss_mb(), "import_rss_mb": import_rss,
                             "phase_s": {k: v / a.steps for k, v in phase.items()}}))
    except BaseException as exc:  # the launcher prints it instead of waiting out its timeout
        q.put(("error", w, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        client.leave()


# -- launcher ------------------------------------------------------------------------------------
class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.1, self.end - time.monotonic())


def gather(q, kind: str, n: int, deadline: Deadline, procs, cluster) -> list:
    """n messages of `kind` from the workers, in worker order. A worker error, or a worker or
    daemon that died, ends the wait at once (workers would otherwise retry until their own
    deadlines)."""
    import queue
    out = {}
    while len(out) < n:
        try:
            k, i, v = q.get(timeout=min(1.0, deadline.left()))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker process exited with code {dead[0].exitcode} while waiting for {kind}")
            gone = [(name, p.returncode) for name, p in cluster.procs.items() if p.poll() is not None]
            if gone:
                raise RuntimeError(f"{gone[0][0]} exited with code {gone[0][1]} while waiting for {kind}")
            if deadline.left() <= 0.1:
                raise TimeoutError(f"timed out waiting for {kind} ({len(out)} of {n})")
            continue
        if k == "error":
            raise RuntimeError(f"worker {i}: {v}")
        assert k == kind, (k, kind, v)
        out[i] = v
    return [out[i] for i in sorted(out)]


def final_param_sum(scheduler: str) -> float:
    """Sum of every served parameter, read fp32 whatever the job's pull codec (a bf16 read
    would round away the ~1e-3 decrease the check looks for)."""
    from shardps.pscommon.config import CodecConfig
    from shardps.worker.client import ClientConfig, ShardClient

    reader = ShardClient(ClientConfig(scheduler=scheduler, name="ps-loop-reader", pull_codec=CodecConfig("fp32")))
    smap = reader.attach()
    into = {p.name: np.empty(p.numel, np.float32) for p in smap.params}
    reader.pull(into)
    reader.leave()
    return float(sum(v.sum(dtype=np.float64) for v in into.values()))


def run(a) -> dict:
    from shardps.pscommon.config import CodecConfig, JobSpec, OptimizerConfig
    from shardps.psctl import ops
    from shardps.psctl.up import Cluster

    P, T = PRESETS[a.preset]
    S, W, N = a.servers, a.workers, a.steps
    deadline = Deadline(a.timeout)
    run_dir = pathlib.Path(a.run_dir or tempfile.mkdtemp(prefix="shardps-ps-loop-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(run_dir)
    ctx = mp.get_context("spawn")  # never fork: this process has imported grpc
    q, declared, go, barrier = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Barrier(W)
    procs = []
    ok = False
    try:
        job = JobSpec(mode="async", optimizer=OptimizerConfig(kind="sgd", lr=LR),
                      push_codec=CodecConfig.parse(a.push_codec), pull_codec=CodecConfig.parse(a.pull_codec),
                      num_servers=S)
        scheduler = cluster.start_scheduler(job)
        for s in range(S):
            cluster.start_server(s)
        # idle servers, no keys yet: the interpreter + gRPC floor under server_rss_mb
        base_rss = max(proc_status_bytes(cluster.procs[f"server-{s}"].pid, "VmRSS") for s in range(S))
        procs = [ctx.Process(target=worker_main, args=(w, a, scheduler, q, declared, go, barrier), daemon=True)
                 for w in range(W)]
        for p in procs:
            p.start()
        gather(q, "declared", 1, deadline, procs, cluster)
        declared.set()
        if W > 1:
            gather(q, "declared", W - 1, deadline, procs, cluster)
        lo0 = lo_tx_bytes()  # from here: the 2 + N pull/push steps of every worker, as the peers count
        go.set()
        wres = gather(q, "worker", W, deadline, procs, cluster)
        lo = lo_tx_bytes() - lo0

        status = ops.collect_status(scheduler, 30.0)  # before the read below, which counts as a pull
        servers = sorted((s for s in status["servers"] if s["state"] == "alive"), key=lambda s: s["shard"])
        if len(servers) != S or any("keys" not in s for s in servers):
            raise RuntimeError(f"server status incomplete: {servers}")
        rss = {s["shard"]: proc_status_bytes(cluster.procs[f"server-{s['shard']}"].pid, "VmHWM") for s in servers}
        param_sum = final_param_sum(scheduler)
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
            print(f"ps_loop: logs kept in {run_dir}", file=sys.stderr)

    # Same formulas as the peers' summarize() (bench/peers/psloop_spec.py).
    wall = max(w["t1"] for w in wres) - min(w["t0"] for w in wres)
    moved = 2 * W * N * P * 4
    pushes = W * (N + WARMUP)
    expect = pushes * P * 4
    pulled = sum(s["pull_traffic"]["logical_bytes"] for s in servers)
    pushed = sum(s["push_traffic"]["logical_bytes"] for s in servers)
    pull_wire = sum(s["pull_traffic"]["wire_bytes"] for s in servers)
    push_wire = sum(s["push_traffic"]["wire_bytes"] for s in servers)
    mean = param_sum / P
    serial = (1 - LR * GRAD_SCALE) ** pushes
    ratio = {s["shard"]: rss[s["shard"]] / s["bytes"] for s in servers if s["bytes"]}
    import grpc
    return dict(
        impl=impl_name(a), preset=a.preset, params=P, tensors=T, servers=S, workers=W, steps=N,
        wall_s=round(wall, 4),
        steps_per_s=round(sum(N / (w["t1"] - w["t0"]) for w in wres), 2),
        MBps=round(moved / wall / 1e6, 1),
        server_rss_mb=round(max(rss.values()) / 2**20, 1),
        worker_rss_mb=round(max(w["rss_mb"] for w in wres), 1),
        bytes_ok=pulled == expect and pushed == expect,
        update_ok=abs((1 - mean) / (1 - serial) - 1) < 0.05,
        param_mean=round(mean, 6), param_mean_serial=round(serial, 6),
        lo_bytes_per_logical=round(lo / expect / 2, 3),
        # shardps-only fields
        malloc_tuned=malloc_tuned(), placement="byte-balanced",
        pull_codec=a.pull_codec, push_codec=a.push_codec,
        server_base_rss_mb=round(base_rss / 2**20, 1),
        worker_import_rss_mb=round(max(w["import_rss_mb"] for w in wres), 1),
        server_param_mb=round(max(s["bytes"] for s in servers) / 2**20, 1),
        server_rss_per_param=round(max(ratio.values()), 2) if ratio else None,  # goal: <= 2 on large
        # the same without the idle process (interpreter, gRPC, numpy): what the data path adds
        server_rss_above_idle_per_param=round(max(
            (rss[s["shard"]] - base_rss) / s["bytes"] for s in servers if s["bytes"]), 2),
        pull_wire_per_logical=round(pull_wire / pulled, 3) if pulled else None,
        push_wire_per_logical=round(push_wire / pushed, 3) if pushed else None,
        worker_phase_s={k: round(sum(w["phase_s"][k] for w in wres) / W, 5) for k in ("pull", "grad", "push")},
        per_server=[{"shard": s["shard"], "keys": s["keys"], "param_mb": round(s["bytes"] / 2**20, 1),
                     "rss_mb": round(rss[s["shard"]] / 2**20, 1), "pushes": s["pushes"], "pulls": s["pulls"],
                     "pulled_bytes": s["pull_traffic"]["logical_bytes"],
                     "pushed_bytes": s["push_traffic"]["logical_bytes"]} for s in servers],
        expected_bytes_each_way=expect, grpc=grpc.__version__,
    )


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="small")
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default small 200, large 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--timeout", type=float, default=120, help="abort the run after this many seconds")
    ap.add_argument("--pull-codec", default="fp32", help="fp32|fp16|bf16 (the job's pull codec)")
    ap.add_argument("--push-codec", default="fp32", help="fp32|fp16|bf16|int8[:BLOCK]|topk[:DENSITY]")
    ap.add_argument("--run-dir", default=None, help="keep the daemons' logs here (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    a.steps = a.steps or DEFAULT_STEPS[a.preset]
    if a.servers < 1 or a.workers < 1 or a.steps < 1:
        ap.error("--servers, --workers and --steps must be >= 1")
    return a


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends TERM: run the cleanup
    a = parse(argv)
    r = run(a)
    print(json.dumps(r) if a.json else "\n".join(f"{k:>22}: {v}" for k, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
