"""Checkpoints that never stop, stall or lie, with real `psctl` processes and a real full disk.

The disk fills up by a file-size limit (RLIMIT_FSIZE) set on the running server with
prlimit(2): Python ignores SIGXFSZ, so every write past the limit fails with EFBIG inside
safetensors, exactly as a full filesystem would fail it (ENOSPC), and lifting the limit is
the disk coming back. The limit is far above the server's log and the checkpoint's JSON and
far below its tensors file. A worker's pushes come from a ShardClient in this process (no
torch to import).
"""
from __future__ import annotations

import json
import re
import resource
import signal
import urllib.request

import numpy as np
import pytest

from shardps.worker.client import ClientConfig, ShardClient

from .helpers import READY_TIMEOUT_S, poll, status_json

SHAPES = {"w": (256, 512)}                   # a 512 KiB tensors file (sgd: no optimizer state)
FSIZE_LIMIT = 128 << 10                      # bytes: the JSON and the log fit, the tensors do not
CKPT_EVERY = "0.5"
STOP_S = 60


def limit_file_size(pid: int, limit: int) -> None:
    """Set `pid`'s RLIMIT_FSIZE soft limit (its hard limit stays); skip where the platform or
    our privileges do not allow it."""
    if not hasattr(resource, "prlimit"):
        pytest.skip("resource.prlimit is Linux-only: no way to fill the disk of a running server")
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (min(limit, hard) if hard != resource.RLIM_INFINITY
                                                      else limit, hard))
    except PermissionError as exc:
        pytest.skip(f"cannot set RLIMIT_FSIZE on the server process ({exc}): no full disk to test with")


def newest_checkpoint(shard_dir) -> dict | None:
    files = sorted(shard_dir.glob("ckpt-*.json"))
    return json.loads(files[-1].read_text()) if files else None


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def metrics_port(proc) -> int:
    found = poll(lambda: re.search(r"metrics on http://[^:]+:(\d+)/metrics", proc.log_text()),
                 READY_TIMEOUT_S, what="the server's metrics port in its log")
    return int(found.group(1))


@pytest.fixture
def client_for():
    made = []

    def make(scheduler: str) -> ShardClient:
        c = ShardClient(ClientConfig(scheduler=scheduler, name="faults", retry_deadline_s=60,
                                     connect_timeout_s=READY_TIMEOUT_S))
        c.join()
        c.wait_for_servers()
        c.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
        made.append(c)
        return c
    yield make
    for c in made:
        c.leave()


def grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(int(np.prod(s))).astype(np.float32) for n, s in SHAPES.items()}


@pytest.mark.slow
def test_a_full_disk_costs_checkpoints_never_the_server(procs, client_for):
    ckpt = procs.root / "ckpt"
    shard_dir = ckpt / "shard-0"
    sched = procs.scheduler("--mode", "async")
    server = procs.server(sched.address, 0, "--checkpoint-dir", str(ckpt), "--checkpoint-every", CKPT_EVERY,
                          "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    port = metrics_port(server)
    client = client_for(sched.address)
    client.push(grads(0))
    poll(lambda: (newest_checkpoint(shard_dir) or {}).get("shard_version") == 1, what="a first checkpoint")

    # the disk is full: each interval tries, fails with the cause in the log, and is counted
    limit_file_size(server.pid, FSIZE_LIMIT)
    client.push(grads(1))
    poll(lambda: (metric(port, "shardps_server_checkpoint_failures_total") or 0) >= 2,
         what="two failed checkpoints counted on /metrics")
    failed = [line for line in server.log_text().splitlines() if "checkpoint" in line and "File too large" in line]
    assert failed and all(" ERROR " in line for line in failed), failed
    assert server.running() and "Traceback" not in server.log_text()
    assert newest_checkpoint(shard_dir)["shard_version"] == 1      # the newest is still a true one
    assert not list(shard_dir.glob(".*.tmp")), "a failed write leaves no temporary file behind"
    client.push(grads(2))                                           # training is not affected

    # the disk comes back: the next interval writes everything applied meanwhile
    limit_file_size(server.pid, resource.RLIM_INFINITY)
    poll(lambda: (newest_checkpoint(shard_dir) or {}).get("shard_version") == 3,
         what="a checkpoint at version 3 once the disk is back")
    assert metric(port, "shardps_server_checkpoints_total") >= 2

    # full again, then SIGTERM: the final checkpoint fails, the server still leaves, exits 1
    client.push(grads(3))
    limit_file_size(server.pid, FSIZE_LIMIT)
    server.popen.send_signal(signal.SIGTERM)
    assert server.wait(STOP_S) == 1, server.log_text()[-3000:]
    log = server.log_text()
    final = [line for line in log.splitlines() if "final checkpoint" in line]
    assert len(final) == 1 and " ERROR " in final[0] and "File too large" in final[0], final
    assert "Traceback" not in log
    assert [s["state"] for s in status_json(sched.address)["servers"]] == ["left"]
    assert newest_checkpoint(shard_dir)["shard_version"] == 3


@pytest.mark.slow
def test_unreadable_checkpoints_stop_psctl_server_unless_told(procs):
    ckpt = procs.root / "ckpt"
    shard_dir = ckpt / "shard-0"
    shard_dir.mkdir(parents=True)
    (shard_dir / "ckpt-00000001.json").write_text('{"format": "shardps-shard-checkp')
    (shard_dir / "ckpt-00000002.json").write_text('{"format": "shardps-shard-checkpoint/1", "extra": 1}')
    sched = procs.scheduler("--mode", "async")

    refused = procs.spawn("server-refused", "server", "--scheduler", sched.address, "--listen", "127.0.0.1:0",
                          "--shard-id", "0", "--checkpoint-dir", str(ckpt))
    assert refused.wait(READY_TIMEOUT_S) == 1, refused.log_text()   # a runtime failure, not usage
    lines = refused.log_text().splitlines()
    assert "Traceback" not in refused.log_text()
    named = [line for line in lines if "ckpt-00000001.json" in line]
    assert len(named) == 1 and len(lines) == 1, lines
    assert named[0].startswith("psctl: ") and "ckpt-00000002.json" in named[0]
    assert "unreadable" in named[0] and "--start-empty-if-unreadable" in named[0]
    assert [s["state"] for s in status_json(sched.address)["servers"]] == ["left"]

    empty = procs.server(sched.address, 0, "--checkpoint-dir", str(ckpt), "--start-empty-if-unreadable")
    assert "--start-empty-if-unreadable" in empty.log_text()
    assert [s["state"] for s in status_json(sched.address)["servers"]] == ["alive"]
    empty.popen.send_signal(signal.SIGTERM)
    assert empty.wait(STOP_S) == 0, empty.log_text()[-3000:]
    assert newest_checkpoint(shard_dir)["seq"] == 3    # the unreadable ones are left for the operator
    assert sorted(p.name for p in shard_dir.glob("ckpt-*.json")) == \
        ["ckpt-00000001.json", "ckpt-00000002.json", "ckpt-00000003.json"]
