"""A worker that waits for a shard follows the scheduler to the shard's new server, every
wait has a way out, and a worker waiting for data does not hold the others' gate (issue 14).

Real servers on port 0 in this process (scheduler, shards) and, for the signal cases, a real
`psctl worker` process. A server "dies" here the way a crashed host or a paused process
does: it stops heartbeating and what it has accepted it never answers (the fault injector
holds its pull handlers), so a call on its way to it waits until its own deadline unless the
worker moves it; or its port refuses connections. No sleeps to synchronize, no timing
asserts: polls with deadlines.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from shardps import PSClient
from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import PSError
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.scheduler import membership as mb
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess
from shardps.worker import data, models
from shardps.worker.client import ClientConfig, ShardClient
from shardps.worker.session import Stopped
from shardps.worker.train import Loop, MetricsWriter, TrainConfig, partition_batches, summary_line

from .faults import FaultInjector, FaultPlan
from .helpers import Background, poll

LEASE_S = 2.0        # the dead server's lease lapses this long after its last heartbeat
MOVE_BY_S = 30.0     # a deadline: the move takes about a lease; a call held by the dead server waits 120 s


class Holding:
    """What makes a server look dead to its callers: once `hold()` is called, its pull handlers
    never return (until `release()`, at teardown). Counts the calls that reached it."""

    def __init__(self):
        self._held, self._released = threading.Event(), threading.Event()
        self.faults = FaultInjector(FaultPlan(delay_s=1.0, delay_rate=1.0, methods=("Pull", "PullBatch")),
                                    sleep=self._pause)

    def _pause(self, _s: float) -> None:
        if self._held.is_set():
            self._released.wait()

    def hold(self) -> None:
        self._held.set()

    def release(self) -> None:
        self._released.set()

    @property
    def calls(self) -> int:
        return self.faults.counts().calls


def kill(server: ServerProcess, holding: Holding | None = None) -> None:
    """The server dies without a word: no more heartbeats (its lease lapses), no leave; with
    `holding`, calls it accepted are never answered, else its port refuses connections."""
    server.stop.set()
    if holding is not None:
        holding.hold()
    else:
        server.grpc_server.stop(0).wait()


@pytest.fixture
def one_shard():
    """A one-shard async job (scheduler and server in this process); stops what it started."""
    started = {"servers": [], "holdings": []}
    sched = SchedulerProcess(SchedulerConfig(job=JobSpec(mode="async", num_servers=1, heartbeat_timeout_s=LEASE_S)))
    sched.start()
    started["scheduler"] = sched

    def server(holding: Holding | None = None) -> ServerProcess:
        srv = ServerProcess(ServerConfig(scheduler=sched.address, shard_id=0,
                                         interceptors=(holding.faults,) if holding else ()))
        srv.start()   # registers once the shard's previous server's lease has lapsed
        started["servers"].append(srv)
        if holding:
            started["holdings"].append(holding)
        return srv
    started["server"] = server
    yield started
    for h in started["holdings"]:
        h.release()
    for srv in started["servers"]:
        srv.stop.set()
        srv.grpc_server.stop(0).wait()
    sched.stop.set()                  # no drain: its grace would wait out the servers' watch streams
    sched.grpc_server.stop(0).wait()


def held_pull(one_shard, start: np.ndarray, **cfg):
    """A worker that declared {"w": start} and pulled once; then its shard's server dies
    holding every call, and a second pull is under way and has reached it.
    Returns (client, the dead server, its Holding, the arrays the pull fills, the pull)."""
    holding = Holding()
    old = one_shard["server"](holding)
    client = ShardClient(ClientConfig(scheduler=one_shard["scheduler"].address, name="w", **cfg))
    client.join()
    client.wait_for_servers()
    client.declare({"w": start})
    into = {"w": np.zeros_like(start)}
    client.pull(into)
    kill(old, holding)
    reached = holding.calls
    pull = Background(client.pull, into)
    poll(lambda: holding.calls > reached, what="the pull to reach the dead server")
    return client, old, holding, into, pull


def test_a_call_held_by_a_dead_shard_moves_to_its_replacement(one_shard):
    start = np.arange(6, dtype=np.float32)
    client, old, holding, into, pull = held_pull(one_shard, start)
    try:
        new = one_shard["server"]()           # a replacement, at another address
        assert new.address != old.address

        poll(pull.done.is_set, MOVE_BY_S, what="the held pull to move to the replacement server")
        pull.join()                          # it succeeded: the new server was re-seeded from our copy
        assert client.transport.address(0) == new.address
        np.testing.assert_array_equal(into["w"], start)
        # and the dead address is not dialled any more
        dialled = holding.calls
        client.pull(into)
        assert holding.calls == dialled
        assert new.shard.pulls >= 2
    finally:
        client.leave()


def test_stopping_ends_a_wait_for_a_dead_shard_and_leaves(one_shard):
    """interrupt() (what SIGTERM does through ClientConfig.stop) ends a call held by a dead
    shard and its retries with Stopped; the worker still leaves the membership."""
    stop = threading.Event()
    client, _, holding, into, pull = held_pull(one_shard, np.ones(3, np.float32), stop=stop)
    stop.set()
    poll(pull.done.is_set, MOVE_BY_S, what="the held pull to end once the worker is stopping")
    with pytest.raises(Stopped):
        pull.join()
    with pytest.raises(Stopped):             # and no wait starts again
        client.wait_for_servers()
    me = client.worker_id
    client.leave()
    assert one_shard["scheduler"].core.members.members[me].state == mb.LEFT


# -- the end of a data epoch -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ssp", "sync"])
def test_a_worker_without_data_does_not_hold_the_gate_of_the_one_training(cluster, tmp_path, mode):
    """3 partitions over 2 workers: while one trains the epoch's last partition the other has
    none, and sits steps out (in sync and ssp the trainer's steps wait for its clock) instead of
    waiting for data while the trainer waits for it. Every batch of every epoch trained once."""
    parts, batch, epochs = 3, 128, 2
    c = cluster(JobSpec(mode=mode, staleness=1 if mode == "ssp" else 0, num_servers=1))
    cfg = TrainConfig(scheduler=c.address, epochs=epochs, partitions=parts, batch_size=batch)
    split = data.digits()
    stop = threading.Event()
    loops, clients, runs = [], [], []
    try:
        for i in range(2):   # both join before either trains: the shares are as uneven as they get
            model = models.build("digits-mlp", seed=0)
            clients.append(PSClient.connect(c.address, model, name=f"w{i}", stop=stop))
            loops.append(Loop(cfg, clients[-1], model, torch.device("cpu"), split,
                              MetricsWriter(str(tmp_path / f"w{i}.jsonl")), stop))

        def run(loop):
            try:
                loop.run_epochs()
            finally:
                loop.ps.leave()   # as psctl worker does: once done, it holds no one's steps
        runs = [Background(run, loop) for loop in loops]
        poll(lambda: all(r.done.is_set() for r in runs), MOVE_BY_S, what="both workers to finish every epoch")
        for r in runs:
            r.join()
    finally:
        stop.set()   # a worker still waiting (before the fix: both) stops waiting, and leaves
        for ps in clients[len(runs):]:
            ps.leave()
    per_epoch = sum(len(partition_batches(len(split.x_train), parts, 0, p, batch, cfg.seed)) for p in range(parts))
    assert sum(loop.done for loop in loops) == epochs * per_epoch
    assert sum(loop.idle_steps for loop in loops) > 0
    assert c.scheduler.core.data.finished


# -- a psctl worker process ------------------------------------------------------------------
def test_a_worker_stopped_before_it_trained_says_so_in_one_line():
    # what train() returns when the signal came while it joined or waited for its servers
    summary = dict(worker=None, steps=0, skipped=0, stopped=True)
    assert summary_line(summary, TrainConfig(scheduler="127.0.0.1:1")) == "worker stopped before training (interrupted)"


STEPS = 1_000_000
EXIT_BY_S = 60.0    # a deadline: a signalled worker exits within about a second; before the fix,
                    # it waited out its 120 s retry deadline first


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_worker_waiting_for_a_dead_shard(one_shard, tmp_path, sig, code):
    """docs/api.md: SIGTERM drains and exits 0, SIGINT exits 130; either way one line on
    stdout says what the worker did, and it leaves the membership."""
    sched = one_shard["scheduler"]
    srv = one_shard["server"]()
    metrics, log = tmp_path / "worker.jsonl", tmp_path / "worker.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "shardps.psctl", "worker", "--scheduler", sched.address,
                                 "--steps", str(STEPS), "--metrics-out", str(metrics), "--no-progress"],
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True)
    try:
        poll(lambda: metrics.exists() and '"step"' in metrics.read_text(), 120.0, what="the worker's first step")
        kill(srv)   # its port refuses: the worker retries, waiting for the shard
        poll(lambda: "waiting for shard 0" in log.read_text(), 60.0, what="the worker to say it waits for shard 0")
        proc.send_signal(sig)
        try:
            out, _ = proc.communicate(timeout=EXIT_BY_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not stop within {EXIT_BY_S}s of the signal; log:\n{log.read_text()[-3000:]}")
        text = log.read_text()
        assert proc.returncode == code, text[-3000:]
        lines = out.splitlines()
        assert len(lines) == 1 and re.fullmatch(rf"worker (\d+) stopped after \d+ of {STEPS} steps \(interrupted\)",
                                                lines[0]), (out, text[-3000:])
        assert "Traceback" not in text
        worker = int(re.match(r"worker (\d+)", lines[0]).group(1))
        assert sched.core.members.members[worker].state == mb.LEFT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_min_workers_counts_a_worker_that_already_finished_and_left(cluster):
    """A fast worker may take its steps and leave before a slow one checks the start gate
    (psctl up --workers 2 sets --min-workers 2): the gate counts workers that joined, alive
    or left, not only those alive at the moment it looks; a dead one does not count."""
    c = cluster(JobSpec(num_servers=1))
    fast = ShardClient(ClientConfig(scheduler=c.address, name="fast"))
    fast.join()
    fast.wait_for_workers(1)
    fast.leave()
    slow = ShardClient(ClientConfig(scheduler=c.address, name="slow", connect_timeout_s=5))
    slow.join()
    slow.wait_for_workers(2)    # returns at once: the fast one joined, then left
    with pytest.raises(PSError, match="2 of 3 workers joined"):
        slow.wait_for_workers(3)
    slow.leave()
