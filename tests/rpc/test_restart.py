"""A shard's server crashes and comes back while workers train: from its checkpoint (behind
the workers) or empty (re-seeded from the workers' freshest copy). In every mode the workers
carry on to their last step; in sync mode the shard takes the workers' step.
"""
import threading

import numpy as np
import pytest
import torch

from shardps import PSClient
from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec
from shardps.pscommon.framing import parameter_server_stub
from shardps.psserver import reseed
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.worker import data, models

from .helpers import KEY_W, bare_shard, poll, status

STEPS = 24
CRASH_AT = 8
HEARTBEAT_S = 1.5


def crash(srv: ServerProcess) -> None:
    """As kill -9 would leave it: no drain, no checkpoint, no leave; the lease lapses."""
    srv.stop.set()
    srv.grpc_server.stop(0).wait()


class Trainer(threading.Thread):
    def __init__(self, address: str, seed: int):
        super().__init__(daemon=True)
        self.address, self.seed = address, seed
        self.steps, self.counted, self.error, self.ps = 0, 0, None, None
        self.connected = threading.Event()

    def run(self):
        split = data.digits()
        gen = torch.Generator().manual_seed(self.seed)
        model = models.build("digits-mlp", seed=0)
        try:
            with PSClient.connect(self.address, model, name=f"t{self.seed}") as ps:
                self.ps = ps
                self.connected.set()
                while self.steps < STEPS:
                    ps.pull()
                    idx = torch.randint(len(split.x_train), (32,), generator=gen)
                    model.zero_grad()
                    torch.nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
                    self.counted += bool(ps.push())
                    self.steps += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.connected.set()


def run_through_a_restart(cluster, mode: str, tmp_path, checkpoints: bool):
    job = JobSpec(num_servers=2, mode=mode, staleness=2, heartbeat_timeout_s=HEARTBEAT_S)
    c = cluster(job)
    ckpt = str(tmp_path / "ckpt") if checkpoints else None
    if checkpoints:   # shard 1 runs with a checkpoint directory from the start
        c.servers[1].drain()
        c.servers[1] = ServerProcess(ServerConfig(scheduler=c.address, shard_id=1, checkpoint_dir=ckpt))
        c.servers[1].start()
    trainers = [Trainer(c.address, seed) for seed in (1, 2)]
    for t in trainers:
        t.start()
    poll(lambda: all(t.connected.is_set() for t in trainers), 60, what="both workers connected")
    assert not [t.error for t in trainers if t.error]
    if checkpoints:
        poll(lambda: min(t.steps for t in trainers) >= 2, 60, what="two steps")
        c.servers[1].checkpointer.write()   # a checkpoint behind the crash point
    poll(lambda: min(t.steps for t in trainers) >= CRASH_AT or any(t.error for t in trainers), 60,
         what=f"both workers past step {CRASH_AT}")
    copies = {t.ps.worker_id: t.ps.client.shard_versions().get(1, 0) for t in trainers}
    crash(c.servers[1])
    c.servers[1] = ServerProcess(ServerConfig(scheduler=c.address, shard_id=1, checkpoint_dir=ckpt))
    c.servers[1].start()
    if checkpoints:   # status shows the restored checkpoint's age, not "no checkpoint yet"
        assert c.servers[1].checkpointer.age_s() >= 0.0
    for t in trainers:
        t.join(120)
    assert [t.error for t in trainers] == [None, None]
    assert [t.steps for t in trainers] == [STEPS, STEPS]
    return c, trainers, copies


@pytest.mark.parametrize("mode", ["sync", "ssp", "async"])
def test_a_shard_restarted_empty_is_reseeded_and_training_goes_on(cluster, mode, tmp_path):
    c, trainers, copies_before = run_through_a_restart(cluster, mode, tmp_path, checkpoints=False)
    st = status(parameter_server_stub(grpcutil.channel(c.servers[1].address)))
    taken = c.servers[1].shard.reseeded
    assert taken is not None, "the restarted shard was not re-seeded"
    assert taken.worker in copies_before and taken.offers >= 1
    # the copy it took was at least as fresh as any copy either worker held at the crash
    assert taken.version >= max(copies_before.values())
    # training went on on the re-seeded shard: it took updates after the re-seed
    assert c.servers[1].shard.version > taken.version
    if mode == "sync":
        gate = c.servers[1].shard.gate
        assert gate.completed_step >= STEPS - 1 and not gate.resuming
    assert (st.reseeded.worker_id, st.reseeded.version, st.reseeded.offers) == (taken.worker, taken.version,
                                                                                 taken.offers)


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_a_shard_restored_from_an_older_checkpoint_catches_up_with_the_workers(cluster, mode, tmp_path):
    c, trainers, _ = run_through_a_restart(cluster, mode, tmp_path, checkpoints=True)
    shard = c.servers[1].shard
    assert shard.reseeded is None            # restored, not re-seeded
    if mode == "sync":
        # restored at the checkpoint's step (>= 2) while the workers were past CRASH_AT: it
        # took their step instead of refusing their pushes (twice when a worker re-pulls the
        # step the crash interrupted before another pushes the next one)
        assert 1 <= shard.rebases <= 2 and shard.gate.completed_step >= STEPS - 1


def test_the_freshest_copy_wins_whoever_offers_first():
    shard, key = bare_shard(JobSpec(), (1, 2, 3)), KEY_W
    offers = [(1, 7, 1.0), (2, 9, 2.0), (3, 9, 3.0)]   # worker, version, value
    got = {}

    def offer(worker, version, value):
        got[worker] = shard.offer_seed(worker, 1, version, "fp", [key],
                                       {"w": np.full(2, value, np.float32)}, timeout_s=30)
    threads = [threading.Thread(target=offer, args=o) for o in offers]
    for t in threads:   # in any order: the choice must not depend on it
        t.start()
    for t in threads:
        t.join(30)
    assert set(got) == {1, 2, 3} and len({id(r) for r in got.values()}) == 1
    taken = got[1]
    assert (taken.worker, taken.version, taken.offers) == (2, 9, 3)   # a tie goes to the lower id
    np.testing.assert_array_equal(shard.entries["w"].value, [2.0, 2.0])
    assert shard.version == 9 and shard.fingerprint == "fp"


def test_an_offer_waits_at_most_the_window_for_a_silent_worker():
    t = [100.0]
    shard, key = bare_shard(JobSpec(), (1, 2), now=lambda: t[0]), KEY_W
    done = []
    th = threading.Thread(target=lambda: done.append(
        shard.offer_seed(1, 1, 4, "fp", [key], {"w": np.ones(2, np.float32)}, timeout_s=60)))
    th.start()
    poll(lambda: shard.collecting is not None, what="the offer to be collected")
    assert not done            # worker 2 has not offered, the window is open
    t[0] += reseed.WINDOW_S    # worker 2 stays silent for the whole window
    th.join(30)
    assert done and done[0].worker == 1 and done[0].offers == 1
