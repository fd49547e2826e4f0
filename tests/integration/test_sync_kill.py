"""sync mode survives a worker's kill -9: once its lease runs out (heartbeat timeout 3 s) the
barrier stops waiting for it, within the timeout plus a bounded slack of the kill, and the
other two workers finish their steps."""
from __future__ import annotations

import time

import pytest

from .helpers import assert_worker_metrics, poll, status_json

HEARTBEAT_S = 3.0
STEPS = 90             # at ~0.2 s a step, each worker trains for 18 s or more
STEP_DELAY = "0.2"
KILL_AT_CLOCK = 20
# kill -> the survivors step again: the lease (3 s), then the reaper (0.2 s), the watch stream,
# the gate, three steps of 0.2 s and a status poll; the rest is room for a busy 2-core box
RELEASE_SLACK_S = 15


@pytest.mark.slow
def test_sync_barrier_releases_after_kill(procs):
    sched = procs.scheduler("--mode", "sync", "--servers", "2", "--heartbeat-timeout", str(HEARTBEAT_S))
    for shard in range(2):
        procs.server(sched.address, shard)
    workers = [procs.worker(sched.address, i, STEPS, "--step-delay", STEP_DELAY, "--seed", str(i))
               for i in range(3)]
    by_pid = {w.pid: w for w in workers}

    def pid_of(member: dict) -> int:
        return int(member["name"].rsplit(":", 1)[1])   # workers are named host:pid

    def all_past_kill_clock():
        for w in workers:
            assert w.running(), f"{w.name} exited early ({w.popen.returncode}):\n{w.log_text()[-3000:]}"
        st = status_json(sched.address)
        alive = [m for m in st["workers"] if m["state"] == "alive"]
        if len(alive) == 3 and all(m["clock"] >= KILL_AT_CLOCK for m in alive):
            return st
        return None
    before = poll(all_past_kill_clock, 240, interval_s=0.5, what=f"3 workers at clock >= {KILL_AT_CLOCK}")
    assert {pid_of(m) for m in before["workers"]} == set(by_pid)

    # kill -9 the worker that joined last (the others have the most steps left either way)
    victim_member = max(before["workers"], key=lambda m: m["id"])
    victim = by_pid[pid_of(victim_member)]
    survivors = [w for w in workers if w is not victim]
    victim.kill9()
    killed_at = time.monotonic()
    assert victim.popen.returncode == -9

    def left_of_bound() -> float:
        return max(0.5, killed_at + HEARTBEAT_S + RELEASE_SLACK_S - time.monotonic())

    # its lease expires: dead, and the membership view moves
    def victim_dead():
        st = status_json(sched.address)
        states = {m["id"]: m for m in st["workers"]}
        return st if states[victim_member["id"]]["state"] == "dead" else None
    dead = poll(victim_dead, left_of_bound(), interval_s=0.5,
                what="the killed worker to be dead")
    assert dead["view"] > before["view"]
    at_death = {m["id"]: m["clock"] for m in dead["workers"] if m["id"] != victim_member["id"]}

    # the barrier no longer waits for it: the survivors' clocks go on (or they finished and left)
    def released():
        st = status_json(sched.address)
        others = [m for m in st["workers"] if m["id"] != victim_member["id"]]
        return all((m["state"] == "alive" and m["clock"] >= at_death[m["id"]] + 3) or m["state"] == "left"
                   for m in others)
    poll(released, left_of_bound(), interval_s=0.5,
         what=f"survivors' clocks to pass {at_death} within {HEARTBEAT_S + RELEASE_SLACK_S:.0f}s of the kill")

    for w in survivors:
        assert w.wait(240) == 0, f"{w.name} exited {w.popen.returncode}:\n{w.log_text()[-3000:]}"
        assert_worker_metrics(w.metrics, STEPS)

    final = status_json(sched.address)
    states = {m["id"]: m["state"] for m in final["workers"]}
    assert states.pop(victim_member["id"]) == "dead"
    assert set(states.values()) == {"left"}
    assert final["view"] > dead["view"]   # the survivors left after the death
