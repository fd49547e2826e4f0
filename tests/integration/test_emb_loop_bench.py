"""bench/emb_loop.py, the emb-loop workload on shardps: it runs end to end on a tiny table and
its server-side checks hold; the pieces those checks rest on (the id stream equals the peers',
a row's update count read back from its value) are right."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "emb_loop.py"
FIELDS = ("impl", "preset", "fields", "rows", "dim", "batch", "servers", "workers", "steps", "wall_s",
          "rows_per_s", "MBps", "steps_per_s", "unique_frac", "server_rss_mb", "worker_rss_mb",
          "rows_ok", "update_ok", "acc_ok", "acc_ratio", "lo_bytes_per_logical")


@pytest.fixture
def emb_loop(monkeypatch):
    """bench/emb_loop.py as a module; the sys.path entries and modules its import adds are
    undone afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("emb_loop_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    for name in set(sys.modules) - before:
        if name in ("emb_spec", "harness"):
            del sys.modules[name]


def test_ids_are_the_peers_and_update_counts_read_back_from_values(emb_loop):
    a = types.SimpleNamespace(preset="small", rows=None)
    p = emb_loop.preset_of(a)
    for w, f, s in ((0, 0, 0), (1, 7, 3), (0, 3, 201)):
        np.testing.assert_array_equal(emb_loop.draw(w, f, s, p), emb_loop.emb_spec.draw(w, f, s, "small"))
    traj = emb_loop.adagrad_trajectory(60)
    assert np.all(np.diff(traj) < 0) and traj[0] == 1.0
    values = np.repeat(traj[[0, 1, 7, 60]][:, None], 16, axis=1)
    k, fit = emb_loop.updates_from_values(values, traj)
    assert k.tolist() == [0, 1, 7, 60] and fit == 0.0
    values[2, 5] = traj[8]  # a row whose elements disagree no longer fits the trajectory
    assert emb_loop.updates_from_values(values, traj)[1] >= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("servers,workers,fuse", [(1, 1, True), (2, 2, True), (2, 2, False)])
def test_emb_loop_runs_end_to_end_and_its_checks_hold(tmp_path, servers, workers, fuse):
    """Fused (one PushPullBatch per shard and step, the default) and two calls (--no-fuse):
    rows served equal the rows the workers asked for and received, either way."""
    cmd = [sys.executable, str(SCRIPT), "--preset", "small", "--rows", "1000", "--steps", "3",
           "--servers", str(servers), "--workers", str(workers), "--json", "--timeout", "25",
           "--run-dir", str(tmp_path / "run"), *(() if fuse else ("--no-fuse",))]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=40)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(FIELDS) <= set(record), set(FIELDS) - set(record)
    assert record["rows_ok"] and record["update_ok"] and record["acc_ok"], record
    assert (record["servers"], record["workers"], record["steps"], record["rows"]) == (servers, workers, 3, 1000)
    assert record["state"]["rows_served"] == record["state"]["rows_updated"] == record["state"]["expected_rows"] > 0
    assert record["rows_per_s"] > 0 and 0 < record["unique_frac"] <= 1
    assert record["fused"] is fuse and ("[two-call]" in record["impl"]) is not fuse
    steps = 2 + 3   # the workload's warm-up steps and the timed ones
    assert all(s["pushes"] == workers * steps for s in record["per_server"])
