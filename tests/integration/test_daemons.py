"""Each role started by hand as its own `psctl` process (scheduler, 2 servers, 2 workers):
while they train, `psctl status` and `psctl inspect` describe the live cluster; afterwards each
worker's metrics file holds its step records and a final evaluation."""
from __future__ import annotations

import json
import signal

import pytest

from .helpers import MLP_PARAMS, assert_worker_metrics, inspect_json, poll, run_psctl, status_json, tensors_by_name

STEPS = 600           # with --step-delay, long enough to watch a few heartbeats go by
STEP_DELAY = "0.02"
HEARTBEAT = "3"       # workers report their clock every heartbeat_timeout / 3 = 1 s


@pytest.mark.slow
def test_daemons_by_hand(procs):
    sched = procs.scheduler("--mode", "async", "--servers", "2", "--heartbeat-timeout", HEARTBEAT)
    servers = [procs.server(sched.address, shard) for shard in range(2)]
    workers = [procs.worker(sched.address, i, STEPS, "--step-delay", STEP_DELAY, "--seed", str(i))
               for i in range(2)]

    def alive_clocks():
        st = status_json(sched.address)
        alive = {w["id"]: w["clock"] for w in st["workers"] if w["state"] == "alive"}
        return st, alive

    # both workers joined and have reported progress
    def both_training():
        for w in workers:
            assert w.running() or w.popen.returncode == 0, f"{w.name} failed:\n{w.log_text()[-3000:]}"
        st, alive = alive_clocks()
        return (st, alive) if len(alive) == 2 and all(c > 0 for c in alive.values()) else None
    st, first = poll(both_training, 180, interval_s=0.5, what="2 alive workers with clocks > 0")
    assert all(w.running() for w in workers), "workers finished before their clocks could be watched"

    assert st["mode"] == "async"
    assert sorted((s["shard"], s["address"], s["state"]) for s in st["servers"]) == \
        [(i, servers[i].address, "alive") for i in range(2)]
    assert st["keys"] == len(MLP_PARAMS)

    # clocks advance while they train (reported by heartbeats)
    def advanced():
        _, alive = alive_clocks()
        return alive if set(alive) == set(first) and all(alive[i] > first[i] for i in first) else None
    later = poll(advanced, 60, interval_s=0.5, what=f"clocks to advance past {first}")
    assert all(c <= STEPS for c in later.values())

    # every parameter is on exactly one shard, being trained
    tensors = tensors_by_name(inspect_json(sched.address))
    assert set(tensors) == set(MLP_PARAMS)
    for name, shape in MLP_PARAMS.items():
        assert tensors[name]["shape"] == shape and tensors[name]["dtype"] == "float32"
        assert tensors[name]["version"] > 0, tensors[name]

    for w in workers:
        assert w.wait(240) == 0, f"{w.name} exited {w.popen.returncode}:\n{w.log_text()[-3000:]}"
    finals = [assert_worker_metrics(w.metrics, STEPS) for w in workers]
    assert sorted(f["worker"] for f in finals) == sorted(first)
    for f in finals:
        assert f["eval_accuracy"] >= 0.9, f   # 1200 async updates of digits-mlp

    st = status_json(sched.address)
    assert {w["id"]: w["state"] for w in st["workers"]} == {i: "left" for i in first}
    # async applies every push exactly once
    for t in tensors_by_name(inspect_json(sched.address)).values():
        assert t["version"] == 2 * STEPS, t
    # the operator verbs as a person runs them print the same documents the helpers read in-process
    for verb, doc in (("status", st), ("inspect", inspect_json(sched.address))):
        r = run_psctl(verb, "--json", "--scheduler", sched.address, "--timeout", "10")
        assert r.returncode == 0, r.stderr
        printed = json.loads(r.stdout)
        assert printed.keys() == doc.keys()
        if verb == "status":
            def members(d):   # lease ages move between the two reads
                return [{k: v for k, v in w.items() if k != "lease_age_s"} for w in d["workers"]]
            assert members(printed) == members(doc) and printed["model_fingerprint"] == doc["model_fingerprint"]
        else:
            assert tensors_by_name(printed).keys() == tensors_by_name(doc).keys()


@pytest.mark.slow
def test_worker_signals_leave_at_once_and_exit_0(procs):
    """A worker stopped by SIGTERM (Kubernetes, systemd) or by Ctrl-C (SIGINT) leaves the
    membership itself: the scheduler shows it left, long before its 60 s lease could expire."""
    sched = procs.scheduler("--mode", "async", "--heartbeat-timeout", "60")
    procs.server(sched.address, 0)
    sigs = [signal.SIGTERM, signal.SIGINT]
    workers = [procs.worker(sched.address, i, 100_000, "--step-delay", STEP_DELAY) for i in range(len(sigs))]

    def training():
        for w in workers:
            assert w.running(), f"{w.name} exited {w.popen.returncode}:\n{w.log_text()[-3000:]}"
        members = status_json(sched.address)["workers"]
        return len(members) == len(workers) and all(m["clock"] > 0 and m["state"] == "alive" for m in members)
    poll(training, 180, interval_s=0.5, what="both workers to report progress")
    for w, sig in zip(workers, sigs):
        w.popen.send_signal(sig)
        expected = 130 if sig == signal.SIGINT else 0   # Ctrl-C is "interrupted"; SIGTERM a clean drain
        assert w.popen.wait(timeout=30) == expected, f"{sig.name}: {w.log_text()[-3000:]}"
        states = {m["name"].rsplit(":", 1)[1]: m for m in status_json(sched.address)["workers"]}
        member = states[str(w.pid)]
        assert member["state"] == "left", (sig.name, member)
        assert 0 < member["clock"] < 100_000
