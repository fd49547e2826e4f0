"""`psctl plot`: metrics JSON lines -> a PNG of loss and accuracy curves."""
import json
import math

import numpy as np
import pytest
from matplotlib import image as mpimg

from shardps.pscommon.errors import InvalidArgument
from shardps.psctl import cli, plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path, worker: int, steps: int, seed: int, garbage: list[str] = ()) -> None:
    """What worker/train.py writes: a record per step, then the final summary."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(1, steps + 1):
        loss = 2.3 * math.exp(-i / 40) + 0.05 + 0.05 * rng.random()
        lines.append(json.dumps({"step": i, "clock": i + worker, "loss": round(loss, 5),
                                 "worker": worker, "time": round(0.01 * i, 4)}))
        if i == steps // 2:
            lines.append(json.dumps({"step": i, "accuracy": 0.8, "worker": worker, "time": 0.01 * i}))
    lines.extend(garbage)
    lines.append(json.dumps({"worker": worker, "steps": steps, "skipped": 0, "final_loss": 0.1,
                             "eval_accuracy": round(0.93 + worker / 100, 4), "wall_s": 0.01 * steps,
                             "time": 0.01 * steps + 0.2}))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def two_files(tmp_path):
    a, b = tmp_path / "worker-0.jsonl", tmp_path / "worker-1.jsonl"
    _write_metrics(a, 0, 200, seed=0)
    # a torn last-but-one line, prose, a JSON array and a record with a string loss
    _write_metrics(b, 1, 120, seed=1, garbage=['{"step": 121, "loss": 0.', "not json at all", "[1, 2]",
                                              '{"step": 122, "loss": "high", "worker": 1}', ""])
    return a, b


def test_plot_writes_a_png_of_both_workers(two_files, tmp_path, capsys):
    out = tmp_path / "plots" / "deep" / "curves.png"  # parents are created
    assert plot.run([str(p) for p in two_files], str(out)) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().startswith(str(out))
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    pixels = mpimg.imread(str(out))
    height, width = pixels.shape[:2]
    assert (width, height) == (plot.FIGSIZE[0] * plot.DPI, plot.FIGSIZE[1] * plot.DPI)
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    assert captured.err.strip() == f"psctl plot: skipped 4 malformed lines in {two_files[1]}"


def test_load_reads_steps_accuracy_and_final_records(two_files):
    series, skipped = plot.load([str(p) for p in two_files])
    assert skipped == {str(two_files[0]): 0, str(two_files[1]): 4}
    by_label = {s.label: s for s in series}
    assert set(by_label) == {"worker 0", "worker 1"}
    w1 = by_label["worker 1"]
    assert w1.step == list(range(1, 121))  # the malformed step records 121/122 were not added
    assert w1.acc == [(60.0, 0.6, 0.8)]
    assert w1.final == (120.0, pytest.approx(1.4), 0.94)


def test_figure_has_a_line_per_worker_and_accuracy_points(two_files):
    series, _ = plot.load([str(p) for p in two_files])
    fig = plot.figure(series)
    loss_step, loss_time, acc_step, acc_time = fig.axes
    labels = [t.get_text() for t in loss_step.get_legend().get_texts()]
    assert labels == ["worker 0 (avg 10)", "worker 1 (avg 6)"]
    assert loss_step.get_yscale() == "log"
    # per worker: the raw loss and its moving average, against step and against time
    assert len(loss_step.get_lines()) == len(loss_time.get_lines()) == 4
    finals = [ln for ln in acc_step.get_lines() if ln.get_marker() == "*"]
    assert sorted(float(ln.get_ydata()[0]) for ln in finals) == [0.93, 0.94]
    assert sorted(float(ln.get_xdata()[0]) for ln in finals) == [120.0, 200.0]


def test_same_worker_id_in_two_files_and_an_appended_rerun_get_distinct_labels(tmp_path):
    a, b = tmp_path / "job-a.jsonl", tmp_path / "job-b.jsonl"
    _write_metrics(a, 0, 30, seed=0)
    _write_metrics(b, 0, 30, seed=1)
    with open(b, "a") as f:  # the same worker ran again with the same --metrics-out
        f.write(json.dumps({"step": 1, "loss": 2.0, "worker": 0, "time": 0.0}) + "\n")
    series, _ = plot.load([str(a), str(b)])
    assert [s.label for s in series] == ["job-a: worker 0", "job-b: worker 0 (run 1)",
                                         "job-b: worker 0 (run 2)"]


def test_moving_average_is_trailing_and_skips_nan():
    y = [1.0, 3.0, math.nan, 5.0, 7.0]
    assert np.allclose(plot.moving_average(y, 2), [1.0, 2.0, 3.0, 5.0, 6.0])
    assert np.array_equal(plot.moving_average(y, 1), np.array(y), equal_nan=True)


def test_a_file_of_only_malformed_lines_is_an_error(tmp_path):
    junk = tmp_path / "junk.jsonl"
    junk.write_text("nope\n{\n")
    with pytest.raises(InvalidArgument, match="no metrics records"):
        plot.run([str(junk)], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_cli_missing_file_is_one_line_exit_2(two_files, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    out = tmp_path / "never.png"
    assert cli.main(["plot", str(two_files[0]), str(missing), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"psctl: InvalidArgument: metrics file {missing} does not exist"]
    assert not out.exists()


def test_cli_unwritable_output_is_one_line_exit_2(two_files, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "curves.png"  # its parent is a regular file
    assert cli.main(["plot", str(two_files[0]), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "InvalidArgument" in err[0]
