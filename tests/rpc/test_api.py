"""PSClient, the API a custom training loop uses, over real in-process clusters (scheduler and
servers on port 0, real channels): it trains, its overlap path computes exactly what the plain
path computes, it leaves at once when the loop raises, its counters move, the example script
works, and `module:function` specs fail with errors that name them."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shardps.pscommon import grpcutil
from shardps.pscommon.config import CodecConfig, JobSpec, OptimizerConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import scheduler_pb2 as spb, scheduler_pb2_grpc
from shardps import PSClient
from shardps.worker import data, loading, models
from shardps.worker.client import ClientConfig, ShardClient
from shardps.worker.data import Split

from .helpers import TIMEOUT_S, poll

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = "tests.fixtures.byo_models"


# -- helpers ---------------------------------------------------------------------------------
def scheduler_status(address: str) -> spb.StatusReply:
    with grpcutil.channel(address) as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).Status(spb.StatusRequest(), timeout=TIMEOUT_S)


def worker_state(address: str, worker_id: int) -> int | None:
    for w in scheduler_status(address).workers:
        if w.worker_id == worker_id:
            return w.state
    return None


def server_params(c) -> dict[str, np.ndarray]:
    """Every key held by the cluster's shards, copied (training has finished)."""
    out = {}
    for srv in c.servers:
        with srv.shard.cond:
            for key, e in srv.shard.entries.items():
                assert key not in out, f"key {key} held by two shards"
                out[key] = e.value.copy()
    return out


def attached_params(address: str) -> dict[str, np.ndarray]:
    """The same values read over the wire by a read-only (observer) client."""
    reader = ShardClient(ClientConfig(scheduler=address, name="reader"))
    smap = reader.attach()
    into = {p.name: np.empty(p.numel, np.float32) for p in smap.params}
    reader.pull(into)
    reader.leave()
    return into


def sgd_step(model, ps, split, gen, batch=32):
    ps.pull()
    idx = torch.randint(len(split.x_train), (batch,), generator=gen)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
    return ps.push()


# -- (a) the API trains digits-cnn ---------------------------------------------------------------
CNN_STEPS, CNN_LR = 500, 0.2   # plain SGD at this lr reaches ~0.98 by step 400 for any batch order


@pytest.mark.slow  # 500 steps of a CNN
def test_custom_loop_trains_digits_cnn(cluster):
    c = cluster(JobSpec(num_servers=2, optimizer=OptimizerConfig(kind="sgd", lr=CNN_LR)))
    split = data.digits(image=True)
    model = models.build("digits-cnn", seed=0)
    gen = torch.Generator().manual_seed(0)
    before = data.accuracy(model, split.x_test, split.y_test)
    with PSClient.connect(c.address, model) as ps:
        for _ in range(CNN_STEPS):
            assert sgd_step(model, ps, split, gen)
        ps.pull()
        acc = data.accuracy(model, split.x_test, split.y_test)
        assert ps.clock == CNN_STEPS
    assert before < 0.3, before
    assert acc >= 0.95, f"held-out accuracy {acc:.4f} after {CNN_STEPS} steps"
    # both shards hold part of the model and applied every push
    assert all(srv.shard.entries for srv in c.servers)
    assert [srv.shard.version for srv in c.servers] == [CNN_STEPS, CNN_STEPS]
    # what the loop evaluated is what the servers hold
    served = attached_params(c.address)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(served[name], p.detach().numpy().reshape(-1))


# -- (b) overlap and plain paths compute the same parameters -------------------------------------
EQ_STEPS = 15


def run_workers(job: JobSpec, cluster, n_workers: int, overlap: bool):
    """n workers in threads with fixed seeds and batches; returns (the servers' parameters by
    key, the shard map)."""
    c = cluster(job)
    split = data.digits(image=True)
    connected = [threading.Event() for _ in range(n_workers)]
    go = threading.Event()
    errors: list[BaseException] = []
    clocks = {}
    # built here, one after the other: models.build seeds torch's global generator, which
    # threads building at the same time would share (and each get different weights)
    built = [models.build("digits-cnn", seed=0) for _ in range(n_workers)]

    def worker(i: int) -> None:
        try:
            model = built[i]
            gen = torch.Generator().manual_seed(100 + i)  # by thread index, not by worker id
            with PSClient.connect(c.address, model, overlap=overlap, name=f"w{i}") as ps:
                connected[i].set()
                assert go.wait(TIMEOUT_S * 4), "never released"
                for _ in range(EQ_STEPS):
                    assert sgd_step(model, ps, split, gen), "a step did not count"
                clocks[i] = ps.clock
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            connected[i].set()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_workers)]
    for t in threads:
        t.start()
    for ev in connected:
        assert ev.wait(TIMEOUT_S * 4), "a worker did not connect"
    assert not errors, errors
    # sync waits for the workers a shard knows about: start only when every shard's view has
    # all of them, or a step could complete without one (and the two runs would differ)
    poll(lambda: all(len(srv.shard.gate.live) == n_workers for srv in c.servers), TIMEOUT_S,
         what=f"every shard to see {n_workers} live workers")
    go.set()
    for t in threads:
        t.join(TIMEOUT_S * 8)
        assert not t.is_alive(), "a worker did not finish"
    if errors:
        raise errors[0]
    assert clocks == {i: EQ_STEPS for i in range(n_workers)}
    if job.mode == "sync":
        assert all(srv.shard.gate.completed_step == EQ_STEPS for srv in c.servers)
    else:
        assert all(srv.shard.version == n_workers * EQ_STEPS for srv in c.servers)
    params = server_params(c)
    # the observer read over the wire agrees with the shards' memory
    served = attached_params(c.address)
    reader = ShardClient(ClientConfig(scheduler=c.address))
    smap = reader.attach()
    reader.leave()
    for k in smap.keys:
        np.testing.assert_array_equal(params[k.key], served[k.param][k.offset:k.offset + k.length])
    return params, smap


@pytest.mark.parametrize("mode,n_workers", [("sync", 2), ("async", 1)], ids=["sync-2-workers", "async-1-worker"])
def test_overlap_matches_plain_path(cluster, mode, n_workers):
    # slice_bytes small: the large tensors are cut into slices spread over both shards, so the
    # streaming push routes parts of one gradient to different shards
    job = JobSpec(mode=mode, num_servers=2, slice_bytes=4096, heartbeat_timeout_s=60,
                  optimizer=OptimizerConfig(kind="sgd", lr=0.1))
    plain, smap = run_workers(job, cluster, n_workers, overlap=False)
    overlap, _ = run_workers(job, cluster, n_workers, overlap=True)
    assert set(plain) == set(overlap) == {k.key for k in smap.keys}
    assert len(smap.keys) > len(smap.params), "no tensor was sliced"
    assert {k.shard for k in smap.keys} == {0, 1}
    for key in plain:
        np.testing.assert_allclose(overlap[key], plain[key], rtol=0, atol=1e-6, err_msg=key)
    # the comparison means something only if training moved the parameters
    initial = {n: p.detach().numpy().reshape(-1)
               for n, p in models.build("digits-cnn", seed=0).named_parameters()}
    moved = [k.key for k in smap.keys
             if np.abs(plain[k.key] - initial[k.param][k.offset:k.offset + k.length]).max() > 1e-4]
    assert len(moved) > len(smap.keys) // 2, f"only {len(moved)} of {len(smap.keys)} keys moved"


# -- (b2) gradients handed over later (the CUDA path's copy-then-add on a pool thread) ----------
class DeferredHandoff(PSClient):
    """Hands every gradient to the push from a pool thread after a delay, the way the CUDA path
    does once its device-to-host copy is done; here on CPU, so the suite covers the ordering."""
    delay_s = 0.05
    duplicate: str | None = None   # a parameter whose gradient is (wrongly) handed over twice

    def _add_grad(self, stream, name, grad):
        arr = grad.detach().reshape(-1).numpy().copy()
        for _ in range(2 if name == self.duplicate else 1):
            self._defer(lambda: (time.sleep(self.delay_s), stream.add(name, arr)))


def one_step_grads(model, split, gen) -> dict[str, np.ndarray]:
    idx = torch.randint(len(split.x_train), (32,), generator=gen)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
    return {n: p.grad.detach().numpy().reshape(-1).copy() for n, p in model.named_parameters()}


def test_push_waits_for_deferred_handoffs(cluster):
    lr = 0.1
    c = cluster(JobSpec(num_servers=2, optimizer=OptimizerConfig(kind="sgd", lr=lr)))
    split, gen = data.digits(), torch.Generator().manual_seed(0)
    model = models.build("digits-mlp", seed=0)
    with DeferredHandoff.connect(c.address, model) as ps:
        before = attached_params(c.address)
        grads = one_step_grads(model, split, gen)
        assert ps.push()
        after = attached_params(c.address)
    # every gradient arrived in the push: none went as the zeros sent for a missing parameter
    for name, g in grads.items():
        assert np.abs(g).max() > 0, name
        np.testing.assert_allclose(after[name], before[name] - lr * g, rtol=0, atol=1e-6, err_msg=name)


def test_failed_handoff_fails_the_push_and_applies_nothing(cluster):
    c = cluster(JobSpec(num_servers=2))
    split, gen = data.digits(), torch.Generator().manual_seed(0)
    model = models.build("digits-mlp", seed=0)
    first = next(n for n, _ in model.named_parameters())
    with DeferredHandoff.connect(c.address, model) as ps:
        ps.duplicate = first
        one_step_grads(model, split, gen)
        with pytest.raises(InvalidArgument, match=f"gradient for '{first}' added twice"):
            ps.push()
        assert [srv.shard.version for srv in c.servers] == [0, 0]
        assert ps.clock == 0
        # the same step, handed over correctly, goes through
        ps.duplicate = None
        one_step_grads(model, split, gen)
        assert ps.push()
        assert ps.clock == 1
        assert [srv.shard.version for srv in c.servers] == [1, 1]


# -- (b3) the 16-bit cast on the device sends what the host codec sends ------------------------
def train_cast(cluster, codec: str, device_compression: bool, overlap: bool, steps: int = 12):
    c = cluster(JobSpec(num_servers=2, push_codec=CodecConfig.parse(codec),
                        optimizer=OptimizerConfig(kind="sgd", lr=0.1)))
    split, gen = data.digits(), torch.Generator().manual_seed(0)
    model = models.build("digits-mlp", seed=0)
    with PSClient.connect(c.address, model, overlap=overlap, device_compression=device_compression) as ps:
        for _ in range(steps):
            assert sgd_step(model, ps, split, gen)
        sent = ps.bytes_sent
        handed, cast = ps.grad_host_bytes, ps.encoded_params
    return server_params(c), sent, handed, cast


WEIGHTS, BIASES = 128 * 64 + 10 * 128, 128 + 10
# bytes per step leaving the model for the two weight matrices, encoded on the device
DEVICE_BYTES = {"bf16": 2 * WEIGHTS, "fp16": 2 * WEIGHTS, "topk:0.02": 6 * (round(0.02 * 8192) + round(0.02 * 1280))}


@pytest.mark.parametrize("codec", sorted(DEVICE_BYTES))
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_device_side_encoding_matches_the_host_codec(cluster, codec, overlap):
    host, host_sent, host_handed, none = train_cast(cluster, codec, device_compression=False, overlap=overlap)
    dev, dev_sent, dev_handed, encoded = train_cast(cluster, codec, device_compression=True, overlap=overlap)
    assert none == frozenset()
    # the two weight matrices are encoded there; the biases (<= small_tensor_bytes) stay on the host path
    assert encoded == {"0.weight", "2.weight"}
    assert set(dev) == set(host)
    for key in host:
        np.testing.assert_array_equal(dev[key], host[key], err_msg=key)
    assert dev_sent == host_sent                       # the same payloads on the wire
    assert host_handed == 12 * 4 * (WEIGHTS + BIASES)
    assert dev_handed == 12 * (DEVICE_BYTES[codec] + 4 * BIASES)   # what leaves the model's device


def test_device_compression_needs_a_codec_with_a_device_form(cluster):
    c = cluster(JobSpec(push_codec=CodecConfig.parse("int8")))
    with pytest.raises(InvalidArgument, match="no device-side form"):
        PSClient.connect(c.address, models.build("digits-mlp", seed=0), device_compression=True)
    # and the failed connect left: the job has no live worker
    poll(lambda: all(w.state != spb.MEMBER_STATE_ALIVE for w in scheduler_status(c.address).workers),
         5.0, what="the refused worker to leave")


# -- (c) leaving on an exception ----------------------------------------------------------------
def test_exception_in_loop_leaves_at_once(cluster):
    c = cluster(JobSpec(num_servers=2, heartbeat_timeout_s=60))   # a lease that would take a minute
    model = models.build("digits-mlp", seed=0)
    split = data.digits()
    gen = torch.Generator().manual_seed(0)
    seen = {}
    with pytest.raises(RuntimeError, match="user code failed"):
        with PSClient.connect(c.address, model) as ps:
            seen["id"] = ps.worker_id
            sgd_step(model, ps, split, gen)
            assert worker_state(c.address, ps.worker_id) == spb.MEMBER_STATE_ALIVE
            raise RuntimeError("user code failed")
    wid = seen["id"]
    # the scheduler knows at once (far below the 60 s lease), and so do the servers
    poll(lambda: worker_state(c.address, wid) == spb.MEMBER_STATE_LEFT, 5.0,
         what=f"worker {wid} to show as left")
    poll(lambda: all(wid not in srv.shard.gate.live for srv in c.servers), 5.0,
         what="the servers to drop the worker")


def test_exception_in_sync_loop_releases_the_other_worker(cluster):
    """In sync mode the survivor's next step completes without the worker that raised, long
    before its lease would have expired."""
    c = cluster(JobSpec(mode="sync", heartbeat_timeout_s=60))
    split = data.digits()
    a_model, b_model = models.build("digits-mlp", seed=0), models.build("digits-mlp", seed=0)
    gen = torch.Generator().manual_seed(0)
    with PSClient.connect(c.address, a_model, name="survivor") as a:
        with pytest.raises(RuntimeError, match="boom"):
            with PSClient.connect(c.address, b_model, name="crasher") as b:
                poll(lambda: len(c.servers[0].shard.gate.live) == 2, TIMEOUT_S, what="both workers seen")
                b.pull()
                raise RuntimeError("boom")
        # a's push for step 0 completes with a alone: b is gone from the view
        done = threading.Event()
        result = {}

        def step():
            result["ok"] = sgd_step(a_model, a, split, gen)
            done.set()
        threading.Thread(target=step, daemon=True).start()
        assert done.wait(15.0), "the survivor's step waited for the worker that left"
        assert result["ok"] is True
        assert c.servers[0].shard.gate.completed_step == 1


# -- (d) the example script ------------------------------------------------------------------------
@pytest.mark.slow  # a subprocess that imports torch and trains
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_custom_loop_example_runs(cluster, overlap):
    c = cluster(JobSpec(num_servers=2))
    argv = [sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--scheduler", c.address,
            "--steps", "300"] + (["--overlap"] if overlap else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr[-3000:]}"
    m = re.search(r"worker (\d+): clock (\d+), sent (\d+) B, received (\d+) B, held-out accuracy ([\d.]+)",
                  r.stdout)
    assert m, f"no summary line in {r.stdout!r}"
    clock, sent, received, acc = int(m[2]), int(m[3]), int(m[4]), float(m[5])
    assert clock == 300 and sent > 0 and received > 0
    assert acc >= 0.85, f"held-out accuracy {acc}"
    st = scheduler_status(c.address)
    assert [w.state for w in st.workers] == [spb.MEMBER_STATE_LEFT]
    assert sum(srv.shard.version for srv in c.servers) == 2 * 300


# -- (e) counters ------------------------------------------------------------------------------------
def test_clock_view_and_byte_counters_move(cluster):
    c = cluster(JobSpec(num_servers=2, heartbeat_timeout_s=6.0))   # heartbeats every 2 s
    split = data.digits()
    gen = torch.Generator().manual_seed(0)
    model = models.build("digits-mlp", seed=0)
    logical = 4 * sum(p.numel() for p in model.parameters())
    with PSClient.connect(c.address, model, name="first") as ps:
        assert ps.worker_id >= 0
        assert ps.clock == 0
        view0 = ps.view
        assert view0 >= 1
        # connect pulled once: the whole model came back at fp32
        assert ps.bytes_received == logical and ps.bytes_sent == 0
        sent, received = [ps.bytes_sent], [ps.bytes_received]
        for step in range(1, 4):
            assert sgd_step(model, ps, split, gen)
            assert ps.clock == step
            sent.append(ps.bytes_sent)
            received.append(ps.bytes_received)
        pushes = np.diff(sent)
        pulls = np.diff(received)
        assert (pushes > 0).all() and len(set(pushes)) == 1, sent     # the same bytes each step
        assert logical // 2 <= pushes[0] <= logical, (pushes[0], logical)
        assert (pulls == logical).all(), received
        # a second worker joins: the membership view moves, and the first worker sees it
        with PSClient.connect(c.address, models.build("digits-mlp", seed=0), name="second") as other:
            assert other.worker_id != ps.worker_id
            assert other.view > view0
            poll(lambda: ps.view >= other.view, 20.0, what="the first worker to see the new epoch")
        assert ps.client.traffic.logical_sent == 3 * logical


# -- (f) module:function specs -----------------------------------------------------------------------
BAD_MODEL_SPECS = {
    "no-colon": ("tests.fixtures.byo_models", "neither a built-in name nor module:function"),
    "missing-module": ("tests.fixtures.no_such_module:build", "cannot import module"),
    "missing-function": (f"{FIX}:no_such_function", "has no 'no_such_function'"),
    "not-callable": (f"{FIX}:NOT_CALLABLE", "is not callable"),
    "wrong-type": (f"{FIX}:build_wrong_type", "not a torch.nn.Module"),
    "raises": (f"{FIX}:build_raises", "raised RuntimeError: model file not found"),
}
BAD_DATA_SPECS = {
    "missing-module": ("tests.fixtures.no_such_module:load", "cannot import module"),
    "missing-function": (f"{FIX}:no_such_function", "has no 'no_such_function'"),
    "not-callable": (f"{FIX}:NOT_CALLABLE", "is not callable"),
    "wrong-type": (f"{FIX}:load_wrong_type", "returned dict"),
    "mismatched-lengths": (f"{FIX}:load_mismatched", "differ in length"),
    "raises": (f"{FIX}:load_raises", "raised ValueError: dataset shard 7 is corrupt"),
}


@pytest.mark.parametrize("spec,mentions", list(BAD_MODEL_SPECS.values()), ids=list(BAD_MODEL_SPECS))
def test_bad_model_spec(spec, mentions):
    with pytest.raises(InvalidArgument) as e:
        loading.build_model(spec)
    msg = str(e.value)
    assert repr(spec) in msg and "--model" in msg, msg
    assert mentions in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("spec,mentions", list(BAD_DATA_SPECS.values()), ids=list(BAD_DATA_SPECS))
def test_bad_data_spec(spec, mentions):
    with pytest.raises(InvalidArgument) as e:
        loading.load_data(spec)
    msg = str(e.value)
    assert repr(spec) in msg and "--data" in msg, msg
    assert mentions in msg, msg
    assert "\n" not in msg


def test_good_specs_load():
    model = loading.build_model(f"{FIX}:build")
    split = loading.load_data(f"{FIX}:load")
    assert isinstance(model, torch.nn.Module) and isinstance(split, Split)
    assert model(split.x_test[:5]).shape == (5, 3)
    assert len(split.x_train) == len(split.y_train) == 600
    # through the model registry, as `psctl worker --model M --data D` goes
    entry = models.entry(f"{FIX}:build", f"{FIX}:load")
    a = models.build(f"{FIX}:build", seed=3, data_spec=f"{FIX}:load")
    b = models.build(f"{FIX}:build", seed=3, data_spec=f"{FIX}:load")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)   # the seed fixes the weights: every worker starts the same
    assert len(entry.dataset().x_test) == 150


def test_custom_model_without_data_is_refused():
    with pytest.raises(InvalidArgument, match="--data"):
        models.entry(f"{FIX}:build")


@pytest.fixture
def broken_module(tmp_path, monkeypatch):
    """A user module that fails while being imported, with something other than ImportError."""
    name = "shardps_test_broken_user_module"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        raise RuntimeError("CUDA_VISIBLE_DEVICES is not set")
        def build():
            return torch.nn.Linear(2, 2)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_module_failing_at_import_is_invalid_argument(broken_module):
    with pytest.raises(InvalidArgument) as e:
        loading.build_model(f"{broken_module}:build")
    msg = str(e.value)
    assert broken_module in msg and "RuntimeError" in msg and "CUDA_VISIBLE_DEVICES" in msg, msg


@pytest.fixture
def torch_threads():
    """worker.train sets torch's thread count for its process: give this one its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bad_spec_fails_before_joining(cluster, torch_threads):
    """worker.train validates model and data before it connects: nothing joins the job."""
    from shardps.worker.train import TrainConfig, train
    c = cluster(JobSpec())
    for model, data_spec in [(f"{FIX}:build_raises", f"{FIX}:load"), (f"{FIX}:build", f"{FIX}:load_wrong_type"),
                             ("tests.fixtures.no_such_module:build", f"{FIX}:load")]:
        with pytest.raises(InvalidArgument):
            train(TrainConfig(scheduler=c.address, model=model, data=data_spec, steps=5, progress=False,
                              device="cpu"))
    assert list(scheduler_status(c.address).workers) == []


def test_byo_model_trains_through_train(cluster, tmp_path, torch_threads):
    """The fixture's good pair trains through worker.train (the loop behind `psctl worker`)."""
    from shardps.worker.train import TrainConfig, train
    c = cluster(JobSpec(num_servers=2))
    summary = train(TrainConfig(scheduler=c.address, model=f"{FIX}:build", data=f"{FIX}:load", steps=60,
                                progress=False, device="cpu", metrics_out=str(tmp_path / "m.jsonl")))
    assert summary["steps"] == 60 and summary["eval_accuracy"] >= 0.95, summary
    assert sum(srv.shard.version for srv in c.servers) == 2 * 60


def test_model_data_mismatch_fails_before_joining(cluster, torch_threads):
    from shardps.worker.train import TrainConfig, train
    c = cluster(JobSpec())
    # digits-cnn wants 1x8x8 images; the fixture's data are 16 features
    with pytest.raises(InvalidArgument, match="digits-cnn"):
        train(TrainConfig(scheduler=c.address, model="digits-cnn", data=f"{FIX}:load", steps=5,
                          progress=False, device="cpu"))
    st = scheduler_status(c.address)
    assert list(st.workers) == [] and not st.model_fingerprint, "the job was changed by a worker that cannot train"
