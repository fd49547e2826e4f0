"""psctl checkpoint --consistent: checkpoints of every shard that belong together. In sync,
every shard's checkpoint holds the same completed step, and the model they make up is,
bit for bit, what the workers pulled at that step. In async, pushes are held on every shard
while they write, so the shards' ledgers are at most one push per worker apart."""
import json
import pathlib
import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from shardps import PSClient
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import Aborted
from shardps.psctl import ops
from shardps.psserver.daemon import ServerConfig, ServerProcess
from shardps.worker import data, models

from .helpers import KEY_W, bare_shard, poll

STEPS = 30


class Recorder(threading.Thread):
    """Trains, and keeps the flat weights of every pull by the clock they were pulled for."""

    def __init__(self, address: str, seed: int, split):
        super().__init__(daemon=True)
        self.address, self.seed, self.split = address, seed, split
        self.pulled: dict[int, dict[str, np.ndarray]] = {}
        self.steps, self.error = 0, None

    def run(self):
        gen = torch.Generator().manual_seed(self.seed)
        model = models.build("digits-mlp", seed=0)
        try:
            with PSClient.connect(self.address, model, name=f"r{self.seed}") as ps:
                while self.steps < STEPS:
                    ps.pull()
                    self.pulled[ps.clock] = {n: a.copy() for n, a in ps.weights.arrays.items()}
                    idx = torch.randint(len(self.split.x_train), (32,), generator=gen)
                    model.zero_grad()
                    torch.nn.functional.cross_entropy(model(self.split.x_train[idx]),
                                                      self.split.y_train[idx]).backward()
                    ps.push()
                    self.steps += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def with_checkpoints(cluster, job: JobSpec, tmp_path):
    c = cluster(job)
    for shard in range(job.num_servers):
        c.servers[shard].drain()
        c.servers[shard] = ServerProcess(ServerConfig(scheduler=c.address, shard_id=shard,
                                                      checkpoint_dir=str(tmp_path / "ckpt")))
        c.servers[shard].start()
    return c


def train_and_cut(c, capsys) -> tuple[list[Recorder], dict]:
    split = data.digits()
    workers = [Recorder(c.address, seed, split) for seed in (1, 2)]
    for w in workers:
        w.start()
    poll(lambda: min(w.steps for w in workers) >= 8 or any(w.error for w in workers), 120, what="8 steps")
    capsys.readouterr()
    assert ops.checkpoint(c.address, True, 30.0, consistent=True) == 0
    cut = json.loads(capsys.readouterr().out)
    for w in workers:
        w.join(120)
    assert [w.error for w in workers] == [None, None] and [w.steps for w in workers] == [STEPS, STEPS]
    return workers, cut


def model_of(checkpoints: list[dict]) -> dict[str, np.ndarray]:
    """The flat parameters the shards' checkpoint files hold together."""
    flat: dict[str, np.ndarray] = {}
    for c in checkpoints:
        path = pathlib.Path(c["path"])
        meta = json.loads(path.read_text())
        tensors = load_file(str(path.parent / meta["tensors_file"]))
        for k in meta["keys"]:
            arr = flat.setdefault(k["param"], np.full(int(np.prod(k["param_shape"])), np.nan, np.float32))
            arr[k["offset"]:k["offset"] + k["length"]] = tensors[k["key"]]
    return flat


def test_a_sync_cut_is_one_real_step_on_every_shard(cluster, tmp_path, capsys):
    c = with_checkpoints(cluster, JobSpec(mode="sync", num_servers=2), tmp_path)
    workers, cut = train_and_cut(c, capsys)
    step = cut["cut"]["step"]
    assert cut["cut"]["mode"] == "sync" and 0 < step < STEPS
    assert [ck["completed_step"] for ck in cut["checkpoints"]] == [step, step]
    got = model_of(cut["checkpoints"])
    # what every worker pulled to compute step `step`: the state after exactly `step` steps
    for w in workers:
        expected = w.pulled[step]
        assert got.keys() == expected.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_an_async_cut_holds_pushes_so_the_shards_are_one_push_apart(cluster, tmp_path, capsys):
    c = with_checkpoints(cluster, JobSpec(mode="async", num_servers=2), tmp_path)
    _, cut = train_and_cut(c, capsys)
    assert cut["cut"]["mode"] == "held"
    ledgers = [json.loads(pathlib.Path(ck["path"]).read_text())["ledger"] for ck in cut["checkpoints"]]
    workers = set(ledgers[0]) | set(ledgers[1])
    assert workers
    for w in workers:
        steps = [led[w][1] for led in ledgers]   # [incarnation, last step taken]
        assert max(steps) - min(steps) <= 1, (w, steps)
    assert all(not srv.shard.held_until for srv in c.servers)   # released: training went on


def test_a_cut_refuses_a_shard_past_its_step_and_takes_one_behind_at_the_moment():
    shard = bare_shard(JobSpec(mode="sync", optimizer=OptimizerConfig(kind="sgd", lr=1.0)), (0, 1))
    shard.declare("fp", [KEY_W], {"w": np.zeros(2, np.float32)})
    one = {"w": np.ones(2, np.float32)}
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("snap", shard.cut_at(2, {}, timeout_s=30)))
    waiter.start()
    poll(lambda: 2 in shard._cuts, what="the cut to wait for step 2")
    for step in range(3):   # three steps: the cut is taken after the second, not the third
        shard.push(0, 1, step, 0, one)
        shard.push(1, 1, step, 0, one)
    waiter.join(30)
    snap = got["snap"]
    assert snap.gate["completed_step"] == 2
    np.testing.assert_array_equal(snap.tensors["w"], [-2, -2])
    np.testing.assert_array_equal(shard.entries["w"].value, [-3, -3])
    with pytest.raises(Aborted, match="past step 2"):
        shard.cut_at(2, {}, timeout_s=1)
