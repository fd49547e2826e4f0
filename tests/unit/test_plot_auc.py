"""`psctl plot` with held-out AUC (ctr-sparse): the metrics of a small real run (two workers'
`--metrics-out` files written by worker/train.py's train() on an in-process cluster, and the
served model's AUC curve written by bench/ctr_sparse_auc.py from `evaluate_served`) give an
AUC row of panels, with the workers' final AUC, the served curve and the teacher's line, in
place of the empty accuracy row."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import time

import pytest

from shardps.pscommon.config import JobSpec
from shardps.psctl import plot
from shardps.worker import models
from shardps.worker.models import ctr_sparse
from shardps.worker.train import TrainConfig, evaluate_served, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
N_TRAIN, N_TEST, BATCH, STEPS = 4_000, 2_000, 256, 6


@pytest.fixture
def bench(monkeypatch):
    """bench/ctr_sparse_auc.py as a module; the sys.path entries and modules it adds are undone."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("ctr_sparse_auc_under_test", ROOT / "bench" / "ctr_sparse_auc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    if "ctr_sparse_reference" not in before:
        sys.modules.pop("ctr_sparse_reference", None)


@pytest.fixture
def small(monkeypatch):
    """The built-in ctr-sparse model on a small log, as the rpc tier's tests run it."""
    split = ctr_sparse.click_split(ctr_sparse.make_click_log(N_TRAIN, N_TEST, seed=0))
    monkeypatch.setitem(models.BUILTIN, "ctr-sparse",
                        models.ModelEntry(ctr_sparse.CTRShardedModel, lambda: split, ctr_sparse.CLICK))
    return split


@pytest.fixture
def run(cluster, small, bench, tmp_path):
    """Two workers one after the other, the served model evaluated after each: the files."""
    c = cluster(JobSpec(num_servers=2, optimizer=bench.OPTIMIZER))
    files, curve, t0 = [], [], time.monotonic()
    for i in range(2):
        out = tmp_path / f"worker-{i}.jsonl"
        train(TrainConfig(scheduler=c.address, model="ctr-sparse", steps=STEPS, batch_size=BATCH, progress=False,
                          metrics_out=str(out), name=f"worker-{i}"))
        served = evaluate_served(c.address, "ctr-sparse")
        curve.append({"step": STEPS * (i + 1), "time": round(time.monotonic() - t0, 2), "auc": served["eval_auc"],
                      "logloss": served["eval_logloss"]})
        files.append(out)
    files.append(tmp_path / bench.SERVED)
    bench.write_curve(files[-1], curve, small.teacher["teacher_auc"])
    return files, curve


def test_the_auc_series_are_read_from_a_real_runs_files(run, small, tmp_path):
    files, curve = run
    series, skipped = plot.load([str(p) for p in files])
    assert skipped == {str(p): 0 for p in files}
    finals = [json.loads(p.read_text().splitlines()[-1]) for p in files[:2]]
    workers = [s for s in series if s.worker is not None]
    assert [s.label for s in series] == [f"worker {f['worker']}" for f in finals] + ["served-auc"]
    for s, final in zip(workers, finals):
        assert s.step == list(range(1, STEPS + 1)) and len(s.loss) == STEPS
        assert s.final_auc[0] == STEPS and s.final_auc[2] == final["eval_auc"] > 0.5
        assert s.teacher_auc == small.teacher["teacher_auc"] and s.final is None and not s.acc and not s.auc
    served = series[-1]
    assert served.auc == [(p["step"], p["time"], p["auc"]) for p in curve]
    assert served.teacher_auc == small.teacher["teacher_auc"] and not served.loss
    # the served model after the second worker is the second worker's last pull, its final record
    assert curve[-1]["auc"] == finals[-1]["eval_auc"]

    # a non-numeric AUC is a malformed line, left out of the series
    copy = tmp_path / "copy.jsonl"
    lines = files[-1].read_text().splitlines()
    copy.write_text("\n".join(lines + [json.dumps({**json.loads(lines[0]), "auc": "high"})]) + "\n")
    (again,), bad = plot.read_file(str(copy))
    assert bad == 1 and again.auc == served.auc


def test_the_figure_has_an_auc_row_with_the_teachers_line(run, small, tmp_path):
    files, curve = run
    series, _ = plot.load([str(p) for p in files])
    assert plot.metric_rows(series) == [plot.AUC]
    fig = plot.figure(series)
    assert len(fig.axes) == 4
    _, _, auc_step, auc_time = fig.axes
    assert auc_step.get_ylabel() == "ROC AUC" and auc_step.get_title() == "held-out AUC vs step"
    lines = {ln.get_label(): ln for ln in auc_step.get_lines()}
    assert [float(y) for y in lines["served-auc eval"].get_ydata()] == [p["auc"] for p in curve]
    teacher = small.teacher["teacher_auc"]
    assert [float(y) for y in lines[f"teacher {teacher:.4f}"].get_ydata()] == [teacher, teacher]
    stars = [ln for ln in auc_time.get_lines() if ln.get_marker() == "*"]
    assert len(stars) == 2
    low, high = auc_step.get_ylim()
    assert low <= min(p["auc"] for p in curve) and high > teacher   # the teacher's line is in view

    out = tmp_path / "curves.png"
    assert plot.run([str(p) for p in files], str(out)) == 0
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

