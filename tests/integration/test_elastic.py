"""Elastic membership with real processes: workers killed (kill -9), added, paused past their
lease (SIGSTOP/SIGCONT) while a job trains, and `psctl up --churn`.

Everything is observed from outside: `psctl status --json` (membership, clocks, partition assignments),
the workers' metrics files and logs, `psctl export` for the served parameters. Each step
waits on a polled condition with a deadline; nothing sleeps to synchronise.
"""
from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import time

import pytest

from .helpers import assert_worker_metrics, poll, read_metrics, run_psctl, status_json

HEARTBEAT_S = 3.0
DEATH_SLACK_S = 40      # after a lease runs out: the reaper, a busy 2-core box, a status call
START_S = 240           # workers import torch: slow on a loaded box
FINISH_S = 240          # waiting for a worker to finish its steps


# -- helpers (this file's own; tests/integration/helpers.py is shared and left as is) --------
def pid_of(member: dict) -> int:
    """Workers are named host:pid by `psctl worker`."""
    return int(member["name"].rsplit(":", 1)[1])


def workers_by_id(st: dict) -> dict[int, dict]:
    return {m["id"]: m for m in st["workers"]}


def check_running(procs_list) -> None:
    """Fail at once (with the log) when a process we expect to be training has died."""
    for p in procs_list:
        if not p.running() and p.popen.returncode != 0:
            pytest.fail(f"{p.name} exited {p.popen.returncode}:\n{p.log_text()[-3000:]}")


def wait_members(sched: str, workers, min_clock: int, timeout: float = START_S) -> dict:
    """Poll until every process in `workers` is an alive member with clock >= min_clock;
    returns the status. Fails early if one of them exits."""
    pids = {w.pid for w in workers}

    def ready():
        for w in workers:
            assert w.running(), f"{w.name} exited early ({w.popen.returncode}):\n{w.log_text()[-3000:]}"
        st = status_json(sched)
        mine = [m for m in st["workers"] if m["state"] == "alive" and pid_of(m) in pids]
        if len(mine) == len(workers) and all(m["clock"] >= min_clock for m in mine):
            return st
        return None
    return poll(ready, timeout, interval_s=0.5,
                what=f"{len(workers)} alive workers at clock >= {min_clock}")


def member_of(st: dict, proc) -> dict:
    found = [m for m in st["workers"] if pid_of(m) == proc.pid]
    assert len(found) == 1, f"{proc.name} (pid {proc.pid}) is not one member: {st['workers']}"
    return found[0]


def wait_state(sched: str, member_id: int, state: str, timeout: float, what: str) -> dict:
    def check():
        st = status_json(sched)
        return st if workers_by_id(st)[member_id]["state"] == state else None
    return poll(check, timeout, interval_s=0.5, what=what)


def exported_accuracy(sched: str, out: pathlib.Path) -> float:
    """`psctl export` the served parameters, load them into a fresh digits-mlp, evaluate."""
    import safetensors.torch

    from shardps.worker import data, models
    r = run_psctl("export", "--scheduler", sched, "--out", str(out))
    assert r.returncode == 0, f"psctl export failed ({r.returncode}): {r.stderr}"
    model = models.build("digits-mlp")
    model.load_state_dict(safetensors.torch.load_file(str(out)), strict=True)
    split = data.digits()
    return data.accuracy(model, split.x_test, split.y_test)


def wait_ok(worker, timeout: float = FINISH_S) -> None:
    rc = worker.wait(timeout)
    assert rc == 0, f"{worker.name} exited {rc}:\n{worker.log_text()[-3000:]}"


# -- 1. async: kill -9 one worker a third of the way in, add one two thirds in ---------------
ASYNC_STEPS = 400
ASYNC_DELAY = "0.03"
ADDED_STEPS = 100


@pytest.mark.slow
def test_async_worker_killed_and_added(procs):
    sched = procs.scheduler("--mode", "async", "--servers", "2", "--heartbeat-timeout", str(HEARTBEAT_S))
    for shard in range(2):
        procs.server(sched.address, shard)
    workers = [procs.worker(sched.address, i, ASYNC_STEPS, "--step-delay", ASYNC_DELAY, "--seed", str(i))
               for i in range(3)]

    # all three joined and training: the start of training
    start = wait_members(sched.address, workers, 1)
    ids = {w.name: member_of(start, w)["id"] for w in workers}
    assert len(set(ids.values())) == 3

    # a third of the way in: kill -9 the newest member
    third = wait_members(sched.address, workers, ASYNC_STEPS // 3)
    victim = max(workers, key=lambda w: ids[w.name])
    victim_id = ids[victim.name]
    survivors = [w for w in workers if w is not victim]
    victim.kill9()
    assert victim.popen.returncode == -9

    dead = wait_state(sched.address, victim_id, "dead", HEARTBEAT_S + DEATH_SLACK_S,
                      "the killed worker to be declared dead")
    assert dead["view"] > third["view"], "a death bumps the membership view"

    # two thirds of the way in (the survivors' clocks): a new worker joins
    def two_thirds():
        check_running(survivors)
        st = status_json(sched.address)
        clocks = [m["clock"] for m in st["workers"] if m["id"] != victim_id]
        done = all(not w.running() for w in survivors)
        return st if done or min(clocks) >= 2 * ASYNC_STEPS // 3 else None
    poll(two_thirds, FINISH_S, interval_s=0.5, what="the survivors two thirds of the way")
    added = procs.worker(sched.address, 3, ADDED_STEPS, "--step-delay", ASYNC_DELAY, "--seed", "3")

    def joined():
        check_running([added])
        st = status_json(sched.address)
        found = [m for m in st["workers"] if pid_of(m) == added.pid]
        return st if found else None
    after_join = poll(joined, START_S, interval_s=0.5, what="the added worker to join")
    added_id = member_of(after_join, added)["id"]
    assert added_id not in ids.values(), "a new worker gets a new id"
    assert after_join["view"] > dead["view"], "a join bumps the membership view"
    assert after_join["view"] >= start["view"] + 2

    for w in survivors:
        wait_ok(w)
        assert_worker_metrics(w.metrics, ASYNC_STEPS)
    wait_ok(added)
    added_final = assert_worker_metrics(added.metrics, ADDED_STEPS)
    assert added_final["worker"] == added_id

    # the killed worker wrote step records but never its final summary
    victim_records = read_metrics(victim.metrics)
    assert victim_records and all("eval_accuracy" not in r for r in victim_records)

    acc = exported_accuracy(sched.address, procs.root / "model.safetensors")
    assert acc >= 0.95, f"served parameters reach {acc:.4f} held-out accuracy"

    final = status_json(sched.address)
    states = {m["id"]: m["state"] for m in final["workers"]}
    assert states == {**{ids[w.name]: "left" for w in survivors}, victim_id: "dead", added_id: "left"}
    assert final["view"] >= start["view"] + 2


# -- 2. partition assignments: exactly 2 epochs of 8 partitions, one worker killed mid-epoch -----------
EPOCHS = 2
PARTITIONS = 8
LEASE_DELAY = "0.3"       # about 2 s per partition (6 batches of 32)


def scheduler_state(procs) -> dict:
    """The scheduler's persisted record (written atomically on every change)."""
    return json.loads((procs.root / "scheduler-state" / "scheduler-state.json").read_text())


def partition_done_records(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in read_metrics(path) if r.get("event") == "partition_done"]


@pytest.mark.slow
def test_data_leases_survive_kill(procs):
    sched = procs.scheduler("--mode", "async", "--servers", "2", "--heartbeat-timeout", str(HEARTBEAT_S))
    for shard in range(2):
        procs.server(sched.address, shard)
    workers = [procs.worker(sched.address, i, 1, "--epochs", str(EPOCHS), "--partitions", str(PARTITIONS),
                            "--step-delay", LEASE_DELAY, "--seed", "0") for i in range(3)]

    # a victim: it has completed a partition (its metrics say so) and holds a lease now
    # (the scheduler's record says which). It is stopped while we look, so the lease we read
    # is the one it dies with.
    def pick_victim():
        check_running(workers)
        for w in workers:
            done = partition_done_records(w.metrics)
            if not done or not w.running():
                continue
            wid = done[0]["worker"]
            w.popen.send_signal(signal.SIGSTOP)
            try:
                data = scheduler_state(procs)["data"]
                held = [(int(p), h) for p, h in data["assigned"].items() if h[0] == wid]
                st = status_json(sched.address)          # also lets a reply in flight land
                data2 = scheduler_state(procs)["data"]
                held2 = [(int(p), h) for p, h in data2["assigned"].items() if h[0] == wid]
                if (held and held == held2 and data["epoch"] == data2["epoch"] < EPOCHS
                        and st["data"]["assigned"] >= 1):
                    return w, wid, data2["epoch"], held2[0][0], st
            except BaseException:
                w.popen.send_signal(signal.SIGCONT)
                raise
            w.popen.send_signal(signal.SIGCONT)  # no lease held now: try again
        return None
    victim, victim_id, lost_epoch, lost_partition, before = poll(
        pick_victim, START_S, interval_s=0.2, what="a worker with a finished partition and a lease")
    victim.kill9()
    assert victim.popen.returncode == -9
    victim_done = {(r["epoch"], r["partition"]) for r in partition_done_records(victim.metrics)}
    assert victim_done, "the victim completed a partition before it died"
    assert (lost_epoch, lost_partition) not in victim_done
    survivors = [w for w in workers if w is not victim]

    dead = wait_state(sched.address, victim_id, "dead", HEARTBEAT_S + DEATH_SLACK_S,
                      "the killed worker to be declared dead")
    assert dead["view"] > before["view"]

    for w in survivors:
        wait_ok(w)
        final_rec = read_metrics(w.metrics)[-1]
        assert "eval_accuracy" in final_rec, final_rec

    st = status_json(sched.address)
    d = st["data"]
    assert d["finished"] and d["epoch"] == EPOCHS and d["partitions"] == PARTITIONS, d
    history = {int(e): {int(p): w for p, w in parts.items()} for e, parts in d["history"].items()}
    assert sorted(history) == list(range(EPOCHS)), history
    for e in range(EPOCHS):
        assert sorted(history[e]) == list(range(PARTITIONS)), f"epoch {e}: {history[e]}"
    # the partition the victim held when it died was finished by a survivor
    assert history[lost_epoch][lost_partition] != victim_id, (lost_epoch, lost_partition, history)
    # (their ids from the final status: a survivor slow to start may not have joined yet when
    # the victim was picked)
    assert history[lost_epoch][lost_partition] in {member_of(st, w)["id"] for w in survivors}

    # the workers' own records agree: every partition once per epoch, by the one the scheduler names
    seen: dict[tuple[int, int], int] = {}
    for w in workers:
        for r in partition_done_records(w.metrics):
            key = (r["epoch"], r["partition"])
            assert key not in seen, f"partition {key} done twice: workers {seen[key]} and {r['worker']}"
            seen[key] = r["worker"]
    assert seen == {(e, p): w for e, parts in history.items() for p, w in parts.items()}


# -- 3. ssp: a worker paused past its lease is dropped, then rejoins as a new incarnation ----
STALENESS = 2
SSP_FAST_STEPS = 120
SSP_FAST_DELAY = "0.1"
SSP_SLOW_STEPS = 40
SSP_SLOW_DELAY = "0.3"    # the victim is the slowest: the gate holds the others to its clock


@pytest.mark.slow
def test_ssp_paused_worker_rejoins(procs):
    sched = procs.scheduler("--mode", "ssp", "--staleness", str(STALENESS), "--servers", "2",
                            "--heartbeat-timeout", str(HEARTBEAT_S))
    for shard in range(2):
        procs.server(sched.address, shard)
    victim = procs.worker(sched.address, 0, SSP_SLOW_STEPS, "--step-delay", SSP_SLOW_DELAY, "--seed", "0")
    others = [procs.worker(sched.address, i, SSP_FAST_STEPS, "--step-delay", SSP_FAST_DELAY, "--seed", str(i))
              for i in (1, 2)]
    workers = [victim, *others]

    before = wait_members(sched.address, workers, 5)
    vm = member_of(before, victim)
    victim_id, old_inc = vm["id"], vm["incarnation"]

    victim.popen.send_signal(signal.SIGSTOP)  # longer than the lease
    try:
        # its own clock, frozen: the last step it recorded (a push in flight adds at most one)
        steps = [r for r in read_metrics(victim.metrics) if "step" in r]
        stopped_clock = steps[-1]["clock"] if steps else 0

        dead = wait_state(sched.address, victim_id, "dead", HEARTBEAT_S + DEATH_SLACK_S,
                          "the paused worker to be declared dead")
        assert dead["view"] > before["view"]

        # while it was alive at stopped_clock the gate kept the others at or below
        # stopped_clock + 1 + staleness + 1; past that, the gate released them
        bound = stopped_clock + STALENESS + 3

        def released():
            check_running(others)
            st = status_json(sched.address)
            ws = workers_by_id(st)
            assert ws[victim_id]["state"] == "dead", ws[victim_id]
            clocks = [m["clock"] for m in st["workers"] if m["id"] != victim_id]
            return st if all(c >= bound for c in clocks) else None
        poll(released, DEATH_SLACK_S + 30, interval_s=0.5,
             what=f"the others' clocks to pass {bound} (stopped at {stopped_clock})")
    finally:
        victim.popen.send_signal(signal.SIGCONT)

    # it comes back: old-incarnation calls refused, rejoined under its id, new incarnation
    def rejoined():
        check_running(workers)
        st = status_json(sched.address)
        m = workers_by_id(st)[victim_id]
        return st if m["incarnation"] > old_inc and m["state"] in ("alive", "left") else None
    back = poll(rejoined, 60, interval_s=0.5, what="the paused worker to rejoin")
    assert workers_by_id(back)[victim_id]["state"] == "alive", workers_by_id(back)[victim_id]
    assert pid_of(workers_by_id(back)[victim_id]) == victim.pid
    assert back["view"] > dead["view"]

    wait_ok(victim)
    log = victim.log_text()
    # a call under the old incarnation was refused (heartbeat, pull or push: whichever came first)
    # (the scheduler names a "member", the shards a "worker")
    refusal = re.compile(rf"(heartbeat|pull|push) refused: .*(member|worker) {victim_id} incarnation {old_inc} "
                         r"(is not current|was declared dead or left|is dead); rejoin")
    assert refusal.search(log), log[-3000:]
    assert f"worker {victim_id} rejoined as incarnation" in log, log[-3000:]
    final_v = assert_worker_metrics(victim.metrics, SSP_SLOW_STEPS)
    assert final_v["worker"] == victim_id
    for w in others:
        wait_ok(w)
        assert_worker_metrics(w.metrics, SSP_FAST_STEPS)

    final = status_json(sched.address)
    assert {m["state"] for m in final["workers"]} == {"left"}
    assert len(final["workers"]) == 3, "the victim came back under its own id"
    assert workers_by_id(final)[victim_id]["incarnation"] > old_inc


GATE_SLOW_DELAY = "20"   # the slow worker's step: much longer than the paused worker's lease and its detection on a loaded box
GATE_FAST_STEPS = 10


@pytest.mark.slow
def test_ssp_paused_in_gate_rejoins(procs):
    """The rejoin policy when the pause catches a worker waiting in the SSP gate: a fast
    worker held back by a slow one (which keeps its lease) is paused there and declared dead
    before the slow one moves, so its waiting pull is refused. Resumed, it must rejoin under
    a new incarnation and finish, as a worker whose push is refused does."""
    sched = procs.scheduler("--mode", "ssp", "--staleness", str(STALENESS), "--servers", "2",
                            "--heartbeat-timeout", str(HEARTBEAT_S))
    for shard in range(2):
        procs.server(sched.address, shard)
    slow = procs.worker(sched.address, 0, 50, "--step-delay", GATE_SLOW_DELAY, "--seed", "0")
    wait_members(sched.address, [slow], 0)   # joined first: the fast one cannot run alone
    fast = procs.worker(sched.address, 1, GATE_FAST_STEPS, "--step-delay", "0.02", "--seed", "1")
    before = wait_members(sched.address, [slow, fast], 0)
    fast_id, old_inc = member_of(before, fast)["id"], member_of(before, fast)["incarnation"]

    def steps_of(w) -> list[dict]:
        return [r for r in read_metrics(w.metrics) if "step" in r] if w.metrics.exists() else []

    # pause it just after a push of the slow worker, once it waits in the gate again (clock =
    # slow + staleness + 1): the slow worker's next push is a whole step (10 s) away. Not
    # before the slow worker's first push: when that comes is not known (its step began
    # while the fast one started)
    seen = {"n": -1, "at": 0.0}

    def at_gate():
        check_running([slow, fast])
        fs, ss = steps_of(fast), steps_of(slow)
        if len(ss) != seen["n"]:
            seen["n"], seen["at"] = len(ss), time.monotonic()
        slow_clock = ss[-1]["clock"] if ss else 0
        fresh = time.monotonic() - seen["at"] < 2.0
        return fresh and ss and fs and fs[-1]["clock"] >= slow_clock + STALENESS + 1 and len(fs) < GATE_FAST_STEPS
    poll(at_gate, 120, interval_s=0.05, what="the fast worker to wait in the gate after a slow push")
    slow_steps = seen["n"]
    fast.popen.send_signal(signal.SIGSTOP)
    try:
        wait_state(sched.address, fast_id, "dead", HEARTBEAT_S + DEATH_SLACK_S, "the paused worker dead")
        # the slow worker did not move meanwhile: the gate never admitted the waiting pull
        assert len(steps_of(slow)) == slow_steps, "the slow worker stepped: the scenario did not happen"
    finally:
        fast.popen.send_signal(signal.SIGCONT)

    def rejoined():
        if not fast.running() and fast.popen.returncode != 0:
            slow.kill9()   # it sleeps through its 10 s step: do not make teardown wait for it
            raise AssertionError(f"resumed worker exited {fast.popen.returncode}:\n{fast.log_text()[-3000:]}")
        check_running([slow])
        m = workers_by_id(status_json(sched.address))[fast_id]
        return m if m["incarnation"] > old_inc and m["state"] in ("alive", "left") else None
    poll(rejoined, 60, interval_s=0.5, what="the paused worker to rejoin")
    slow.popen.send_signal(signal.SIGTERM)   # the straggler leaves: nothing holds the gate
    wait_ok(fast)
    assert f"worker {fast_id} rejoined as incarnation" in fast.log_text()
    assert_worker_metrics(fast.metrics, GATE_FAST_STEPS)
    wait_ok(slow)


# -- 4. psctl up --churn ----------------------------------------------------------------------
# ssp keeps every worker within `staleness` clocks of worker 0, the one `up` slows down, so all
# of them are mid-run from their first step until about UP_STEPS * UP_DELAY seconds later
UP_STEPS = 160
UP_DELAY = "0.12"
# seconds after every worker trained its first step (psctl up counts churn from there, however
# long torch took to start): mid-run, with most of the 19 s of steps still to come
KILL_AT, ADD_AT = 6, 8
UP_WAIT_S = 280


def run_up(procs, name: str, *args: str, as_json: bool = True) -> tuple[int, str, pathlib.Path, str]:
    """Run `psctl up ... --run-dir` to completion; (exit code, stdout, run dir, logs)."""
    run_dir = procs.root / name
    out = procs.root / f"{name}.out"
    with open(out, "wb") as f:
        p = procs.spawn(name, "up", *args, *(["--json"] if as_json else []), "--run-dir", str(run_dir),
                        stdout=f)
    try:
        rc = p.popen.wait(timeout=UP_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"psctl up still running after {UP_WAIT_S}s; logs in {run_dir}")
    logs = "\n".join(f"--- {q.name}\n{q.read_text(errors='replace')[-1500:]}"
                     for q in sorted(run_dir.glob("*.log"))) if run_dir.exists() else ""
    return rc, out.read_text(), run_dir, f"{p.log_text()[-2000:]}\n{logs}"


@pytest.mark.slow
def test_up_churn(procs):
    rc, out, run_dir, logs = run_up(
        procs, "up", "--servers", "2", "--workers", "3", "--mode", "ssp", "--staleness", str(STALENESS),
        "--heartbeat-timeout", str(HEARTBEAT_S), "--steps", str(UP_STEPS), "--step-delay", UP_DELAY,
        "--churn", f"kill@{KILL_AT},add@{ADD_AT}", "--timeout", "240")
    assert rc == 0, f"psctl up exited {rc}\n{logs}"
    summary = json.loads(out)

    results = summary["workers"]
    assert [r["worker"] for r in results] == [0, 1, 2, 3], results
    killed = [r for r in results if r["killed"]]
    assert len(killed) == 1, results
    assert killed[0]["exit_code"] == -9, killed
    # killed mid-run: it had trained some steps and never wrote its final summary
    victim_records = read_metrics(run_dir / f"worker-{killed[0]['worker']}.jsonl")
    assert any("step" in r for r in victim_records), f"killed before its first step\n{logs}"
    assert all("eval_accuracy" not in r for r in victim_records)
    assert len([r for r in victim_records if "step" in r]) < UP_STEPS

    added = results[3]
    assert not added["killed"] and added["exit_code"] == 0 and added["steps"] == UP_STEPS, added
    assert 0.0 <= added["eval_accuracy"] <= 1.0
    for r in results:
        if not r["killed"]:
            assert r["exit_code"] == 0 and r["steps"] == UP_STEPS, r

    st = summary["status"]
    assert sorted(m["state"] for m in st["workers"]) == ["dead", "left", "left", "left"], st["workers"]


@pytest.mark.slow
def test_up_churn_add_after_killing_the_last_worker(procs):
    """kill@1 takes the only worker mid-run (up slows worker 0 alone: its 20 steps take at
    least 5 s, where unslowed they ended before the kill), add@2 must still start a new one
    that trains the job to the end."""
    rc, out, run_dir, logs = run_up(
        procs, "up-last", "--servers", "1", "--workers", "1", "--mode", "async", "--steps", "20",
        "--step-delay", "0.25",
        "--churn", "kill@1,add@2", "--timeout", "200", as_json=False)
    assert "churn: killed worker 0" in out, f"{out}\n{logs}"
    assert "churn: started worker 1" in out, f"the add@2 event never ran (exit {rc}):\n{out}\n{logs}"
    assert rc == 0, f"psctl up exited {rc}\n{out}\n{logs}"
    assert re.search(r"^worker 1 \(id \d+ in psctl status\): exit 0, 20 steps", out, re.MULTILINE), out
