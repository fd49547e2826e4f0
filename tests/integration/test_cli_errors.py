"""A bad flag or an unreachable address: exit code 2, one line on stderr, no traceback.

Fast tier: each case is one short `psctl` process; none starts a daemon.
"""
from __future__ import annotations

import pytest

from .helpers import run_psctl

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


@pytest.mark.parametrize("args,mentions", list(CASES.values()), ids=list(CASES))
def test_usage_error_is_one_line_exit_2(args, mentions):
    r = run_psctl(*args, timeout=90)
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one non-empty stderr line, got {lines!r}"
    assert mentions in lines[0], f"the message should name {mentions!r}: {lines[0]!r}"
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout == "", f"nothing belongs on stdout: {r.stdout!r}"
