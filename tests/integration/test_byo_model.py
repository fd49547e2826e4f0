"""`psctl worker --model module:function --data module:function` as real processes: a user's own
model trains against real daemons; bad specs end with exit 2, one stderr line and no
traceback, before the worker joins the job (so nothing waits for servers or leases)."""
from __future__ import annotations

import os
import textwrap

import pytest

from .helpers import assert_worker_metrics, run_psctl, status_json

FIX = "tests.fixtures.byo_models"
STEPS = 80

pytestmark = pytest.mark.slow


@pytest.fixture
def daemons(procs):
    """A real scheduler and one server (async, 1 shard)."""
    sched = procs.scheduler("--mode", "async", "--servers", "1", "--lr", "0.1", "--heartbeat-timeout", "5")
    procs.server(sched.address, 0)
    return sched


def assert_one_line_exit_2(r, *mentions: str) -> str:
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr[-3000:]}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one non-empty stderr line, got {lines!r}"
    assert "Traceback" not in r.stdout + r.stderr
    for m in mentions:
        assert m in lines[0], f"the message should name {m!r}: {lines[0]!r}"
    return lines[0]


def test_byo_model_trains_against_daemons(procs, daemons):
    w = procs.worker(daemons.address, 0, STEPS, "--data", f"{FIX}:load", model=f"{FIX}:build")
    assert w.wait(300) == 0, f"worker exited {w.popen.returncode}:\n{w.log_text()[-3000:]}"
    final = assert_worker_metrics(w.metrics, STEPS)
    assert final["eval_accuracy"] >= 0.95, final   # three well-separated blobs
    st = status_json(daemons.address)
    assert [x["state"] for x in st["workers"]] == ["left"]
    assert st["keys"] == 4   # the fixture's MLP: two weights, two biases


BAD = {
    "missing-module": (["--model", "tests.fixtures.no_such_module:build", "--data", f"{FIX}:load"],
                       ["tests.fixtures.no_such_module", "cannot import"]),
    "missing-function": (["--model", f"{FIX}:no_such_function", "--data", f"{FIX}:load"],
                         ["no_such_function", "has no"]),
    "model-wrong-type": (["--model", f"{FIX}:build_wrong_type", "--data", f"{FIX}:load"],
                         ["build_wrong_type", "not a torch.nn.Module"]),
    "data-wrong-type": (["--model", f"{FIX}:build", "--data", f"{FIX}:load_wrong_type"],
                        ["load_wrong_type", "returned dict"]),
    "data-raises": (["--model", f"{FIX}:build", "--data", f"{FIX}:load_raises"],
                    ["load_raises", "ValueError", "dataset shard 7 is corrupt"]),
    "no-data-for-custom-model": (["--model", f"{FIX}:build"], ["--data"]),
}


@pytest.mark.parametrize("args,mentions", list(BAD.values()), ids=list(BAD))
def test_bad_spec_exits_2_before_joining(daemons, args, mentions):
    # against a live scheduler and server, so a worker that got as far as connecting could not
    # hang waiting for them: what decides the test is the exit code, the message, and that no
    # worker ever joined
    r = run_psctl("worker", "--scheduler", daemons.address, "--steps", "5", "--no-progress", *args, timeout=120)
    assert_one_line_exit_2(r, *mentions)
    assert status_json(daemons.address)["workers"] == [], "the worker joined before failing"


@pytest.mark.parametrize("case", ["missing-module", "model-wrong-type", "data-wrong-type"])
def test_bad_spec_fails_without_any_scheduler(case):
    """Validation comes first: with nothing listening at --scheduler, a bad spec still exits 2 at
    once (joining would retry for ClientConfig.connect_timeout_s, 120 s, and time out here)."""
    args, mentions = BAD[case]
    r = run_psctl("worker", "--scheduler", "127.0.0.1:1", "--steps", "5", "--no-progress", *args, timeout=60)
    assert_one_line_exit_2(r, *mentions)


def test_module_failing_at_import_exits_2(tmp_path, monkeypatch):
    (tmp_path / "shardps_broken_user_module.py").write_text(textwrap.dedent("""
        raise RuntimeError("CUDA_VISIBLE_DEVICES is not set")
    """))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    r = run_psctl("worker", "--scheduler", "127.0.0.1:1", "--steps", "5", "--no-progress",
                  "--model", "shardps_broken_user_module:build", "--data", f"{FIX}:load", timeout=60)
    assert_one_line_exit_2(r, "shardps_broken_user_module", "CUDA_VISIBLE_DEVICES")


def test_model_data_mismatch_exits_2_before_joining(daemons):
    # digits-cnn wants 1x8x8 images; the fixture's data are 16 features
    r = run_psctl("worker", "--scheduler", daemons.address, "--steps", "5", "--no-progress",
                  "--model", "digits-cnn", "--data", f"{FIX}:load", timeout=120)
    assert_one_line_exit_2(r, "digits-cnn")
    st = status_json(daemons.address)
    assert st["workers"] == [] and not st.get("keys"), "the worker joined (and declared) before failing"
