"""`psctl plot`: loss and held-out accuracy or AUC curves from workers' JSON-lines metrics.

Reads what `psctl worker --metrics-out` writes (worker/train.py): one record per pushed step
{"step", "clock", "loss", "worker", "time"}, and a final record with "eval_accuracy" (the
classifiers) or "eval_auc" and "teacher_auc" (ctr-sparse), "steps", "wall_s", ... Records
with an "accuracy" or an "auc" field (periodic evaluations, e.g. bench/ctr_sparse_auc.py's
served-auc.jsonl) are plotted too. Held-out AUC gets its own row of panels, with the
planted teacher's AUC as a line: the best any model reaches on that test set. One series per
worker per file; `--metrics-out` starts a new file, but one written with `--append` (or
concatenated by hand) holds several runs, each its own series.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys

import numpy as np

from shardps.pscommon.errors import InvalidArgument

SMOOTH_MAX = 50       # widest moving-average window, in steps
FIGSIZE = (12, 8)     # inches; at DPI, a 1200x800 PNG
DPI = 100


@dataclasses.dataclass
class Series:
    """One worker's run from one file."""

    source: str
    worker: object                 # the record's "worker" field, None when absent
    run: int = 0                   # > 0 when the file holds several runs of this worker
    label: str = ""
    step: list = dataclasses.field(default_factory=list)
    time: list = dataclasses.field(default_factory=list)
    loss: list = dataclasses.field(default_factory=list)
    # periodic evaluations ("accuracy" records): step, time, accuracy
    acc: list = dataclasses.field(default_factory=list)
    # the final record's held-out accuracy: step, time, accuracy (or None)
    final: tuple | None = None
    # held-out AUC (ctr-sparse), the same two ways: periodic points and the final record's
    auc: list = dataclasses.field(default_factory=list)
    final_auc: tuple | None = None
    teacher_auc: float | None = None
    ended: bool = False            # a final record closed this run


def _num(value) -> float | None:
    """A JSON number as float; None for anything else (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _nan(value) -> float:
    v = _num(value)
    return math.nan if v is None else v


def _check_file(path: str) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.exists():
        raise InvalidArgument(f"metrics file {path} does not exist")
    if not p.is_file():
        raise InvalidArgument(f"metrics file {path} is not a regular file")
    return p


def read_file(path: str) -> tuple[list[Series], int]:
    """The series in one metrics file and the number of malformed lines skipped."""
    p = _check_file(path)
    current: dict[object, Series] = {}   # worker -> its run being read
    done: list[Series] = []
    bad = 0
    try:
        # errors="replace": a torn or binary line becomes one malformed line, not a crash
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if not isinstance(rec, dict) or not _record(rec, p, current, done):
                    bad += 1
    except OSError as exc:
        raise InvalidArgument(f"cannot read metrics file {path}: {exc.strerror or exc}") from None
    done.extend(current.values())
    return [s for s in done if s.loss or s.acc or s.final or s.auc or s.final_auc], bad


def _record(rec: dict, path: pathlib.Path, current: dict, done: list) -> bool:
    """Add one record to its series; False (and nothing added) when it is malformed."""
    worker = rec.get("worker")
    if not isinstance(worker, (int, str)) or isinstance(worker, bool):
        worker = None
    step = _num(rec.get("step"))
    has_loss, has_acc, has_final = "loss" in rec, "accuracy" in rec, "eval_accuracy" in rec
    has_auc, has_final_auc = "auc" in rec, "eval_auc" in rec
    # validate before touching any series: a bad record must not split or extend a run
    if has_loss and (step is None or (rec["loss"] is not None and _num(rec["loss"]) is None)):
        return False  # null loss is allowed (plotted as a gap), a string is not
    if (has_acc and _num(rec["accuracy"]) is None) or (has_final and _num(rec["eval_accuracy"]) is None):
        return False
    if (has_auc and _num(rec["auc"]) is None) or \
            (has_final_auc and rec["eval_auc"] is not None and _num(rec["eval_auc"]) is None):
        return False  # a null eval_auc is a worker stopped before it evaluated: it ends the run
    s = current.get(worker)
    # a run ends at its final record, or when the step count starts over (the file was appended to)
    if s is not None and (s.ended or (has_loss and s.step and step <= s.step[-1])):
        done.append(s)
        s = None
    if s is None:
        runs = sum(1 for d in done if d.source == str(path) and d.worker == worker)
        s = current[worker] = Series(source=str(path), worker=worker, run=runs)
    if has_loss:
        s.step.append(step)
        s.time.append(_nan(rec.get("time")))
        s.loss.append(_nan(rec["loss"]))
    at = step if step is not None else (s.step[-1] if s.step else math.nan)
    if has_acc:
        s.acc.append((at, _nan(rec.get("time")), _num(rec["accuracy"])))
    if has_auc:
        s.auc.append((at, _nan(rec.get("time")), _num(rec["auc"])))
    if _num(rec.get("teacher_auc")) is not None:
        s.teacher_auc = _num(rec["teacher_auc"])
    if has_final or has_final_auc:
        end = _final_at(rec, s)
        if has_final:
            s.final = (*end, _num(rec["eval_accuracy"]))
        if has_final_auc and rec["eval_auc"] is not None:
            s.final_auc = (*end, _num(rec["eval_auc"]))
        s.ended = True
    return True


def _final_at(rec: dict, s: Series) -> tuple[float, float]:
    """(step, time) of a final record: its step count, else the run's last step."""
    at = _num(rec.get("steps"))
    at = at if at is not None else (s.step[-1] if s.step else math.nan)
    when = _num(rec.get("time"))
    return at, when if when is not None else _nan(rec.get("wall_s"))


def load(paths: list[str]) -> tuple[list[Series], dict[str, int]]:
    """Every series in `paths`, labelled, and the malformed-line count of each file."""
    series, skipped = [], {}
    for path in paths:  # every file exists before any is read: a typo fails fast, by name
        _check_file(path)
    for path in paths:
        found, bad = read_file(path)
        series += found
        skipped[path] = bad
    _label(series)
    return series, skipped


def _label(series: list[Series]) -> None:
    def base(s):
        return f"worker {s.worker}" if s.worker is not None else pathlib.Path(s.source).stem
    counts: dict[str, int] = {}
    for s in series:
        counts[base(s)] = counts.get(base(s), 0) + 1
    multi_run = {(s.source, s.worker) for s in series if s.run > 0}
    for s in series:
        label = base(s)
        if counts[label] > 1 and s.worker is not None:
            label = f"{pathlib.Path(s.source).stem}: {label}"   # same worker id in several files
        if (s.source, s.worker) in multi_run:
            label += f" (run {s.run + 1})"
        s.label = label


def moving_average(y, window: int) -> np.ndarray:
    """Trailing mean over `window` points, same length as y; NaNs are left out of each mean
    (a diverged step does not blank the rest of the curve)."""
    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or y.size == 0:
        return y.copy()
    ok = np.isfinite(y)
    sums = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, y.size + 1)
    lo = np.maximum(0, hi - window)
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), np.nan)


def smoothing_window(n: int) -> int:
    return max(1, min(SMOOTH_MAX, n // 20))


@dataclasses.dataclass(frozen=True)
class Metric:
    """A held-out metric's row of panels: where a series keeps it, and how it is titled."""

    title: str
    ylabel: str
    points: str        # Series field of the periodic points
    final: str         # Series field of the final record's point
    digits: int        # in the legend's "final" value


ACCURACY = Metric("held-out accuracy", "accuracy", "acc", "final", 3)
AUC = Metric("held-out AUC", "ROC AUC", "auc", "final_auc", 4)


def metric_rows(series: list[Series]) -> list[Metric]:
    """The metric rows below the loss: accuracy, AUC or both, as the records carry them; an
    (empty, labelled) accuracy row when they carry neither."""
    rows = [m for m in (ACCURACY, AUC)
            if any(getattr(s, m.points) or getattr(s, m.final) is not None for s in series)]
    return rows or [ACCURACY]


def figure(series: list[Series]):
    """Loss vs step and vs time (top), then each held-out metric (accuracy, AUC) vs step and
    vs time, one row per metric the records carry."""
    # The object API with an explicit Agg canvas: no pyplot, so no global figure registry and
    # no GUI backend is ever selected (psctl runs on headless machines and inside daemons).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = metric_rows(series)
    rows = 1 + len(metrics)
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * rows / 2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    # a metric shares its x axis with the loss above it: the final point lines up with the
    # end of its loss curve instead of sitting alone in an auto-zoomed empty panel
    axes = fig.subplots(rows, 2, sharex="col")
    _loss_panels(axes[0], series)
    for row, metric in zip(axes[1:], metrics):
        _metric_panels(row, series, metric)
    sources = len({s.source for s in series})
    fig.suptitle(f"shardps training metrics: {len(series)} series from {sources} file(s)")
    return fig


def _loss_panels(axes, series: list[Series]) -> None:
    ls, lt = axes
    positive = all(v > 0 for s in series for v in s.loss if math.isfinite(v))
    for i, s in enumerate(series):
        if not s.loss:
            continue
        color = f"C{i % 10}"
        w = smoothing_window(len(s.loss))
        smooth = moving_average(s.loss, w)
        name = s.label + (f" (avg {w})" if w > 1 else "")
        for ax, x in ((ls, s.step), (lt, s.time)):
            ax.plot(x, s.loss, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(x, smooth, color=color, linewidth=1.6, label=name)
    for ax, xlabel in ((ls, "step"), (lt, "wall time (s)")):
        ax.set_title(f"training loss vs {xlabel.split(' (')[0]}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cross-entropy loss")
        if positive and any(s.loss for s in series):
            ax.set_yscale("log")  # the loss falls over orders of magnitude
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
        ax.tick_params(labelbottom=True)  # sharex would hide the upper panels' tick labels
    if any(s.loss for s in series):
        ls.legend(fontsize="small")


def _metric_panels(axes, series: list[Series], m: Metric) -> None:
    by_step, by_time = axes
    for i, s in enumerate(series):
        color = f"C{i % 10}"
        points, final = getattr(s, m.points), getattr(s, m.final)
        for ax, col in ((by_step, 0), (by_time, 1)):
            if points:
                ax.plot([a[col] for a in points], [a[2] for a in points], color=color, marker="o",
                        markersize=3, linewidth=1.2, label=f"{s.label} eval")
            if final is not None:
                ax.plot([final[col]], [final[2]], color=color, marker="*", markersize=12,
                        linestyle="none", label=f"{s.label} final {final[2]:.{m.digits}f}")
    values = [a[2] for s in series for a in getattr(s, m.points)] + \
        [getattr(s, m.final)[2] for s in series if getattr(s, m.final) is not None]
    teachers = sorted({s.teacher_auc for s in series if s.teacher_auc is not None}) if m is AUC else []
    for ax, xlabel in ((by_step, "step"), (by_time, "wall time (s)")):
        ax.set_title(f"{m.title} vs {xlabel.split(' (')[0]}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(m.ylabel)
        ax.grid(True, alpha=0.3)
        for t in teachers:   # the planted teacher's AUC: the ceiling on this test set
            ax.axhline(t, color="0.3", linestyle="--", linewidth=1.0, label=f"teacher {t:.4f}")
        if values:
            ax.set_ylim(*_ylim(values + teachers, m))
        else:
            ax.text(0.5, 0.5, f"no {m.ylabel} records", ha="center", va="center", transform=ax.transAxes)
    if values:
        by_step.legend(fontsize="small", loc="lower right")


def _ylim(values: list[float], m: Metric) -> tuple[float, float]:
    """From a round number below the lowest point up to just above the highest (1 for
    accuracy): differences keep their scale. AUC's steps are finer: a model's distance to the
    teacher is a few hundredths."""
    if m is ACCURACY:
        return max(0.0, math.floor((min(values) - 0.05) * 10) / 10), max(1.0, max(values)) + 0.01
    return max(0.0, math.floor((min(values) - 0.01) * 50) / 50), min(1.0, max(values)) + 0.01


def run(paths: list[str], out: str, report=None) -> int:
    """Write the PNG; one line about it on `report` (default stdout)."""
    series, skipped = load(paths)
    for path, bad in skipped.items():
        if bad:
            print(f"psctl plot: skipped {bad} malformed line{'s' if bad != 1 else ''} in {path}",
                  file=sys.stderr)
    if not series:
        raise InvalidArgument(f"no metrics records in {', '.join(paths)}")
    fig = figure(series)
    target = pathlib.Path(out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, format="png")  # PNG whatever the name's extension says
    except OSError as exc:
        raise InvalidArgument(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"{target}: {len(series)} series from {len({s.source for s in series})} file(s)",
          file=report or sys.stdout, flush=True)
    return 0
