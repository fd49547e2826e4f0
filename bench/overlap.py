"""Step time with PSClient(overlap=True) against the plain path, in one run on one machine.

Two workloads, each on its own real cluster (a `psctl scheduler` and one `psctl server`
process, mode async, optimizer sgd); the worker is this process, driving PSClient:

- `large`: the ps-loop large preset's shape (25M float32 parameters in 50 1-D tensors of
  500K, bench/peers/README.md, the same definition as bench/ps_loop.py) as a torch
  model whose backward visits every tensor in turn, last first, as a deep network's does:
  h <- tanh(h * t_i) for i = 0..49 over a fixed random 500K input, loss = sum(h).
  `--work K` adds K parameter-free tanh per layer (a heavier backward per byte moved).
- `cnn`: the built-in digits-cnn on batches of 32 digits, cross-entropy.

One step is what a training loop does: pull(), build the batch, zero_grad, forward,
backward, push(). Plain and overlap runs alternate (`--reps` each) on the same cluster and the
same model. Per step we time pull, compute (batch + forward + backward) and push; the figures
are medians over all measured steps of a variant (warm-up steps dropped):

    comm    = median(pull + push) of the plain path: what overlap could hide
    hidden  = (plain step - overlap step) / comm

With overlap, push() only waits for what backward did not already send, and (async) the next
pull is prefetched as soon as the push is acknowledged; compute and communication share the
machine's cores, so on a small CPU box `hidden` may be small or negative. Figures, not
assertions:

    python bench/overlap.py                                  # both workloads, markdown table
    python bench/overlap.py --workloads cnn --steps 50 --reps 1 --json-out /tmp/overlap.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time

# Run as a script, sys.path[0] is bench/ (ps_loop's presets); the repository root makes the
# packages importable without an installed copy.
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))

import ps_loop  # noqa: E402  (the ps-loop presets: one definition for every bench)

WORKLOADS = ("large", "cnn")
DEFAULT_STEPS = {"large": 10, "cnn": 200}
DEFAULT_WARMUP = {"large": 2, "cnn": 20}
LR = {"large": 0.01, "cnn": 0.1}


# -- the workloads ---------------------------------------------------------------------------
class Workload:
    """A model, a step's compute (batch + forward + loss), and its size."""

    def __init__(self, name: str, work: int, device):
        import torch
        import torch.nn.functional as F
        from torch import nn

        self.name = name
        if name == "large":
            sizes, names = ps_loop.tensor_sizes("large"), ps_loop.tensor_names("large")
            width = sizes[0]
            assert all(s == width for s in sizes), "the chain needs equal tensors"

            class Chain(nn.Module):
                def __init__(self):
                    super().__init__()
                    for n in names:
                        self.register_parameter(n, nn.Parameter(torch.ones(width)))

                def forward(self, x):
                    h = x
                    for n in names:
                        h = torch.tanh(h * getattr(self, n))
                        for _ in range(work):
                            h = torch.tanh(h)
                    return h

            gen = torch.Generator().manual_seed(0)
            self.model = Chain().to(device)
            x = (torch.rand(width, generator=gen) * 2 - 1).to(device)
            self.loss = lambda: self.model(x).sum()
        elif name == "cnn":
            from shardps.worker import data, models
            self.model = models.build("digits-cnn", seed=0).to(device)
            split = data.digits(image=True)
            gen = torch.Generator().manual_seed(0)
            xs, ys = split.x_train.to(device), split.y_train.to(device)

            def loss():
                idx = torch.randint(len(xs), (32,), generator=gen).to(device)
                return F.cross_entropy(self.model(xs[idx]), ys[idx])
            self.loss = loss
        else:
            raise ValueError(name)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.tensors = len(list(self.model.parameters()))


def run_variant(scheduler: str, wl: Workload, overlap: bool, steps: int, warmup: int, device) -> dict:
    """Connect, warm up, time `steps` steps, leave. Per-step phase times in seconds."""
    import torch
    from shardps import PSClient

    cuda = device.type == "cuda"
    rec = {"step": [], "pull": [], "compute": [], "push": []}
    with PSClient.connect(scheduler, wl.model, name=f"overlap-bench-{int(overlap)}", overlap=overlap,
                          connect_timeout_s=60.0) as ps:
        sent0, recv0 = ps.bytes_sent, ps.bytes_received
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            ps.pull()
            t1 = time.perf_counter()
            wl.model.zero_grad(set_to_none=True)
            wl.loss().backward()
            if cuda and not overlap:
                torch.cuda.synchronize()  # the plain path's compute, measured to its end
            t2 = time.perf_counter()
            assert ps.push(), "async push did not count"
            t3 = time.perf_counter()
            if i >= warmup:
                for k, v in (("step", t3 - t0), ("pull", t1 - t0), ("compute", t2 - t1), ("push", t3 - t2)):
                    rec[k].append(v)
        total = warmup + steps
        rec["bytes_sent_per_step"] = (ps.bytes_sent - sent0) / total
        # connect's pull came before sent0/recv0; each step pulls once
        rec["bytes_received_per_step"] = (ps.bytes_received - recv0) / total
    return rec


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def median_ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 3) if xs else float("nan")


def bench_workload(name: str, a, device, run_dir: pathlib.Path) -> dict:
    from shardps.pscommon.config import JobSpec, OptimizerConfig
    from shardps.psctl.up import Cluster

    steps = a.steps or DEFAULT_STEPS[name]
    warmup = a.warmup if a.warmup is not None else DEFAULT_WARMUP[name]
    wl = Workload(name, a.work, device)
    wdir = run_dir / name
    wdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(wdir)
    merged = {v: {"step": [], "pull": [], "compute": [], "push": []} for v in ("plain", "overlap")}
    busy = {v: [0.0, 0.0] for v in merged}  # CPU seconds of worker + daemons, wall seconds
    traffic = {}
    try:
        job = JobSpec(mode="async", optimizer=OptimizerConfig(kind="sgd", lr=LR[name]), num_servers=1,
                      heartbeat_timeout_s=30.0)
        scheduler = cluster.start_scheduler(job)
        cluster.start_server(0)
        for rep in range(a.reps):
            # alternate, and swap who goes first each repetition, so drift spreads over both
            order = ("plain", "overlap") if rep % 2 == 0 else ("overlap", "plain")
            pids = [os.getpid()] + [p.pid for p in cluster.procs.values()]
            for variant in order:
                cpu0, wall0 = cpu_seconds(pids), time.perf_counter()
                rec = run_variant(scheduler, wl, variant == "overlap", steps, warmup, device)
                busy[variant][0] += cpu_seconds(pids) - cpu0
                busy[variant][1] += time.perf_counter() - wall0
                for k in merged[variant]:
                    merged[variant][k].extend(rec[k])
                traffic[variant] = (rec["bytes_sent_per_step"], rec["bytes_received_per_step"])
                print(f"overlap bench: {name} rep {rep + 1}/{a.reps} {variant}: "
                      f"step {median_ms(rec['step'])} ms", file=sys.stderr, flush=True)
    finally:
        cluster.stop(grace_s=5.0)
    plain, over = merged["plain"], merged["overlap"]
    plain_step, over_step = statistics.median(plain["step"]), statistics.median(over["step"])
    comm = statistics.median([p + q for p, q in zip(plain["pull"], plain["push"])])
    import torch
    return dict(
        bench="overlap", workload=name, params=wl.params, tensors=wl.tensors,
        work=a.work if name == "large" else None, device=str(device), mode="async", servers=1, workers=1,
        steps=steps, warmup=warmup, reps=a.reps,
        plain_step_ms=median_ms(plain["step"]), overlap_step_ms=median_ms(over["step"]),
        plain_comm_ms=round(1e3 * comm, 3),
        plain_pull_ms=median_ms(plain["pull"]), plain_push_ms=median_ms(plain["push"]),
        plain_compute_ms=median_ms(plain["compute"]),
        overlap_pull_wait_ms=median_ms(over["pull"]), overlap_push_wait_ms=median_ms(over["push"]),
        overlap_compute_ms=median_ms(over["compute"]),
        hidden_fraction=round((plain_step - over_step) / comm, 3) if comm > 0 else None,
        # how busy the machine's cores were (worker + scheduler + server CPU over wall x cores,
        # connect and warm-up included): overlap can only hide communication on idle cores
        plain_cpu_util=round(busy["plain"][0] / busy["plain"][1] / os.cpu_count(), 3),
        overlap_cpu_util=round(busy["overlap"][0] / busy["overlap"][1] / os.cpu_count(), 3),
        speedup=round(plain_step / over_step, 3) if over_step > 0 else None,
        bytes_sent_per_step=round(traffic["plain"][0]), bytes_received_per_step=round(traffic["plain"][1]),
        torch_threads=torch.get_num_threads(), cpus=os.cpu_count(), host=platform.node(),
        python=platform.python_version(), torch=torch.__version__,
    )


def table(rows: list[dict]) -> str:
    head = ("| workload | params | tensors | plain step ms | overlap step ms | plain comm ms (pull+push) "
            "| plain compute ms | hidden | speedup | CPU busy plain / overlap |")
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = r["workload"] + (f" (work {r['work']})" if r.get("work") else "")
        out.append(f"| {label} | {r['params']:,} | {r['tensors']} | {r['plain_step_ms']} | {r['overlap_step_ms']} "
                   f"| {r['plain_comm_ms']} | {r['plain_compute_ms']} | {r['hidden_fraction']} | {r['speedup']} "
                   f"| {r['plain_cpu_util']:.0%} / {r['overlap_cpu_util']:.0%} |")
    return "\n".join(out)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="large,cnn", help="comma list of: " + ", ".join(WORKLOADS))
    ap.add_argument("--steps", type=int, default=None, help="measured steps per repetition "
                    f"(default {DEFAULT_STEPS})")
    ap.add_argument("--warmup", type=int, default=None, help=f"unmeasured steps first (default {DEFAULT_WARMUP})")
    ap.add_argument("--reps", type=int, default=2, help="plain/overlap repetitions, alternated")
    ap.add_argument("--work", type=int, default=0, help="large: extra tanh per layer in forward/backward")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (psctl worker uses 1)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    ap.add_argument("--json-out", default=None, help="append one JSON line per workload here")
    ap.add_argument("--run-dir", default=None, help="keep the daemons' logs here (default: temp, removed)")
    a = ap.parse_args(argv)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in a.workloads if w not in WORKLOADS]
    if bad or not a.workloads:
        ap.error(f"--workloads: unknown {bad}; choose from {WORKLOADS}")
    if (a.steps is not None and a.steps < 1) or a.reps < 1 or a.work < 0 or a.threads < 1 \
            or (a.warmup is not None and a.warmup < 0):
        ap.error("--steps and --reps must be >= 1, --warmup and --work >= 0, --threads >= 1")
    return a


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends TERM: run the cleanup
    a = parse(argv)
    if os.environ.get("SHARDPS_MALLOC_TUNING", "1") != "0":
        from shardps.pscommon.lifecycle import tune_malloc
        tune_malloc()  # what `psctl worker` does at start-up (the daemons tune themselves)
    import torch
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    run_dir = pathlib.Path(a.run_dir or tempfile.mkdtemp(prefix="shardps-overlap-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    rows, ok = [], False
    try:
        for name in a.workloads:
            rows.append(bench_workload(name, a, device, run_dir))
            if a.json_out:
                with open(a.json_out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
        ok = True
    finally:
        if ok and not a.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif not ok:
            print(f"overlap bench: logs kept in {run_dir}", file=sys.stderr)
    print(table(rows))
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
