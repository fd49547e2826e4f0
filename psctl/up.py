"""`psctl up`: a local cluster of real processes on free loopback ports.

The scheduler, each server and each worker is its own interpreter (`python -m shardps.psctl ...`),
never a fork of this one, in a process group of its own: Ctrl-C on the terminal reaches
`psctl up` alone, which then stops the workers first (they leave while the servers and the
scheduler still answer), then the servers, then the scheduler, and exits 130. SIGTERM and
SIGHUP (the terminal closed) stop it the same way; a second Ctrl-C kills what is left.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import DeadlineExceeded, InvalidArgument, Unavailable

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = {"worker": 15.0, "server": 15.0, "scheduler": 10.0}   # SIGTERM, then SIGKILL past this
EXIT_INTERRUPTED = 130
TIERS = (("worker", "worker", "workers"), ("server", "server", "servers"), ("scheduler", "scheduler", "schedulers"))


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP reached `psctl up` (a KeyboardInterrupt: psctl exits 130)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


@dataclasses.dataclass(frozen=True)
class UpConfig:
    job: JobSpec
    workers: int = 2
    model: str = "digits-mlp"
    steps: int = 300
    batch_size: int = 32
    seed: int = 0
    run_dir: str | None = None
    straggler_delay_s: float = 0.0
    timeout_s: float = 900.0
    as_json: bool = False
    churn: tuple[tuple[str, float], ...] = ()   # (("kill"|"add", seconds after start), ...)
    epochs: int = 0
    plot: str | None = None                      # PNG of the training curves
    min_accuracy: float = 0.0                    # exit 1 when the served model ends below it
    view: str = "auto"                           # live view while training: auto, live, plain, none
    admit_after: int = 1                         # every server's --admit-after (embedding tables)
    eval_every: int | None = None                # every worker's --eval-every; None: plot_eval_every's

    def __post_init__(self):
        if isinstance(self.admit_after, bool) or not isinstance(self.admit_after, int) or self.admit_after < 1:
            # refused here, by name, rather than as servers that never get ready
            raise InvalidArgument(f"admit_after={self.admit_after!r} must be an integer >= 1")
        if self.eval_every is not None and self.eval_every < 0:
            raise InvalidArgument(f"eval_every={self.eval_every} must be an integer >= 0")


PLOT_POINTS = 6   # held-out points per worker's curve when --plot chose --eval-every


def plot_eval_every(cfg: UpConfig, train_samples) -> int:
    """The workers' --eval-every: the one given; else with --plot about PLOT_POINTS points per
    worker over its run (one ctr-sparse evaluation reads the rows of 50k test samples: seconds
    on a busy machine, so a handful, not one every few steps); else 0, the final record alone.
    `train_samples()` is the training set's size, asked only with --epochs."""
    if cfg.eval_every is not None:
        return cfg.eval_every
    if not cfg.plot:
        return 0
    steps = cfg.steps
    if cfg.epochs:   # the workers share each epoch's batches
        steps = cfg.epochs * -(-train_samples() // cfg.batch_size) // max(1, cfg.workers)
    return max(1, -(-steps // PLOT_POINTS))


def train_samples(model: str) -> int:
    from shardps.worker import models
    entry = models.entry(model)
    return entry.task.size(entry.dataset())   # ctr-sparse: made once, the final evaluation's too


def parse_churn(text: str) -> tuple[tuple[str, float], ...]:
    """`kill@5,add@10`: SIGKILL the newest running worker 5 s after the workers start, then
    start a new worker at 10 s."""
    events = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        action, sep, at = item.partition("@")
        try:
            when = float(at)
        except ValueError:
            when = -1.0
        if action not in ("kill", "add") or not sep or when < 0:
            raise InvalidArgument(f"churn event {item!r} is not kill@SECONDS or add@SECONDS")
        events.append((action, when))
    return tuple(sorted(events, key=lambda e: e[1]))


def job_flags(job: JobSpec) -> list[str]:
    """The scheduler flags that reproduce `job`."""
    o = job.optimizer
    flags = ["--mode", job.mode, "--staleness", str(job.staleness), "--optimizer", o.kind,
             "--lr", repr(o.lr), "--momentum", repr(o.momentum), "--dampening", repr(o.dampening),
             "--weight-decay", repr(o.weight_decay), "--beta1", repr(o.beta1), "--beta2", repr(o.beta2),
             "--eps", repr(o.eps), "--lr-decay", repr(o.lr_decay),
             "--initial-accumulator", repr(o.initial_accumulator_value),
             "--push-codec", str(job.push_codec), "--pull-codec", str(job.pull_codec),
             "--lossless", job.lossless,
             "--heartbeat-timeout", repr(job.heartbeat_timeout_s), "--servers", str(job.num_servers),
             "--slice-bytes", str(job.slice_bytes)]
    if o.nesterov:
        flags.append("--nesterov")
    if not job.push_codec.error_feedback:
        flags.append("--no-error-feedback")
    return flags


class Cluster:
    """The processes of a local cluster and their files."""

    def __init__(self, run_dir: pathlib.Path):
        self.run_dir = run_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.scheduler_address = ""

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.run_dir / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # a process group of its own: the terminal's Ctrl-C reaches `psctl up` alone, which stops
        # the roles in order (stop) instead of every process draining at once
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen([sys.executable, "-m", "shardps.psctl", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, **group)
        log.close()
        self.procs[name] = proc
        return proc

    def wait_ready(self, name: str, ready_file: pathlib.Path) -> str:
        """The address `name` wrote to `ready_file` (removed before the process was started: a
        run dir used before holds the last run's addresses)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        proc = self.procs[name]
        while time.monotonic() < deadline:
            if ready_file.exists():
                return ready_file.read_text().strip()
            if proc.poll() is not None:
                raise Unavailable(f"{name} exited with code {proc.returncode} before it was ready; "
                                  f"see {self.run_dir / (name + '.log')}")
            time.sleep(0.05)
        raise DeadlineExceeded(f"{name} not ready after {READY_TIMEOUT_S:.0f}s")

    def start_scheduler(self, job: JobSpec) -> str:
        ready = self.run_dir / "scheduler.addr"
        ready.unlink(missing_ok=True)
        self.spawn("scheduler", ["scheduler", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
                                 "--state-dir", str(self.run_dir / "scheduler-state"), *job_flags(job)])
        self.scheduler_address = self.wait_ready("scheduler", ready)
        return self.scheduler_address

    def start_server(self, shard: int, flags: tuple[str, ...] = ()) -> str:
        name = f"server-{shard}"
        ready = self.run_dir / f"{name}.addr"
        ready.unlink(missing_ok=True)
        self.spawn(name, ["server", "--scheduler", self.scheduler_address, "--listen", "127.0.0.1:0",
                          "--shard-id", str(shard), "--ready-file", str(ready), *flags])
        return self.wait_ready(name, ready)

    def start_worker(self, index: int, cfg: UpConfig, min_workers: int = 0) -> subprocess.Popen:
        args = ["worker", "--scheduler", self.scheduler_address, "--model", cfg.model,
                "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed),
                "--metrics-out", str(self.run_dir / f"worker-{index}.jsonl"), "--no-progress",
                "--name", f"worker-{index}"]   # psctl status and the scheduler's log name it as its files
        if cfg.epochs:
            args += ["--epochs", str(cfg.epochs)]
        if min_workers:
            args += ["--min-workers", str(min_workers)]
        if cfg.eval_every:
            args += ["--eval-every", str(cfg.eval_every)]
        if index == 0 and cfg.straggler_delay_s:
            args += ["--step-delay", str(cfg.straggler_delay_s)]
        return self.spawn(f"worker-{index}", args)

    def stop(self, grace_s: dict[str, float] | float | None = None, report=None) -> None:
        """SIGTERM what is still running, workers first (they leave while the servers and the
        scheduler can still answer), then servers (final checkpoints), then the scheduler;
        SIGKILL whatever does not drain within its tier's grace period (one number: the same
        for every tier). `report(line)` gets a line per tier stopped. An interrupt while
        stopping SIGKILLs whatever is left."""
        if isinstance(grace_s, (int, float)):
            grace_s = dict.fromkeys(STOP_GRACE_S, float(grace_s))
        grace_s = grace_s or STOP_GRACE_S
        try:
            for prefix, one, many in TIERS:
                running = {n: p for n, p in self.procs.items() if n.startswith(prefix) and p.poll() is None}
                if running:
                    line = self._stop_tier(running, grace_s[prefix])
                    if report:
                        what = "the scheduler" if prefix == "scheduler" else \
                            f"{len(running)} {one if len(running) == 1 else many} ({', '.join(running)})"
                        report(f"stopped {what} {line}")
        except KeyboardInterrupt:  # Interrupted too
            left = {n: p for n, p in self.procs.items() if p.poll() is None}
            for proc in left.values():
                proc.kill()
            for proc in left.values():
                proc.wait()
            if report:
                report("interrupted again: killed " + (", ".join(left) or "nothing") + " (SIGKILL)")

    @staticmethod
    def _stop_tier(running: dict[str, subprocess.Popen], grace_s: float) -> str:
        t0 = time.monotonic()
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        killed = []
        for name, proc in running.items():
            try:
                proc.wait(timeout=max(0.1, t0 + grace_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                killed.append(name)
        line = f"in {time.monotonic() - t0:.1f} s"
        if killed:
            line += f"; {', '.join(killed)} did not stop within {grace_s:g} s: killed (SIGKILL)"
        return line


def server_flags(cfg: UpConfig) -> tuple[str, ...]:
    """What every server gets beyond its address and shard: the table policy, when not the default."""
    return ("--admit-after", str(cfg.admit_after)) if cfg.admit_after != 1 else ()


def last_record(path: pathlib.Path) -> dict:
    try:
        lines = path.read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def evaluate_live(scheduler: str, model_name: str) -> dict:
    """Held-out metrics of the parameters the servers hold now, by the model's task:
    {"eval_accuracy"}, or for ctr-sparse {"eval_auc", "eval_logloss", "teacher_auc", ...}."""
    from shardps.worker.train import evaluate_served
    return evaluate_served(scheduler, model_name)


def _trained(metrics: pathlib.Path) -> bool:
    """The worker wrote its first step's record."""
    try:
        return '"step"' in metrics.read_text()
    except FileNotFoundError:
        return False


def churn_and_wait(cluster: Cluster, workers: list, cfg: UpConfig, say) -> set[int]:
    """Wait for the workers, applying churn events on the way; returns indices killed. Churn
    times count from the moment every first worker trained its first step, not from their
    start: starting torch takes seconds to tens of seconds on a busy machine, and a kill
    meant for the middle of training must not land before it."""
    deadline = time.monotonic() + cfg.timeout_s
    pending, killed = list(cfg.churn), set()
    first = [cluster.run_dir / f"worker-{i}.jsonl" for i in range(len(workers))]
    start = None
    while any(w.poll() is None for w in workers) or pending:
        now = time.monotonic()
        if now > deadline:
            raise DeadlineExceeded(f"workers still running after {cfg.timeout_s:.0f}s")
        if start is None and pending and all(_trained(m) or w.poll() is not None for m, w in zip(first, workers)):
            start = now
            say("churn: every worker has trained a step; churn times count from here")
        while pending and start is not None and now - start >= pending[0][1]:
            action, _ = pending.pop(0)
            running = [i for i, w in enumerate(workers) if w.poll() is None]
            if action == "kill" and running:
                victim = running[-1]
                workers[victim].kill()
                killed.add(victim)
                say(f"churn: killed worker {victim} (SIGKILL) at {now - start:.1f}s")
            elif action == "add":
                workers.append(cluster.start_worker(len(workers), cfg))
                say(f"churn: started worker {len(workers) - 1} at {now - start:.1f}s")
        if not any(w.poll() is None for w in workers) and not any(a == "add" for a, _ in pending):
            break  # everyone finished (or was killed) and nothing is left to start
        time.sleep(0.05)
    for w in workers:
        w.wait()
    return killed


def start_view(cfg: UpConfig, cluster: Cluster):
    """The live view of the workers and shards while they train (psctl/upview.py), or None:
    --json, --view none. auto: redrawn in place when stdout is a terminal, else plain lines."""
    from shardps.psctl import upview
    kind = "none" if cfg.as_json else upview.choose(cfg.view, sys.stdout)
    if kind == "none":
        return None
    sampler = upview.Sampler(cluster.run_dir, lambda: upview.worker_procs(cluster.procs),
                             upview.ClusterProbe(cluster.scheduler_address),
                             None if cfg.epochs else cfg.steps, mode=cfg.job.mode)
    return upview.UpView(kind, sampler, sys.stdout).start()


def plot_curves(run_dir: pathlib.Path, out: str, report) -> None:
    from shardps.psctl import plot
    plot.run(sorted(str(p) for p in run_dir.glob("worker-*.jsonl")), out, report=report)


def run(cfg: UpConfig) -> int:
    from shardps.psctl import ops

    cfg = dataclasses.replace(cfg, eval_every=plot_eval_every(cfg, lambda: train_samples(cfg.model)))
    run_dir = pathlib.Path(cfg.run_dir or tempfile.mkdtemp(prefix="shardps-up-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(run_dir)
    t0 = time.time()
    say = (lambda *a: None) if cfg.as_json else (lambda *a: print(*a, flush=True))
    interrupted = None
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        address = cluster.start_scheduler(cfg.job)
        say(f"scheduler  {address}  (logs in {run_dir})")
        for shard in range(cfg.job.num_servers):
            say(f"server {shard}   {cluster.start_server(shard, server_flags(cfg))}")
        # the first workers start together: a sync job's early steps then average them all
        workers = [cluster.start_worker(i, cfg, min_workers=cfg.workers) for i in range(cfg.workers)]
        say(f"{cfg.workers} workers training {cfg.model} for "
            f"{f'{cfg.epochs} epochs' if cfg.epochs else f'{cfg.steps} steps'}, mode {cfg.job.mode}"
            + (f", held-out evaluation every {cfg.eval_every} steps" if cfg.eval_every else ""))
        view = start_view(cfg, cluster)
        try:
            killed = churn_and_wait(cluster, workers, cfg, view.say if view else say)
        except BaseException:
            if view:   # before psctl up's lines about stopping: the view draws nothing after this
                view.stop(final=False)
            raise
        if view:
            view.stop(final=True)   # the last state: every worker's final step
        results = []
        for i, w in enumerate(workers):
            rec = last_record(run_dir / f"worker-{i}.jsonl")
            results.append({"worker": i, "id": rec.get("worker"), "exit_code": w.returncode, "killed": i in killed,
                            "steps": rec.get("steps"), "eval_accuracy": rec.get("eval_accuracy"),
                            "eval_auc": rec.get("eval_auc"), "wall_s": rec.get("wall_s")})
        failed = [r for r in results if r["exit_code"] != 0 and not r["killed"]]
        final = evaluate_live(address, cfg.model)
        # the metric --min-accuracy bounds: accuracy, or for a click model the held-out AUC
        score_name, score = ("auc", final["eval_auc"]) if "eval_auc" in final else ("accuracy", final["eval_accuracy"])
        summary = {"run_dir": str(run_dir), "scheduler": address, "mode": cfg.job.mode,
                   "wall_s": round(time.time() - t0, 2), "eval_every": cfg.eval_every, "workers": results,
                   "final_accuracy": final.get("eval_accuracy"), "final_auc": final.get("eval_auc"),
                   "teacher_auc": final.get("teacher_auc"),
                   "status": ops.collect_status(address, 10.0),
                   "inspect": ops.collect_inspect(address, 10.0, None, 4)}
        if cfg.as_json:
            if cfg.plot:  # before the document, which it names; its line goes to stderr
                plot_curves(run_dir, cfg.plot, sys.stderr)
                summary["plot"] = cfg.plot
            print(json.dumps(summary, indent=2))
        else:
            print()
            print("$ psctl status --scheduler", address)
            print(ops.render_status(summary["status"]))
            print()
            print("$ psctl inspect --scheduler", address)
            print(ops.render_inspect(summary["inspect"]))
            print()
            for r in results:
                metric = (f"held-out AUC {r['eval_auc']}" if score_name == "auc"
                          else f"held-out accuracy {r['eval_accuracy']}")
                member = f" (id {r['id']} in psctl status)" if r["id"] is not None else ""
                print(f"worker {r['worker']}{member}: exit {r['exit_code']}, {r['steps']} steps, {metric}")
            teacher = f", teacher {summary['teacher_auc']:.4f}" if score_name == "auc" else ""
            print(f"final held-out {score_name} of the served parameters: {score:.4f}{teacher} "
                  f"({summary['wall_s']:.1f}s)")
            if cfg.plot:  # last: `make demo` ends with the curve's path
                plot_curves(run_dir, cfg.plot, sys.stdout)
        if score < cfg.min_accuracy:
            print(f"psctl up: final {score_name} {score:.4f} is below --min-accuracy "
                  f"{cfg.min_accuracy}", file=sys.stderr)
            return 1
        return 1 if failed else 0
    except KeyboardInterrupt as exc:  # Interrupted too
        interrupted = exc
        name = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
        print(f"psctl up: {name}: stopping the workers, then the servers, then the scheduler",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        try:
            cluster.stop(report=(lambda line: print(line, file=sys.stderr, flush=True)) if interrupted else None)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
