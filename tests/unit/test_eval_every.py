"""Held-out curves while training (`--eval-every`): a worker's loop on an in-process cluster
writes a periodic record every N of its steps (accuracy for the digits models; AUC, log loss
and the teacher's AUC for ctr-sparse), on a clock that leaves the evaluations out, and psctl
plot draws them as a curve; ctr-sparse takes a click log of another size through --data;
the flag is checked on both command lines and `psctl up --plot` picks a value when none is
given."""
from __future__ import annotations

import functools
import json
import threading
import time

import pytest

from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.psctl import cli, plot, up
from shardps.worker import data, loading
from shardps.worker.models import ctr_sparse
from shardps.worker.train import MetricsWriter, TrainConfig, eval_due, periodic_record, train

ADAGRAD = OptimizerConfig(kind="adagrad", lr=0.02, eps=1e-10, initial_accumulator_value=1e-6)
DATA = f"{__name__}:small_clicks"


@functools.lru_cache(maxsize=1)
def small_clicks() -> ctr_sparse.ClickSplit:
    """A small click log for `--data` (4k training samples, 2k held out)."""
    return ctr_sparse.click_split(ctr_sparse.make_click_log(4_000, 2_000, seed=0))


def digits_split() -> data.Split:
    return data.digits()


def clicks_of_unequal_length() -> ctr_sparse.ClickSplit:
    s = small_clicks()
    return ctr_sparse.ClickSplit(s.ids_train, s.dense_train, s.y_train[:-1], s.ids_test, s.dense_test,
                                 s.y_test, s.teacher)


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _no_malloc_tuning(monkeypatch):
    monkeypatch.setenv("SHARDPS_MALLOC_TUNING", "0")   # cli.main() runs in the test process


# -- the loop writes the records, plot draws them -------------------------------------------------
def test_digits_worker_writes_accuracy_records_that_plot_as_a_curve(cluster, tmp_path):
    c = cluster(JobSpec(num_servers=2))
    out = tmp_path / "worker.jsonl"
    summary = train(TrainConfig(scheduler=c.address, steps=10, eval_every=3, progress=False, metrics_out=str(out)))
    recs = records(out)
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "accuracy" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    # every 3 steps, but not after the 10th: the final record evaluates that model
    assert [r["step"] for r in evals] == [3, 6, 9]
    assert all(set(r) == {"step", "accuracy", "worker", "time"} and 0.0 <= r["accuracy"] <= 1.0 for r in evals)
    assert all(r["worker"] == summary["worker"] for r in evals)
    assert summary["evals"] == 3 and summary["eval_s"] >= 0.0
    # each evaluation sits between its step and the next on the records' clock
    times = [r["time"] for r in recs]
    assert times == sorted(times)
    assert [recs.index(r) for r in evals] == [recs.index(s) + 1 for s in steps if s["step"] in (3, 6, 9)]

    series, skipped = plot.load([str(out)])
    assert skipped == {str(out): 0}
    (s,) = series
    assert [(a[0], a[2]) for a in s.acc] == [(r["step"], r["accuracy"]) for r in evals]
    assert s.final == (10, recs[-1]["time"], summary["eval_accuracy"]) and not s.auc
    assert plot.metric_rows(series) == [plot.ACCURACY]
    lines = {ln.get_label(): ln for ln in plot.figure(series).axes[2].get_lines()}
    assert [float(y) for y in lines[f"{s.label} eval"].get_ydata()] == [r["accuracy"] for r in evals]


def test_ctr_sparse_worker_on_a_click_log_from_data_writes_auc_records(cluster, tmp_path):
    c = cluster(JobSpec(num_servers=2, optimizer=ADAGRAD))
    out = tmp_path / "worker.jsonl"
    summary = train(TrainConfig(scheduler=c.address, model="ctr-sparse", data=DATA, steps=6, batch_size=256,
                                eval_every=2, progress=False, metrics_out=str(out)))
    recs = records(out)
    evals = [r for r in recs if "auc" in r]
    assert [r["step"] for r in evals] == [2, 4]
    teacher = small_clicks().teacher["teacher_auc"]
    for r in evals:
        assert set(r) == {"step", "auc", "logloss", "teacher_auc", "worker", "time"}
        assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0 and r["teacher_auc"] == teacher
    assert summary["evals"] == 2 and 0.5 < summary["eval_auc"] <= 1.0 and summary["teacher_auc"] == teacher

    series, _ = plot.load([str(out)])
    (s,) = series
    assert [(a[0], a[2]) for a in s.auc] == [(r["step"], r["auc"]) for r in evals]
    assert s.final_auc[::2] == (6, summary["eval_auc"]) and s.teacher_auc == teacher
    assert plot.metric_rows(series) == [plot.AUC]
    lines = {ln.get_label(): ln for ln in plot.figure(series).axes[2].get_lines()}
    assert [float(y) for y in lines[f"{s.label} eval"].get_ydata()] == [r["auc"] for r in evals]


def test_the_records_clock_stops_while_paused(tmp_path):
    out = tmp_path / "m.jsonl"
    w = MetricsWriter(str(out))
    t_a = time.time()
    w.write(step=1)
    with w.paused():
        began = time.time()
        time.sleep(0.05)
        paused = time.time() - began
    w.write(step=2)
    wall = time.time() - t_a
    w.close()
    first, second = records(out)
    assert second["time"] - first["time"] <= wall - paused + 2e-4   # rounded to 0.1 ms


def test_when_an_evaluation_is_due_and_what_it_records():
    cfg = TrainConfig(scheduler="127.0.0.1:1", steps=10, eval_every=5)
    assert [n for n in range(1, 11) if eval_due(n, cfg)] == [5]
    epochs = TrainConfig(scheduler="127.0.0.1:1", steps=10, eval_every=5, epochs=1)
    assert [n for n in range(1, 16) if eval_due(n, epochs)] == [5, 10, 15]   # no last step known
    assert not any(eval_due(n, TrainConfig(scheduler="127.0.0.1:1")) for n in range(1, 301))
    assert periodic_record({"eval_auc": 0.8, "eval_logloss": 0.5, "teacher_auc": 0.83,
                            "teacher_logloss": 0.45}) == {"auc": 0.8, "logloss": 0.5, "teacher_auc": 0.83}
    assert periodic_record({"eval_accuracy": 0.9}) == {"accuracy": 0.9}


# -- --data for ctr-sparse --------------------------------------------------------------------------
def test_load_data_takes_a_click_log_and_refuses_one_that_disagrees():
    assert loading.load_data(DATA) is small_clicks()
    with pytest.raises(InvalidArgument, match="differ in length"):
        loading.load_data(f"{__name__}:clicks_of_unequal_length")


@pytest.mark.parametrize("model,spec,wanted", [
    ("ctr-sparse", f"{__name__}:digits_split", "worker.models.ctr_sparse.ClickSplit"),
    ("digits-mlp", DATA, "worker.data.Split"),
])
def test_data_of_the_wrong_kind_is_refused_before_joining(model, spec, wanted):
    # no scheduler at this address: the refusal comes before any call
    with pytest.raises(InvalidArgument, match=f"--model {model!r} trains on {wanted}"):
        train(TrainConfig(scheduler="127.0.0.1:1", model=model, data=spec, progress=False), threading.Event())


# -- the flags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["worker", "--scheduler", "127.0.0.1:1"], ["up"]])
@pytest.mark.parametrize("bad", ["-1", "soon", "2.5"])
def test_a_bad_eval_every_is_one_line_and_exit_2(capsys, command, bad):
    assert cli.main([*command, "--eval-every", bad]) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert captured.out == "" and len(err) == 1, err
    assert err[0].startswith(f"psctl {command[0]}: argument --eval-every: "), err


def test_the_flags_reach_the_worker_and_up(monkeypatch):
    from shardps.worker import train as train_module
    seen = []
    monkeypatch.setattr(cli, "_stop_event", threading.Event)   # no signal handlers in the test process
    monkeypatch.setattr(train_module, "train", lambda cfg, stop: seen.append(cfg) or {"worker": None, "steps": 0})
    monkeypatch.setattr(up, "run", lambda cfg: seen.append(cfg) or 0)
    for argv in (["worker", "--scheduler", "127.0.0.1:1", "--eval-every", "7"],
                 ["worker", "--scheduler", "127.0.0.1:1"], ["up", "--eval-every", "7"], ["up"]):
        assert cli.main(argv) == 0
    assert [c.eval_every for c in seen] == [7, 0, 7, None]
    with pytest.raises(InvalidArgument):
        TrainConfig(scheduler="127.0.0.1:1", eval_every=-1)
    with pytest.raises(InvalidArgument):
        up.UpConfig(job=JobSpec(), eval_every=-1)


def test_up_passes_eval_every_to_every_worker(monkeypatch, tmp_path):
    cluster = up.Cluster(tmp_path)
    cluster.scheduler_address = "127.0.0.1:7000"
    spawned = {}
    monkeypatch.setattr(cluster, "spawn", lambda name, args: spawned.setdefault(name, args))
    cluster.start_worker(0, up.UpConfig(job=JobSpec(), eval_every=25))
    cluster.start_worker(1, up.UpConfig(job=JobSpec()))
    assert cli.build_parser().parse_args(spawned["worker-0"]).eval_every == 25
    assert "--eval-every" not in spawned["worker-1"]


def test_up_with_plot_evaluates_about_six_times_per_worker():
    def never():
        raise AssertionError("the training set's size is asked only with --epochs")
    cfg = functools.partial(up.UpConfig, job=JobSpec())
    assert up.plot_eval_every(cfg(), never) == 0                                   # no --plot: the final record
    assert up.plot_eval_every(cfg(plot="c.png"), never) == 50                      # 300 steps
    assert up.plot_eval_every(cfg(plot="c.png", steps=7), never) == 2
    assert up.plot_eval_every(cfg(plot="c.png", steps=1), never) == 1
    assert up.plot_eval_every(cfg(plot="c.png", eval_every=0), never) == 0         # asked for none
    assert up.plot_eval_every(cfg(eval_every=9), never) == 9
    # --epochs: the workers share each epoch's batches (200k samples, batches of 1024, 2 workers)
    assert up.plot_eval_every(cfg(plot="c.png", epochs=1, batch_size=1024, workers=2), lambda: 200_000) == 17
