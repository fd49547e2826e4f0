"""Issue 17's first hour, through real `psctl` processes: `psctl status` names a shard that has
no server and shows rates over a recent window, pull wait, codec seconds and checkpoint age;
the scheduler logs joins, leaves, deaths and takeovers by role and shard; Ctrl-C on `psctl up`
stops the workers, then the servers, then the scheduler, with no refused connections or
cancelled calls in any log, and exits 130."""
from __future__ import annotations

import os
import pathlib
import re
import signal

import pytest

from shardps.psctl import ops

from .helpers import poll, run_psctl, status_json

STEP_DELAY = "0.02"
HEARTBEAT = "2"          # a killed server is dead 2 s later
TRAIN_S = 150.0          # a worker imports torch and joins on a busy 2-core box
DEATH_S = 30.0
ROW = "  {shard:>5} {state:<7} {address:<21} "
DETAILS = re.compile(r"        pull wait - \(async: pulls never wait\)  codec \d+\.\d{3} s push, "
                     r"\d+\.\d{3} s pull  no checkpoint yet")


def _status_lines(address: str, *flags: str) -> list[str]:
    r = run_psctl("status", "--scheduler", address, "--timeout", "10", *flags)
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stderr)
    return r.stdout.splitlines()


def _rows(lines: list[str], shard: int) -> list[str]:
    return [line for line in lines if line.startswith(f"  {shard:>5} ")]


def _after(lines: list[str], header: str) -> int:
    return lines.index(header) + 1


@pytest.mark.slow
def test_status_names_missing_shards_rates_and_details(procs):
    sched = procs.scheduler("--mode", "async", "--servers", "2", "--heartbeat-timeout", HEARTBEAT)
    s0 = procs.server(sched.address, 0)

    # shard 1: no server has registered yet
    lines = _status_lines(sched.address, "--rate-window", "0")
    assert "upd/s" not in "\n".join(lines) and not any(line.startswith("rates over") for line in lines)
    servers = _after(lines, "servers:")
    assert lines[servers] == (f"  {'shard':>5} {'state':<7} {'address':<21} {'keys':>5} {'bytes':>10} "
                              f"{'version':>8} {'stale':>6} {'wire':>6}")
    assert lines[servers + 1].startswith(ROW.format(shard=0, state="alive", address=s0.address))
    assert lines[servers + 2] == "        pull wait - (async: pulls never wait)  codec 0.000 s push, 0.000 s pull  no checkpoint yet"
    (missing,) = _rows(lines, 1)
    assert re.fullmatch(re.escape(ROW.format(shard=1, state="missing", address="-"))
                        + r"no server yet \(missing since the scheduler started, \d+ s ago\)", missing), missing
    st = status_json(sched.address)
    assert st["missing_shards"] == [1] and st["rate_window_s"] == 0.0
    assert [(v["shard"], v["state"]) for v in st["servers"]] == [(0, "alive"), (1, "missing")]

    # both shards served, one worker training: rates over a 1 s window
    s1 = procs.server(sched.address, 1)
    worker = procs.worker(sched.address, 0, 100_000, "--step-delay", STEP_DELAY)

    def training():
        assert worker.running(), worker.log_text()[-3000:]
        st = ops.collect_status(sched.address, 10.0, rate_window_s=0.5)
        alive = [w for w in st["workers"] if w["state"] == "alive"]
        return st if alive and all(v.get("rates") and v["rates"]["updates_per_s"] > 0 for v in st["servers"]) \
            and alive[0]["steps_per_s"] else None
    st = poll(training, TRAIN_S, interval_s=0.5, what="a worker training on both shards")
    assert st["missing_shards"] == [] and st["rate_window_s"] == 0.5
    (wid,) = [w["id"] for w in st["workers"]]

    lines = _status_lines(sched.address, "--rate-window", "1")
    assert lines[2:4] == ["", "rates over the last 1 s"]
    workers = _after(lines, "workers:")
    assert lines[workers] == f"  {'id':>3} {'inc':>4} {'state':<6} {'clock':>7} {'steps/s':>7} {'lease age':>9}  name"
    m = re.fullmatch(rf"  {wid:>3} +\d+ alive +\d+ +(\d+(?:\.\d)?) +\d+\.\ds  .+", lines[workers + 1])
    assert m and float(m.group(1)) > 0, lines[workers + 1]
    servers = _after(lines, "servers:")
    assert lines[servers] == (f"  {'shard':>5} {'state':<7} {'address':<21} {'keys':>5} {'bytes':>10} "
                              f"{'version':>8} {'upd/s':>7} {'stale':>6} {'wire':>6}")
    for i, s in enumerate((s0, s1)):
        row, details = lines[servers + 1 + 2 * i], lines[servers + 2 + 2 * i]
        m = re.fullmatch(re.escape(ROW.format(shard=i, state="alive", address=s.address))
                         + r" +\d+ +[\d.]+ K?i?B +\d+ +(\d+(?:\.\d)?) +\d+\.\d\d +1\.00x", row)
        assert m and float(m.group(1)) > 0, row
        assert DETAILS.fullmatch(details), details

    # the worker leaves (SIGTERM) before shard 1 goes: a worker waiting for a shard is not the point here
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.log_text()[-3000:]

    # shard 1's server killed: dead, then listed as such
    s1.kill9()
    poll(lambda: [v["state"] for v in status_json(sched.address)["servers"]] == ["alive", "dead"], DEATH_S,
         what="shard 1's server to miss its lease")
    lines = _status_lines(sched.address, "--rate-window", "0")
    dead = status_json(sched.address)["servers"][1]
    member = dead["member_id"]
    (row,) = _rows(lines, 1)
    assert re.fullmatch(re.escape(ROW.format(shard=1, state="dead", address=s1.address))
                        + rf"no server for \d+ s \(member {member} missed its lease; workers wait for this shard\)",
                        row), row
    assert dead["last_seen_age_s"] >= float(HEARTBEAT)   # how long it has been gone: at least its lease
    assert status_json(sched.address)["missing_shards"] == [1]

    # a new server takes shard 1 over
    ready = procs.root / "server-1b.addr"
    s1b = procs.spawn("server-1b", "server", "--scheduler", sched.address, "--listen", "127.0.0.1:0",
                      "--shard-id", "1", "--ready-file", str(ready))
    procs.wait_ready(s1b, ready)

    # the scheduler's log says who joined, died and took over, by role and shard
    log = sched.log_text()
    for pattern in (rf"INFO shardps\.scheduler\.core: server for shard 0 \(member 1\) registered at "
                    rf"{re.escape(s0.address)}: incarnation 1, view 1$",
                    rf"INFO shardps\.scheduler\.core: worker {wid} \(name [^)]+\) joined: incarnation \d+, view \d+$",
                    rf"INFO shardps\.scheduler\.core: worker {wid} \(name [^)]+\) left: incarnation \d+, clock \d+, "
                    r"view \d+$",
                    rf"WARNING shardps\.scheduler\.core: server for shard 1 \(member {member}\) missed its lease: "
                    r"dead, incarnation \d+, view \d+$",
                    rf"WARNING shardps\.scheduler\.core: server for shard 1 \(member {member}\) taken over at "
                    rf"{re.escape(s1b.address)}: incarnation \d+ replaces incarnation \d+ \(dead, at "
                    rf"{re.escape(s1.address)}\), view \d+$"):
        assert re.search(pattern, log, re.MULTILINE), (pattern, log[-3000:])


def _text(path: pathlib.Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.mark.slow
def test_up_ctrl_c_stops_workers_then_servers_then_scheduler(procs):
    run_dir = procs.root / "up"
    up = procs.spawn("up", "up", "--servers", "1", "--workers", "2", "--mode", "async", "--steps", "100000",
                     "--run-dir", str(run_dir))

    def training():
        assert up.running(), up.log_text()[-3000:]
        return all('"step"' in _text(run_dir / f"worker-{i}.jsonl") for i in range(2))
    poll(training, TRAIN_S, interval_s=0.3, what="both workers of psctl up to train a step")

    os.killpg(up.pid, signal.SIGINT)   # what a terminal's Ctrl-C does: the whole foreground group
    assert up.wait(60) == 130, up.log_text()[-3000:]

    tail = up.log_text().splitlines()[-4:]
    assert tail[0] == "psctl up: SIGINT: stopping the workers, then the servers, then the scheduler", tail
    assert re.fullmatch(r"stopped 2 workers \(worker-0, worker-1\) in \d+\.\d s", tail[1]), tail
    assert re.fullmatch(r"stopped 1 server \(server-0\) in \d+\.\d s", tail[2]), tail
    assert re.fullmatch(r"stopped the scheduler in \d+\.\d s", tail[3]), tail

    logs = {p.name: p.read_text(errors="replace") for p in sorted(run_dir.glob("*.log"))}
    assert set(logs) == {"scheduler.log", "server-0.log", "worker-0.log", "worker-1.log"}
    for name, text in logs.items():
        for bad in ("Connection refused", "Cancelled", "Traceback"):
            assert bad not in text, (name, bad, text[-3000:])
    for i in range(2):   # SIGTERM: each worker left and said where it stopped
        last = logs[f"worker-{i}.log"].strip().splitlines()[-1]
        assert re.fullmatch(r"worker \d+ stopped after \d+ of 100000 steps \(interrupted\)", last), last

    # the order as the scheduler saw it: both workers left before the server did
    lines = logs["scheduler.log"].splitlines()
    left = [(i, line) for i, line in enumerate(lines) if " left: incarnation " in line]
    assert [bool(re.search(r"INFO shardps\.scheduler\.core: worker \d+ \(name [^)]+\) left: incarnation \d+, "
                           r"clock \d+, view \d+$", line)) for _, line in left] == [True, True, False], left
    assert re.search(r"INFO shardps\.scheduler\.core: server for shard 0 \(member 1\) left: incarnation 1, "
                     r"view \d+$", left[2][1]), left
    assert lines[-1].endswith("INFO shardps: signal 15: draining"), lines[-3:]
