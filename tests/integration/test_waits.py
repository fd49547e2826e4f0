"""A worker that waits says what for, soon and again every few seconds, instead of going silent
until its connect timeout. Real processes through psctl; each case is a few seconds."""
from __future__ import annotations

import re

import pytest

from .helpers import poll

pytestmark = pytest.mark.slow

NOTICE_BY_S = 60.0  # the notice is due 2 s into a wait; the rest covers start-up (torch) on a loaded machine


def wait_for_line(proc, pattern: str, timeout_s: float) -> str:
    rx = re.compile(pattern)

    def seen():
        m = rx.search(proc.log_text())
        return m.group(0) if m else None
    return poll(seen, timeout_s, what=f"{proc.name} to log {pattern!r}")


def test_a_worker_names_the_shard_that_has_no_server(procs):
    sched = procs.scheduler("--servers", "2")
    procs.server(sched.address, 0)
    worker = procs.worker(sched.address, 0, 5)
    line = wait_for_line(worker, r"waiting for the servers: no live server for shard 1 \(1 of 2 registered\)"
                                 r" \(\d+ s so far, giving up after \d+ s; --connect-timeout\)", NOTICE_BY_S)
    assert "shard 0" not in line
    # the missing server arrives: the worker stops waiting and trains
    procs.server(sched.address, 1)
    assert worker.wait(timeout=120) == 0, worker.log_text()[-2000:]


def test_a_worker_names_the_scheduler_it_cannot_reach(procs):
    worker = procs.worker("127.0.0.1:9", 0, 5)  # the discard port: nothing of ours listens there
    wait_for_line(worker, r"waiting for the scheduler at 127\.0\.0\.1:9: .+ \(\d+ s so far", NOTICE_BY_S)
    assert worker.running()
    # SIGKILL: the quickest way out (SIGTERM also ends the wait now: tests/rpc/test_worker_waits.py)
    worker.kill9()
