"""A cluster spread over network namespaces, one per host, on a virtual bridge: a worker's
cable is pulled mid-training.

    hub: br0 --+-- scheduler 10.231.0.1:7000
               +-- server0   10.231.0.11:7100   server1 10.231.0.12:7100
               +-- worker0   10.231.0.21        worker1 10.231.0.22   worker2 10.231.0.23

Each daemon is a real `psctl` process started with `ip netns exec`; the only way between two
of them is the bridge. While async workers train, worker2's bridge port goes down (no RST, no
FIN: silence). The scheduler must declare it dead (state dead, membership view up) after its
heartbeat lease runs out, and the others must keep training and finish with a well-trained
model, the bytes they report sending having crossed their own links. Then either the cut
worker is killed (it retries into the void), or its cable goes back in and it rejoins under
a new incarnation and finishes.

Root only (skips with the reason otherwise); every process and namespace is removed in a
finalizer, pass or fail.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import time

import pytest

from . import netns
from .helpers import (MLP_PARAMS, Proc, Procs, assert_worker_metrics, child_env, poll,
                      psctl_argv)

HOSTS = {"scheduler": 1, "server0": 11, "server1": 12, "worker0": 21, "worker1": 22, "worker2": 23}
WORKERS = ["worker0", "worker1", "worker2"]
CUT = "worker2"
SCHED_PORT, SERVER_PORT = 7000, 7100
HEARTBEAT_S = 3.0               # workers heartbeat every 1 s; 3 s of silence and the lease is gone
DEAD_MARGIN_S = 30.0            # a busy 2-core box: generous, and never a timing assertion
STEPS = 1500                    # digits-mlp: two workers' async updates reach >= 0.95 held out
STEP_DELAY = "0.01"             # stretches the run to tens of seconds so the cut lands mid-way
FINISH_TIMEOUT_S = 400.0
READY_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 60.0
# one push carries at least the two weight matrices in fp32 (biases may travel as bf16)
MIN_PUSH_BYTES = 4 * sum(s[0] * s[1] for s in MLP_PARAMS.values() if len(s) == 2)


class NetProcs(Procs):
    """helpers.Procs whose processes run inside the namespaces of a VirtualNet."""

    def __init__(self, root: pathlib.Path, net: netns.VirtualNet):
        super().__init__(root)
        self.net = net

    def spawn_in(self, host: str, name: str, *args: str) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "ab") as f:
            # `ip netns exec` execs psctl in place: this pid and group are psctl's own
            popen = subprocess.Popen(self.net.argv(host, psctl_argv(*args)), stdout=f,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=child_env(), start_new_session=True)
        p = Proc(name, popen, log)
        self.started.append(p)
        return p

    def daemon_in(self, host: str, role: str, *args: str) -> Proc:
        ready = self.root / f"{host}.addr"
        p = self.spawn_in(host, host, role, "--ready-file", str(ready), *args)
        self.wait_ready(p, ready, READY_TIMEOUT_S)
        return p

    def psctl_in(self, host: str, *args: str, timeout: float = STATUS_TIMEOUT_S) -> subprocess.CompletedProcess:
        """One short psctl command inside `host`'s namespace, killed at the deadline."""
        proc = subprocess.Popen(self.net.argv(host, psctl_argv(*args)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=child_env(),
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"psctl {' '.join(args)} in {host} still running after {timeout}s: {err}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def vnet(tmp_path):
    """(VirtualNet, NetProcs): the namespaces exist; at teardown every process is stopped,
    then every namespace deleted, pass or fail."""
    reason = netns.unavailable_reason()
    if reason:
        print(f"\nskipping the network-namespace test: {reason}")
        pytest.skip(reason)
    stale = netns.sweep_stale()
    if stale:
        print(f"\nremoved namespaces left by a killed earlier run: {stale}")
    net = netns.VirtualNet(HOSTS)
    net.create()
    procs = NetProcs(tmp_path / "procs", net)
    try:
        yield net, procs
    finally:
        try:
            procs.stop_all()
        finally:
            left = net.destroy()
        ours = [ns for ns in netns.list_namespaces() if ns.startswith(net.tag + "-")]
        assert not left and not ours, f"namespaces left behind: {left or ours}"


class Cluster:
    """Scheduler and two servers in their namespaces; workers started on demand."""

    def __init__(self, net: netns.VirtualNet, procs: NetProcs):
        self.net, self.procs = net, procs
        self.scheduler = net.addr("scheduler", SCHED_PORT)
        sched = procs.daemon_in("scheduler", "scheduler", "--listen", self.scheduler, "--servers", "2",
                                "--mode", "async", "--heartbeat-timeout", str(HEARTBEAT_S),
                                "--state-dir", str(procs.root / "scheduler-state"))
        assert sched.address == self.scheduler
        for i in range(2):
            s = procs.daemon_in(f"server{i}", "server", "--scheduler", self.scheduler,
                                "--listen", net.addr(f"server{i}", SERVER_PORT), "--shard-id", str(i))
            assert s.address == net.addr(f"server{i}", SERVER_PORT)  # what it advertises
        self.workers: dict[str, Proc] = {}

    def start_worker(self, host: str, seed: int) -> Proc:
        metrics = self.procs.root / f"{host}.jsonl"
        w = self.procs.spawn_in(host, host, "worker", "--scheduler", self.scheduler, "--model", "digits-mlp",
                                "--steps", str(STEPS), "--step-delay", STEP_DELAY, "--seed", str(seed),
                                "--metrics-out", str(metrics), "--no-progress")
        w.metrics = metrics
        self.workers[host] = w
        return w

    def status(self) -> dict:
        r = self.procs.psctl_in("scheduler", "status", "--json", "--scheduler", self.scheduler,
                                "--timeout", "10")
        assert r.returncode == 0, f"psctl status failed ({r.returncode}): {r.stderr}"
        return json.loads(r.stdout)

    def healthy(self, hosts) -> None:
        """Fail at once, with its log, if one of `hosts` exited with an error."""
        for h in hosts:
            w = self.workers[h]
            assert w.running() or w.popen.returncode == 0, \
                f"{h} exited {w.popen.returncode}:\n{w.log_text()[-3000:]}"

    def by_host(self, st: dict) -> dict[str, dict]:
        """Status entries of our workers by host (a worker's name ends with its pid, which
        `ip netns exec` keeps)."""
        pids = {w.pid: h for h, w in self.workers.items()}
        out = {}
        for entry in st["workers"]:
            pid = entry["name"].rpartition(":")[2]
            if pid.isdigit() and int(pid) in pids:
                out[pids[int(pid)]] = entry
        return out

    def all_training(self) -> tuple[dict, dict[str, dict]]:
        """Poll until every started worker is alive with a clock > 0; (status, by host)."""
        hosts = list(self.workers)

        def check():
            self.healthy(hosts)
            st = self.status()
            ws = self.by_host(st)
            ok = len(ws) == len(hosts) and all(e["state"] == "alive" and e["clock"] > 0 for e in ws.values())
            return (st, ws) if ok else None
        st, ws = poll(check, READY_TIMEOUT_S + 60, interval_s=0.5,
                      what=f"{len(hosts)} alive workers with clocks > 0")
        assert st["mode"] == "async"
        # the shard map points at the namespace addresses, and nothing routes anywhere else
        assert sorted((s["shard"], s["address"], s["state"]) for s in st["servers"]) == \
            [(i, self.net.addr(f"server{i}", SERVER_PORT), "alive") for i in range(2)]
        for host in HOSTS:
            assert self.net.routes(host) == [f"{netns.SUBNET}.0/24 dev eth0 proto kernel scope link "
                                             f"src {self.net.ip(host)}"], f"{host} reaches more than the bridge"
        return st, ws

    def advance_past(self, since: dict[str, dict], hosts) -> dict[str, dict]:
        """Poll until each of `hosts` is alive with a clock beyond `since`."""
        def check():
            self.healthy(hosts)
            ws = self.by_host(self.status())
            ok = all(ws[h]["state"] == "alive" and ws[h]["clock"] > since[h]["clock"] for h in hosts)
            return ws if ok else None
        return poll(check, 120, interval_s=0.5,
                    what=f"clocks of {hosts} to advance past { {h: since[h]['clock'] for h in hosts} }")

    def cut_until_dead(self, host: str, others) -> tuple[int, dict[str, dict], dict]:
        """Pull `host`'s cable; poll until the scheduler declares it dead and bumps the view.
        Returns (view before, workers by host at the cut, the dead worker's entry)."""
        assert all(w.running() for w in self.workers.values()), \
            "a worker finished before the link could be cut: raise STEPS"
        view_before = self.status()["view"]
        self.net.cut(host)
        t_cut = time.monotonic()
        at_cut = self.by_host(self.status())
        print(f"\ncut {host} at clocks { {h: e['clock'] for h, e in at_cut.items()} }, view {view_before}")

        def dead():
            self.healthy(others)
            st = self.status()
            e = self.by_host(st)[host]
            return (st, e) if e["state"] == "dead" and st["view"] > view_before else None
        st, entry = poll(dead, HEARTBEAT_S + DEAD_MARGIN_S, interval_s=0.25,
                         what=f"{host} declared dead after its link was cut")
        print(f"{host} declared dead {time.monotonic() - t_cut:.1f}s after the cut "
              f"(heartbeat timeout {HEARTBEAT_S}s); view {view_before} -> {st['view']}")
        assert entry["incarnation"] == at_cut[host]["incarnation"]
        return view_before, at_cut, entry

    def finish(self, hosts) -> dict[str, dict]:
        """Wait for `hosts` to exit 0; check their metrics, accuracy and link bytes."""
        for h in hosts:
            rc = self.workers[h].wait(FINISH_TIMEOUT_S)
            assert rc == 0, f"{h} exited {rc}:\n{self.workers[h].log_text()[-3000:]}"
        finals = {h: assert_worker_metrics(self.workers[h].metrics, STEPS) for h in hosts}
        for h, f in finals.items():
            rx, tx = self.net.port_bytes(h)
            print(f"{h}: held-out accuracy {f['eval_accuracy']}, sent {f['bytes_sent']} B, "
                  f"received {f['bytes_received']} B in {f['wall_s']}s; its bridge port saw "
                  f"{rx} B in, {tx} B out")
            assert f["eval_accuracy"] >= 0.95, (h, f)
            # what the worker pushed and pulled went through its own veth: the hub saw at
            # least those bytes on its bridge port (plus HTTP/2 and TCP framing)
            assert f["bytes_sent"] >= STEPS * MIN_PUSH_BYTES, f
            assert rx >= f["bytes_sent"], (h, rx, f["bytes_sent"])
            assert tx >= f["bytes_received"], (h, tx, f["bytes_received"])
        return finals


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.timeout(900)
def test_worker_cut_off_the_network_and_back(vnet):
    """Three workers; worker2's cable is pulled: it is declared dead within the lease while
    the others train on; plugged back, its old incarnation is refused, it rejoins under a new
    one and all three finish well trained, every step counted once."""
    net, procs = vnet
    c = Cluster(net, procs)
    for i, host in enumerate(WORKERS):
        c.start_worker(host, seed=i)
    survivors = [h for h in WORKERS if h != CUT]

    _, first = c.all_training()
    c.advance_past(first, WORKERS)       # all three train, before anything goes wrong

    view_before, at_cut, dead = c.cut_until_dead(CUT, survivors)
    # the others carry on past where they were when the cable went; the cut one cannot
    if all(c.workers[h].running() for h in survivors):
        c.advance_past(at_cut, survivors)
    assert all(at_cut[h]["clock"] < STEPS for h in survivors)
    steps_cut = sum(1 for r in (json.loads(x) for x in c.workers[CUT].metrics.read_text().splitlines() if x)
                    if "step" in r)
    assert steps_cut < STEPS, "the cut worker finished all its steps without a network"
    net.heal(CUT)

    def rejoined():
        c.healthy(WORKERS)
        e = c.by_host(c.status()).get(CUT)
        return e if e and e["state"] in ("alive", "left") and e["incarnation"] > dead["incarnation"] else None
    back = poll(rejoined, 120, interval_s=0.5, what=f"{CUT} to rejoin under a new incarnation")
    print(f"{CUT} rejoined as incarnation {back['incarnation']} (was {dead['incarnation']}) "
          f"at clock {back['clock']}, {steps_cut} steps recorded when healed")

    finals = c.finish(WORKERS)   # every step counted once, 1..STEPS, for each
    print(f"{CUT} skipped {finals[CUT]['skipped']} step(s) refused to its old incarnation")
    st = c.status()
    assert {h: e["state"] for h, e in c.by_host(st).items()} == {h: "left" for h in WORKERS}
    assert st["view"] > view_before
    for s in st["servers"]:
        assert "error" not in s, s
        assert s["pushes"] >= len(WORKERS) * STEPS - finals[CUT]["skipped"], s
