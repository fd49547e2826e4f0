"""bench/ctr_sparse_auc.py, issue 13's ctr-sparse accuracy figures: its --quick mode runs the
torch reference and two real clusters (async, and async with --admit-after 2; the ssp run is
the same code with another --mode, left out to keep the suite short) end to end,
and its JSON carries every figure the benchmark reports, each in range; the served AUC curve
it leaves beside the workers' metrics is what `psctl plot` draws. `psctl up --admit-after`
reaches the servers' command line and a bad value is refused before anything starts."""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from shardps.pscommon.config import JobSpec
from shardps.psctl import cli, plot
from shardps.psctl.up import UpConfig, server_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "ctr_sparse_auc.py"
RUNS = ("reference", "async", "async-admit2")
THRESHOLDS = ("0.7", "0.75", "0.78", "0.8")


def _auc(x) -> bool:
    return isinstance(x, float) and 0.5 < x <= 1.0


@pytest.mark.slow
def test_quick_mode_reports_every_run_in_range(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--run-dir", str(run_dir), "--timeout", "300",
                           "--runs", ",".join(RUNS), "--workers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["preset"] == "quick" and doc["workers"] == 1
    assert list(doc["runs"]) == list(RUNS) and doc["thresholds"] == [float(t) for t in THRESHOLDS]
    assert _auc(doc["teacher_auc"]) and doc["teacher_logloss"] > 0
    for name, r in doc["runs"].items():
        assert _auc(r["final_auc"]) and r["final_auc"] < doc["teacher_auc"], (name, r["final_auc"])
        assert math.isfinite(r["final_logloss"]) and 0 < r["final_logloss"] < 0.7, (name, r)
        assert r["teacher_auc"] == doc["teacher_auc"] and r["train_s"] > 0 and r["steps"] > 0
        assert list(r["time_to_auc"]) == list(r["steps_to_auc"]) == list(THRESHOLDS)
        times, steps = [p["time"] for p in r["curve"]], [p["step"] for p in r["curve"]]
        assert times == sorted(times) and steps == sorted(steps), (name, r["curve"])
        assert r["curve"][-1]["auc"] == r["final_auc"] and steps[-1] == r["steps"], (name, r["curve"])
        for t, s in r["time_to_auc"].items():   # reached exactly when a point of the curve reached it
            first = next((p for p in r["curve"] if p["auc"] >= float(t)), None)
            assert (s, r["steps_to_auc"][t]) == ((first["time"], first["step"]) if first else (None, None))
    # one pass over 6000 samples in batches of 256: the reference drops the short last batch,
    # the workers train 6 partitions of 1000 as 3 batches and a short one each
    assert doc["runs"]["reference"]["steps"] == 23
    clusters = {n: doc["runs"][n] for n in RUNS[1:]}
    for name, r in clusters.items():
        assert r["steps"] == 24 and all(_auc(a) for a in r["worker_final_auc"]), (name, r)
        assert r["rows"] > 0 and r["rows"] == r["admitted"], (name, r)
    # every id the pass read gets a row without admission; with N = 2 only the ids read twice
    plain, admit = clusters["async"], clusters["async-admit2"]
    assert plain["dropped_gradients"] == plain["unadmitted_lookups"] == 0
    assert admit["rows"] < plain["rows"] and admit["unadmitted_lookups"] > 0 and admit["dropped_gradients"] > 0
    assert admit["server_flags"] == ["--admit-after", "2"]
    g = doc["goals"]
    assert set(g) == {"async_vs_reference", "admission_vs_async"}
    assert g["admission_vs_async"]["rows"] == admit["rows"] and isinstance(g["admission_vs_async"]["met"], bool)

    # the served curve beside the workers' files: what `psctl plot` draws as the AUC row
    files = sorted(str(p) for p in (run_dir / "async").glob("*.jsonl"))
    series, skipped = plot.load(files)
    assert not any(skipped.values())
    (served,) = [s for s in series if s.label == "served-auc"]
    assert [a[2] for a in served.auc] == [p["auc"] for p in plain["curve"]]
    assert served.teacher_auc == doc["teacher_auc"]
    assert plot.metric_rows(series) == [plot.AUC]


def test_a_bad_run_name_is_a_usage_error():
    done = subprocess.run([sys.executable, str(SCRIPT), "--runs", "async,bogus"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--runs: bogus" in done.stderr


def test_up_passes_admit_after_to_its_servers(capsys):
    assert server_flags(UpConfig(job=JobSpec(), admit_after=2)) == ("--admit-after", "2")
    assert server_flags(UpConfig(job=JobSpec())) == ()
    assert cli.main(["up", "--admit-after", "0"]) == 2
    assert capsys.readouterr().err.strip() == "psctl: InvalidArgument: admit_after=0 must be an integer >= 1"
