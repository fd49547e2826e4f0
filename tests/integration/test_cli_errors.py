"""A bad flag (exit code 2) or an unreachable address (a runtime failure, exit code 1): one
line on stderr, no traceback.

Fast tier: each case is one short `psctl` process; none starts a daemon (the wrong-role test,
which starts a scheduler and a server, is in the slow tier).
"""
from __future__ import annotations

import re

import pytest

from .helpers import poll, run_psctl

CASES = {
    "worker-without-scheduler": (["worker"], "--scheduler"),
    "status-bad-address": (["status", "--scheduler", "notanaddress"], "notanaddress"),
    "scheduler-bogus-mode": (["scheduler", "--mode", "bogus"], "bogus"),
    "up-negative-staleness": (["up", "--mode", "ssp", "--staleness", "-1"], "staleness"),
    "status-unreachable": (["status", "--scheduler", "127.0.0.1:1", "--timeout", "2"], "127.0.0.1:1"),
    "inspect-unreachable": (["inspect", "--scheduler", "127.0.0.1:1", "--timeout", "2"], "127.0.0.1:1"),
    "worker-unwritable-metrics": (["worker", "--scheduler", "127.0.0.1:1", "--steps", "1",
                                   "--metrics-out", "/nonexistent-dir/m.jsonl"], "/nonexistent-dir/m.jsonl"),
    "scheduler-nesterov-without-momentum": (["scheduler", "--nesterov"], "nesterov"),
    "misspelt-codec-with-a-parameter": (["scheduler", "--push-codec", "tpok:0.01"], "did you mean 'topk'?"),
    "misspelt-pull-codec": (["scheduler", "--pull-codec", "bf61"], "did you mean 'bf16'?"),
}


RUNTIME_FAILURES = {"status-unreachable", "inspect-unreachable"}  # exit 1; every other case is usage, 2


@pytest.mark.parametrize("args,mentions,code", [(*v, 1 if k in RUNTIME_FAILURES else 2) for k, v in CASES.items()],
                         ids=list(CASES))
def test_usage_error_is_one_line_exit_2(args, mentions, code):
    r = run_psctl(*args, timeout=90)
    assert r.returncode == code, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one non-empty stderr line, got {lines!r}"
    assert mentions in lines[0], f"the message should name {mentions!r}: {lines[0]!r}"
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout == "", f"nothing belongs on stdout: {r.stdout!r}"


# -- a verb pointed at the wrong role says what it reached -----------------------------------
WRONG_ROLE_VERBS = {
    "status": ["status"], "inspect": ["inspect"], "checkpoint": ["checkpoint"],
    "export": ["export", "--out", "{tmp}/model.safetensors"],
    "worker": ["worker", "--steps", "1", "--no-progress"],
}


@pytest.mark.slow
def test_every_verb_names_the_role_it_reached_instead_of_the_scheduler(procs, tmp_path):
    sched = procs.scheduler("--servers", "1", "--metrics-port", "0")
    server = procs.server(sched.address, 0, "--metrics-port", "0")
    for verb, args in WRONG_ROLE_VERBS.items():
        argv = [a.format(tmp=tmp_path) for a in args] + ["--scheduler", server.address]
        r = run_psctl(*argv, "--timeout", "10") if verb != "worker" else run_psctl(*argv)
        assert r.returncode == 1, (verb, r.returncode, r.stderr)   # a runtime failure
        assert r.stderr.strip().splitlines()[-1] == (
            f"psctl: {server.address} is a shardps parameter server (shard 0); "
            "--scheduler wants the scheduler's gRPC address"), (verb, r.stderr)
        assert "Traceback" not in r.stderr
    metrics = metrics_address(sched)
    r = run_psctl("status", "--scheduler", metrics, "--timeout", "10")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"psctl: {metrics} is the Prometheus metrics endpoint of a shardps scheduler; "
        "--scheduler wants the scheduler's gRPC address"), r.stderr


def metrics_address(proc) -> str:
    """host:port of the /metrics endpoint a daemon logged at start-up."""
    found = poll(lambda: re.search(r"metrics on http://([0-9.]+:\d+)/metrics", proc.log_text()), 30,
                 what=f"{proc.name} to log its metrics address")
    return found.group(1)
