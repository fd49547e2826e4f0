"""Helpers for the integration tier: real `psctl` processes (fresh interpreters, never forks
of pytest).

`Procs` (the `procs` fixture in conftest.py) starts daemons and CLI commands as subprocesses,
each in its own session with its log under tmp_path, waits for ready files with a deadline,
and at teardown SIGTERMs then SIGKILLs every process group it started (so a `psctl up` takes
its own children with it), pass or fail.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from shardps.psctl import ops

READY_TIMEOUT_S = 120.0   # a daemon imports grpc (and a worker torch) on a busy 2-core box
CLI_TIMEOUT_S = 120.0     # one short CLI call (status, inspect)
STOP_GRACE_S = 15.0       # SIGTERM drains; past this, SIGKILL

MLP_PARAMS = {"0.weight": [128, 64], "0.bias": [128], "2.weight": [10, 128], "2.bias": [10]}


def poll(predicate, timeout_s: float = 30.0, interval_s: float = 0.2, what: str = "condition"):
    """Poll until `predicate()` is truthy (returns it); fail at the deadline. (The contract of
    tests/conftest.poll, which a test package cannot import by a relative name.)"""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def psctl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "shardps.psctl", *args]


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def run_psctl(*args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run one short psctl command to completion (its own session, killed on timeout)."""
    proc = subprocess.Popen(psctl_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=child_env(), text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"psctl {' '.join(args)} still running after {timeout}s\nstdout: {out}\nstderr: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Proc:
    """One started psctl process: its Popen, name and log file."""

    def __init__(self, name: str, popen: subprocess.Popen, log: pathlib.Path):
        self.name, self.popen, self.log = name, popen, log
        self.address = ""
        self.metrics: pathlib.Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float) -> int:
        """Wait for exit with a deadline; fail the test with the log tail otherwise."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout}s; log tail:\n{self.log_text()[-3000:]}")

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)


class Procs:
    """Starts psctl processes for one test and reaps them all at teardown."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.started: list[Proc] = []

    # -- generic ---------------------------------------------------------------------------
    def spawn(self, name: str, *args: str, stdout=None) -> Proc:
        """Start `psctl ARGS` in its own session; stderr (and stdout unless given) to NAME.log."""
        log = self.root / f"{name}.log"
        with open(log, "ab") as f:
            popen = subprocess.Popen(psctl_argv(*args), stdout=stdout if stdout is not None else f,
                                     stderr=f if stdout is not None else subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True)
        p = Proc(name, popen, log)
        self.started.append(p)
        return p

    def wait_ready(self, proc: Proc, ready: pathlib.Path, timeout: float = READY_TIMEOUT_S) -> str:
        def check():
            if ready.exists():
                text = ready.read_text().strip()
                if text:
                    return text
            if not proc.running():
                pytest.fail(f"{proc.name} exited with {proc.popen.returncode} before it was ready; "
                            f"log:\n{proc.log_text()[-3000:]}")
            return None
        proc.address = poll(check, timeout, interval_s=0.1, what=f"{proc.name} ready file {ready}")
        return proc.address

    # -- roles -----------------------------------------------------------------------------
    def scheduler(self, *job_flags: str, name: str = "scheduler") -> Proc:
        ready = self.root / f"{name}.addr"
        p = self.spawn(name, "scheduler", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
                       "--state-dir", str(self.root / f"{name}-state"), *job_flags)
        self.wait_ready(p, ready)
        return p

    def server(self, scheduler: str, shard: int, *extra: str) -> Proc:
        name = f"server-{shard}"
        ready = self.root / f"{name}.addr"
        p = self.spawn(name, "server", "--scheduler", scheduler, "--listen", "127.0.0.1:0",
                       "--shard-id", str(shard), "--ready-file", str(ready), *extra)
        self.wait_ready(p, ready)
        return p

    def worker(self, scheduler: str, index: int, steps: int, *extra: str, model: str = "digits-mlp") -> Proc:
        """Start a worker (not waited for); metrics go to worker-INDEX.jsonl (Proc.metrics)."""
        metrics = self.root / f"worker-{index}.jsonl"
        p = self.spawn(f"worker-{index}", "worker", "--scheduler", scheduler, "--model", model,
                       "--steps", str(steps), "--metrics-out", str(metrics), "--no-progress", *extra)
        p.metrics = metrics
        return p

    # -- teardown --------------------------------------------------------------------------
    def stop_all(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every process group still there, wait, then SIGKILL what is left."""
        for p in self.started:
            if p.running():
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace_s
        for p in self.started:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # the group may hold children (psctl up's cluster) even after the leader exited
            _kill_group(p.popen)
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


# -- reading the cluster through the CLI ---------------------------------------------------------
def status_json(scheduler: str, timeout: float = 10.0) -> dict:
    """`psctl status --json`'s document, gathered in this process over the same RPCs: tests poll
    it every half second, and a psctl process per poll (0.5 s of CPU to start) kept one of CI's
    two cores busy. The CLI itself is tested where its output is the point (test_cli_*)."""
    return json.loads(json.dumps(ops.collect_status(scheduler, timeout)))


def inspect_json(scheduler: str, timeout: float = 10.0) -> dict:
    """`psctl inspect --json`'s document, gathered in this process (see status_json)."""
    return json.loads(json.dumps(ops.collect_inspect(scheduler, timeout, None, 0)))


def tensors_by_name(inspect: dict) -> dict[str, dict]:
    """Every tensor of an inspect document by name, with the shard holding it added."""
    out = {}
    for s in inspect["shards"]:
        assert "error" not in s, f"shard {s['shard']} could not be inspected: {s.get('error')}"
        for t in s["tensors"]:
            assert t["name"] not in out, f"tensor {t['name']} listed by two shards"
            out[t["name"]] = dict(t, shard=s["shard"])
    return out


def read_metrics(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_worker_metrics(path: pathlib.Path, steps: int) -> dict:
    """A finished worker's metrics: one record per step 1..steps, then a final summary."""
    records = read_metrics(path)
    assert records, f"{path} is empty"
    final = records[-1]
    step_records = records[:-1]
    assert "eval_accuracy" in final, f"last record has no eval_accuracy: {final}"
    assert 0.0 <= final["eval_accuracy"] <= 1.0
    assert final["steps"] == steps
    assert [r["step"] for r in step_records] == list(range(1, steps + 1))
    for r in step_records:
        assert isinstance(r["loss"], float) and r["loss"] >= 0.0, r
    return final


def start_server(procs, sched: str, shard: int, name: str, *extra: str):
    """A server whose ready file is its own (Procs.server reuses server-I.addr, which a
    restarted shard must not read before it has rewritten it)."""
    ready = procs.root / f"{name}.addr"
    p = procs.spawn(name, "server", "--scheduler", sched, "--listen", "127.0.0.1:0",
                    "--shard-id", str(shard), "--ready-file", str(ready), *extra)
    procs.wait_ready(p, ready)
    return p


def newest_checkpoint(ckpt_dir: pathlib.Path, shard: int) -> dict | None:
    files = sorted((ckpt_dir / f"shard-{shard}").glob("ckpt-*.json"))
    return json.loads(files[-1].read_text()) if files else None
