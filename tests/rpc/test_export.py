"""`psctl export` against an in-process cluster: the file is the served model, loadable by torch."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shardps.pscommon.config import CodecConfig, JobSpec
from shardps.pscommon.errors import FailedPrecondition, InvalidArgument
from shardps.psctl import export
from shardps import PSClient
from shardps.worker import data, models

REPO = pathlib.Path(__file__).resolve().parents[2]
# Small slices so 0.weight (128x64 floats, 32 KiB) is cut into 8 keys spread over both shards.
JOB = JobSpec(num_servers=2, slice_bytes=4096)


def _train(address: str, steps: int) -> tuple[torch.nn.Module, float]:
    """Train digits-mlp for `steps`; returns the model holding the live (pulled) parameters
    and the held-out accuracy before training."""
    model = models.build("digits-mlp", seed=0)
    split = data.digits()
    before = data.accuracy(model, split.x_test, split.y_test)
    gen = torch.Generator().manual_seed(0)
    with PSClient.connect(address, model) as ps:
        for _ in range(steps):
            ps.pull()
            idx = torch.randint(len(split.x_train), (32,), generator=gen)
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            assert ps.push()
        ps.pull()  # the model now holds exactly what the servers hold
    return model, before


def _no_temp_files(directory: pathlib.Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_export_is_the_served_model_and_loads_strictly(cluster, tmp_path, capsys):
    c = cluster(JOB)
    live, before = _train(c.address, 150)
    split = data.digits()
    live_acc = data.accuracy(live, split.x_test, split.y_test)
    assert live_acc > before  # training moved the parameters, so the comparison below means something

    from shardps.worker.client import ClientConfig, ShardClient
    observer = ShardClient(ClientConfig(scheduler=c.address))
    shard_map = observer.attach()
    observer.leave()
    assert {k.shard for k in shard_map.keys_of_param("0.weight")} == {0, 1}

    out = tmp_path / "export" / "model.safetensors"  # the parent does not exist yet
    assert export.run(c.address, str(out), 30.0) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out}: 4 tensors, {out.stat().st_size} bytes")
    assert _no_temp_files(out.parent)

    state = load_file(str(out))
    fresh = models.build("digits-mlp", seed=1)  # different init: load_state_dict must do the work
    fresh.load_state_dict(state, strict=True)
    for name, p in live.named_parameters():
        assert state[name].dtype == torch.float32 and state[name].shape == p.shape
        assert torch.equal(state[name], p.detach()), name
    assert data.accuracy(fresh, split.x_test, split.y_test) == live_acc

    with safe_open(str(out), "np") as f:
        meta = f.metadata()
    assert meta["shardps.model_fingerprint"] == shard_map.fingerprint
    assert meta["shardps.mode"] == "async"
    assert json.loads(meta["shardps.shard_versions"]) == {str(i): s.shard.version
                                                          for i, s in enumerate(c.servers)}
    assert sum(json.loads(meta["shardps.shard_versions"]).values()) == 2 * 150

    # A path under a regular file cannot be created: InvalidArgument naming it, nothing left behind.
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "model.safetensors"
    with pytest.raises(InvalidArgument, match=str(bad)):
        export.run(c.address, str(bad), 30.0)
    with pytest.raises(InvalidArgument, match="directory"):
        export.run(c.address, str(tmp_path), 30.0)
    assert _no_temp_files(tmp_path) and _no_temp_files(out.parent)


def test_export_reads_fp32_master_weights_even_when_the_job_pulls_bf16(cluster, tmp_path):
    # Default slice size: 0.weight (32 KiB) and 2.weight (5 KiB) are above small_tensor_bytes,
    # so a pull with the job's codec really is bf16 on the wire.
    c = cluster(JobSpec(num_servers=2, pull_codec=CodecConfig.parse("bf16")))
    model = models.build("digits-mlp", seed=0)
    initial = {n: p.detach().numpy().reshape(-1).copy() for n, p in model.named_parameters()}
    with PSClient.connect(c.address, model):
        pass  # declares the model: the servers hold the fp32 initial values

    from shardps.worker.client import ClientConfig, ShardClient
    lossy = ShardClient(ClientConfig(scheduler=c.address))
    lossy.attach()
    pulled = {n: np.empty_like(v) for n, v in initial.items()}
    lossy.pull(pulled)
    lossy.leave()  # stops its fan-out pool (an observer never joined)
    assert not np.array_equal(pulled["0.weight"], initial["0.weight"])  # the premise: bf16 loses bits

    tensors, meta, rows = export.gather(c.address, 30.0)
    assert rows == {}   # a model without embedding tables
    assert json.loads(meta["shardps.job"])["pull_codec"] == "bf16"
    for name, value in initial.items():
        assert np.array_equal(tensors[name].reshape(-1), value), name


def test_export_without_a_model_is_failed_precondition(cluster, tmp_path):
    c = cluster(JobSpec(num_servers=1))
    out = tmp_path / "model.safetensors"
    with pytest.raises(FailedPrecondition, match="no model has been declared"):
        export.run(c.address, str(out), 10.0)
    assert not out.exists() and _no_temp_files(tmp_path)


def _psctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardps.psctl", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_export_subprocess(cluster, tmp_path):
    c = cluster(JobSpec(num_servers=2, slice_bytes=4096))
    model = models.build("digits-mlp", seed=0)
    with PSClient.connect(c.address, model):
        pass
    out = tmp_path / "cli.safetensors"
    proc = _psctl("export", "--scheduler", c.address, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    state = load_file(str(out))
    models.build("digits-mlp", seed=1).load_state_dict(state, strict=True)
    for name, p in model.named_parameters():
        assert torch.equal(state[name], p.detach()), name


def test_cli_export_unreachable_scheduler_is_one_line_exit_1(tmp_path):
    out = tmp_path / "never.safetensors"
    proc = _psctl("export", "--scheduler", "127.0.0.1:1", "--out", str(out), "--timeout", "2")
    assert proc.returncode == 1   # a runtime failure (2 is for a bad command line)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "127.0.0.1:1" in lines[0] and lines[0].startswith("psctl: ")
    assert not out.exists() and _no_temp_files(tmp_path)
