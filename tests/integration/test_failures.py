"""Control-plane and shard failures with real processes: the scheduler killed (kill -9) and
restarted on the same address, a shard killed and restored from its checkpoints, a shard
drained with SIGTERM and restarted from its final checkpoint.

Observed from outside: `psctl status --json`, the checkpoint files, the workers' metrics
files, gRPC health and a probe Pull against a shard. Every wait polls with a deadline.
"""
from __future__ import annotations

import pathlib
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.pscommon.config import CodecConfig
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc

from .helpers import (assert_worker_metrics, newest_checkpoint, poll, read_metrics, run_psctl, start_server,
                      status_json)

HEARTBEAT_S = 3.0
START_S = 240           # workers import torch: slow on a loaded box
FINISH_S = 240
SLACK_S = 40


# -- helpers (this file's own; tests/integration/helpers.py is shared and left as is) --------
def pid_of(member: dict) -> int:
    return int(member["name"].rsplit(":", 1)[1])


def step_count(proc) -> int:
    """Steps a worker has recorded in its metrics file so far."""
    if proc.metrics is None or not proc.metrics.exists():
        return 0
    return sum(1 for r in read_metrics(proc.metrics) if "step" in r)


def check_running(procs_list) -> None:
    for p in procs_list:
        if not p.running() and p.popen.returncode != 0:
            pytest.fail(f"{p.name} exited {p.popen.returncode}:\n{p.log_text()[-3000:]}")


def wait_training(sched: str, workers, min_clock: int, timeout: float = START_S) -> dict:
    """Every worker an alive member with clock >= min_clock; returns the status."""
    pids = {w.pid for w in workers}

    def ready():
        for w in workers:
            assert w.running(), f"{w.name} exited early ({w.popen.returncode}):\n{w.log_text()[-3000:]}"
        st = status_json(sched)
        mine = [m for m in st["workers"] if m["state"] == "alive" and pid_of(m) in pids]
        if len(mine) == len(workers) and all(m["clock"] >= min_clock for m in mine):
            return st
        return None
    return poll(ready, timeout, interval_s=0.5, what=f"{len(workers)} workers at clock >= {min_clock}")


def wait_ok(worker, timeout: float = FINISH_S) -> None:
    rc = worker.wait(timeout)
    assert rc == 0, f"{worker.name} exited {rc}:\n{worker.log_text()[-3000:]}"


def server_entry(st: dict, shard: int) -> dict:
    found = [s for s in st["servers"] if s["shard"] == shard]
    assert len(found) == 1, st["servers"]
    return found[0]


def exported_accuracy(sched: str, out: pathlib.Path) -> float:
    import safetensors.torch

    from shardps.worker import data, models
    r = run_psctl("export", "--scheduler", sched, "--out", str(out))
    assert r.returncode == 0, f"psctl export failed ({r.returncode}): {r.stderr}"
    model = models.build("digits-mlp")
    model.load_state_dict(safetensors.torch.load_file(str(out)), strict=True)
    split = data.digits()
    return data.accuracy(model, split.x_test, split.y_test)


# -- 5. the scheduler: kill -9, restart on the same address with the same --state-dir -------
SCHED_STEPS = 300
SCHED_DELAY = "0.05"
JOB = ("--mode", "async", "--servers", "2", "--heartbeat-timeout", str(HEARTBEAT_S))


@pytest.mark.slow
def test_scheduler_killed_and_restarted(procs):
    sched = procs.scheduler(*JOB)
    for shard in range(2):
        procs.server(sched.address, shard)
    workers = [procs.worker(sched.address, i, SCHED_STEPS, "--step-delay", SCHED_DELAY, "--seed", str(i))
               for i in range(3)]
    before = wait_training(sched.address, workers, SCHED_STEPS // 6)
    ids = {w.name: next(m["id"] for m in before["workers"] if pid_of(m) == w.pid) for w in workers}
    servers_before = {s["shard"]: s["member_id"] for s in before["servers"]}

    sched.kill9()
    assert sched.popen.returncode == -9

    # training goes on without it: pulls and pushes do not involve the scheduler
    at_crash = {w.name: step_count(w) for w in workers}

    def trained_on():
        check_running(workers)
        return all(step_count(w) >= at_crash[w.name] + 10 for w in workers)
    poll(trained_on, 60, interval_s=0.2,
         what=f"10 more steps per worker while the scheduler is down ({at_crash})")
    assert all(w.running() for w in workers), "a worker finished while the scheduler was down"

    # the same address, the same state
    state_dir = procs.root / "scheduler-state"
    ready = procs.root / "scheduler-restarted.addr"
    again = procs.spawn("scheduler-restarted", "scheduler", "--listen", sched.address, "--ready-file",
                        str(ready), "--state-dir", str(state_dir), *JOB)
    assert procs.wait_ready(again, ready) == sched.address

    before_clock = {m["id"]: m["clock"] for m in before["workers"]}

    def reattached():
        check_running(workers)
        st = status_json(sched.address)
        alive = {m["id"]: m["clock"] for m in st["workers"] if m["state"] == "alive"}
        servers_ok = sorted((s["shard"], s["state"]) for s in st["servers"]) == [(0, "alive"), (1, "alive")]
        return st if servers_ok and set(alive) == set(ids.values()) and all(
            alive[i] > before_clock[i] for i in alive) else None
    after = poll(reattached, SLACK_S + 30, interval_s=0.5, what="members re-attached with advancing clocks")
    assert after["view"] >= before["view"], "the restarted scheduler resumed the membership view"
    assert {s["shard"]: s["member_id"] for s in after["servers"]} == servers_before

    for w in workers:
        wait_ok(w)
        assert_worker_metrics(w.metrics, SCHED_STEPS)

    final = status_json(sched.address)
    assert {m["id"]: m["state"] for m in final["workers"]} == {i: "left" for i in ids.values()}
    assert {s["shard"]: s["state"] for s in final["servers"]} == {0: "alive", 1: "alive"}
    assert final["view"] >= before["view"]
    for s in final["servers"]:
        # async applies every push once: the scheduler's absence lost nothing
        assert s["version"] == 3 * SCHED_STEPS, s
    assert again.running(), "the restarted scheduler is still serving"


# -- 6. a shard: kill -9, restart from its checkpoints; the other shard keeps serving --------
SHARD_STEPS = 300
SHARD_DELAY = "0.04"
CKPT_EVERY = "2"


def probe_shard(address: str, shard: int, fingerprint: str) -> tuple[int, int]:
    """(health status, shard version) from one health check and one real Pull on `shard`, as an
    observer (the shard takes gated pulls from members only)."""
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        req = ps_pb2.PullRequest(caller=ps_pb2.Caller(worker_id=0, incarnation=0, observer=True), shard=shard, step=0,
                                 codec=CodecConfig.parse("fp32").to_proto(), model_fingerprint=fingerprint)
        replies = list(ps_pb2_grpc.ParameterServerStub(ch).Pull(req, timeout=10))
    assert replies and replies[0].WhichOneof("body") == "header"
    assert sum(1 for r in replies if r.WhichOneof("body") == "chunk") >= 1
    return health.status, replies[0].header.shard_version


@pytest.mark.slow
@pytest.mark.parametrize("mode, checkpoints", [("async", True), ("sync", True), ("sync", False)],
                         ids=["async", "sync", "sync-no-checkpoint"])
def test_shard_killed_and_restored(procs, mode, checkpoints):
    """Restored from its checkpoint, the shard is behind the workers (sync: their step; async:
    their pushes since) and catches up; restarted with no checkpoint, it is re-seeded from the
    workers' freshest copy. Either way every worker finishes and the model reaches the bar.
    Not ssp: its restore behind the workers' clocks is tests/rpc/test_restart.py's, in-process,
    and a shard of ssp restarts from its checkpoint below (SIGTERM): the suite's time."""
    ckpt = procs.root / "ckpt"
    # sync applies one averaged update per step where async applies three: it gets half as
    # many steps again and a larger rate to reach the same bar
    steps = SHARD_STEPS * 3 // 2 if mode == "sync" else SHARD_STEPS
    lr = ("--lr", "0.5") if mode == "sync" else ()
    sched = procs.scheduler("--mode", mode, "--servers", "2", "--heartbeat-timeout", str(HEARTBEAT_S), *lr)
    flags = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", CKPT_EVERY)
    shard0 = procs.server(sched.address, 0, *flags)
    shard1 = procs.server(sched.address, 1, *(flags if checkpoints else ()))
    workers = [procs.worker(sched.address, i, steps, "--step-delay", SHARD_DELAY, "--seed", str(i))
               for i in range(3)]

    def checkpointed():
        st = wait_training(sched.address, workers, steps // 4)
        c = newest_checkpoint(ckpt, 1) if checkpoints else {"shard_version": 1}
        return st if c and c["shard_version"] > 0 else None
    before = poll(checkpointed, START_S, interval_s=0.5, what="training with a checkpoint of shard 1")
    fingerprint = before["model_fingerprint"]

    shard1.kill9()
    assert shard1.popen.returncode == -9
    if not checkpoints:
        restarted_empty_and_reseeded(procs, sched, workers, shard1, steps)
        return
    last_ckpt = newest_checkpoint(ckpt, 1)   # nothing writes there any more
    assert last_ckpt["shard"] == 1 and last_ckpt["shard_version"] > 0
    # sync: shard 0 settles the steps; shard 1 completes each one step later, when a worker
    # brings the outcome, so its checkpoint may hold the step shard 0 last completed still in
    # progress, which the outcome then completes. Two or more steps past the checkpoint, the
    # restored shard 1 must take the workers' step (on a slow box none may have completed)
    workers_ahead = server_entry(status_json(sched.address), 0).get("completed_step", 0) > \
        last_ckpt["gate"]["completed_step"] + 1

    # shard 0 keeps serving through the outage: SERVING, and real pulls answered with its values
    for _ in range(3):
        status, _ = probe_shard(shard0.address, 0, fingerprint)
        assert status == health_pb2.HealthCheckResponse.SERVING
    check_running(workers)

    shard1b = start_server(procs, sched.address, 1, "server-1-restarted", *flags)
    assert shard1b.address != shard1.address or shard1b.pid != shard1.pid

    def restored():
        check_running(workers)
        s = server_entry(status_json(sched.address), 1)
        return s if s["state"] == "alive" and s["address"] == shard1b.address and "version" in s else None
    s1 = poll(restored, SLACK_S, interval_s=0.5, what="shard 1 back at its new address")
    assert s1["version"] >= last_ckpt["shard_version"], (s1["version"], last_ckpt["shard_version"])
    assert "restored from" in shard1b.log_text()

    for w in workers:
        wait_ok(w)
        assert_worker_metrics(w.metrics, steps)

    final = status_json(sched.address)
    versions = {s["shard"]: s["version"] for s in final["servers"]}
    assert versions[1] >= last_ckpt["shard_version"]
    if mode == "async":
        assert versions[0] == 3 * steps, "shard 0 never lost an update"
    if mode == "sync":
        assert "resumes at step" in shard1b.log_text() or not workers_ahead, \
            "the restored shard did not take the workers' step"
    acc = exported_accuracy(sched.address, procs.root / "model.safetensors")
    assert acc >= 0.95, f"served parameters reach {acc:.4f} held-out accuracy"


def restarted_empty_and_reseeded(procs, sched, workers, shard1, steps):
    """Shard 1 comes back with no state: the workers re-seed it from the freshest copy."""
    shard1b = start_server(procs, sched.address, 1, "server-1-restarted")
    assert shard1b.address != shard1.address or shard1b.pid != shard1.pid
    for w in workers:
        wait_ok(w)
        assert_worker_metrics(w.metrics, steps)
    assert "re-seeded from worker" in shard1b.log_text()
    reseeded = [line for w in workers for line in w.log_text().splitlines() if "re-seeded from worker" in line]
    assert reseeded, "no worker logged the re-seed"
    with grpc.insecure_channel(shard1b.address) as ch:
        st = ps_pb2_grpc.ParameterServerStub(ch).ShardStatus(ps_pb2.ShardStatusRequest(), timeout=10)
    assert st.HasField("reseeded") and st.reseeded.offers >= 1 and st.shard_version > st.reseeded.version
    acc = exported_accuracy(sched.address, procs.root / "model.safetensors")
    assert acc >= 0.95, f"served parameters reach {acc:.4f} held-out accuracy"


# -- 7. SIGTERM drains a shard under full load: a final checkpoint, then a restart from it ----
DRAIN_STEPS = 250
DRAIN_DELAY = "0.04"


@pytest.mark.slow
# not async: its resume needs nothing of the mode (the drain and the final checkpoint are the
# same code), and test_shard_killed_and_restored[async] restarts an async shard: the suite's time
@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_shard_sigterm_under_load_drains_and_resumes(procs, mode):
    """The workers keep pushing and pulling (sync and ssp pulls wait at the gates) while shard 1
    drains: in-flight calls finish or get UNAVAILABLE (the gates let go of their waiters at
    once), the final checkpoint holds every update applied, and once a replacement restores it
    every worker finishes with nothing applied twice or lost."""
    ckpt = procs.root / "ckpt"
    # ssp ended once at 0.949 with the default rate: a larger one leaves margin at no cost in steps
    lr = {"sync": ("--lr", "0.5"), "ssp": ("--lr", "0.2")}.get(mode, ())
    sched = procs.scheduler("--mode", mode, "--servers", "2", "--heartbeat-timeout", str(HEARTBEAT_S), *lr)
    flags = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "30")
    procs.server(sched.address, 0, *flags)
    shard1 = procs.server(sched.address, 1, *flags)
    workers = [procs.worker(sched.address, i, DRAIN_STEPS, "--step-delay", DRAIN_DELAY, "--seed", str(i))
               for i in range(3)]
    wait_training(sched.address, workers, DRAIN_STEPS // 4)

    shard1.popen.send_signal(signal.SIGTERM)
    assert shard1.wait(60) == 0, f"drain exited {shard1.popen.returncode}:\n{shard1.log_text()[-3000:]}"
    final_ckpt = newest_checkpoint(ckpt, 1)
    assert final_ckpt is not None and final_ckpt["shard"] == 1 and final_ckpt["shard_version"] > 0
    assert "drained" in shard1.log_text()

    def left():
        check_running(workers)
        return server_entry(status_json(sched.address), 1)["state"] == "left"
    poll(left, SLACK_S, interval_s=0.5, what="the drained shard to leave the membership")

    # the workers run into the missing shard (UNAVAILABLE, retried) until it is back
    shard1b = start_server(procs, sched.address, 1, "server-1-restarted", *flags)

    def restored():
        check_running(workers)
        s = server_entry(status_json(sched.address), 1)
        return s if s["state"] == "alive" and "version" in s else None
    s1 = poll(restored, SLACK_S, interval_s=0.5, what="shard 1 back")
    assert s1["version"] >= final_ckpt["shard_version"]
    assert "restored from" in shard1b.log_text()

    for w in workers:
        wait_ok(w)
        assert_worker_metrics(w.metrics, DRAIN_STEPS)
        assert "Cancelled" not in w.log_text(), f"{w.name} saw a call cancelled by the drain"
    final = status_json(sched.address)
    versions = {s["shard"]: s["version"] for s in final["servers"] if s["state"] == "alive"}
    if mode == "sync":
        # one update per completed step, on both shards alike: the drain lost no contribution
        assert versions[0] == versions[1], versions
    else:
        # every acknowledged push applied once: nothing lost to the drain, nothing twice
        assert versions == {0: 3 * DRAIN_STEPS, 1: 3 * DRAIN_STEPS}, versions
