"""`psctl plot`: loss and held-out accuracy curves from workers' JSON-lines metrics.

Reads what `psctl worker --metrics-out` writes (worker/train.py): one record per pushed step
{"step", "clock", "loss", "worker", "time"}, and a final record with "eval_accuracy",
"steps", "wall_s", ... Records with an "accuracy" field (periodic evaluations) are plotted
too. One series per worker per file; `--metrics-out` starts a new file, but one written with
`--append` (or concatenated by hand) holds several runs, each its own series.
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
    return [s for s in done if s.loss or s.acc or s.final], bad


def _record(rec: dict, path: pathlib.Path, current: dict, done: list) -> bool:
    """Add one record to its series; False (and nothing added) when it is malformed."""
    worker = rec.get("worker")
    if not isinstance(worker, (int, str)) or isinstance(worker, bool):
        worker = None
    step = _num(rec.get("step"))
    has_loss, has_acc, has_final = "loss" in rec, "accuracy" in rec, "eval_accuracy" in rec
    # validate before touching any series: a bad record must not split or extend a run
    if has_loss and (step is None or (rec["loss"] is not None and _num(rec["loss"]) is None)):
        return False  # null loss is allowed (plotted as a gap), a string is not
    if (has_acc and _num(rec["accuracy"]) is None) or (has_final and _num(rec["eval_accuracy"]) is None):
        return False
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
    if has_acc:
        at = step if step is not None else (s.step[-1] if s.step else math.nan)
        s.acc.append((at, _nan(rec.get("time")), _num(rec["accuracy"])))
    if has_final:
        at = _num(rec.get("steps"))
        at = at if at is not None else (s.step[-1] if s.step else math.nan)
        when = _num(rec.get("time"))
        s.final = (at, when if when is not None else _nan(rec.get("wall_s")), _num(rec["eval_accuracy"]))
        s.ended = True
    return True


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


def figure(series: list[Series]):
    """The 2x2 figure: loss vs step and vs time (top), held-out accuracy vs step and vs time."""
    # The object API with an explicit Agg canvas: no pyplot, so no global figure registry and
    # no GUI backend is ever selected (psctl runs on headless machines and inside daemons).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    # accuracy shares its x axis with the loss above it: the final point lines up with the
    # end of its loss curve instead of sitting alone in an auto-zoomed empty panel
    (ls, lt), (as_, at) = fig.subplots(2, 2, sharex="col")
    positive = all(v > 0 for s in series for v in s.loss if math.isfinite(v))
    for i, s in enumerate(series):
        color = f"C{i % 10}"
        if s.loss:
            w = smoothing_window(len(s.loss))
            smooth = moving_average(s.loss, w)
            name = s.label + (f" (avg {w})" if w > 1 else "")
            for ax, x in ((ls, s.step), (lt, s.time)):
                ax.plot(x, s.loss, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x, smooth, color=color, linewidth=1.6, label=name)
        for ax, col in ((as_, 0), (at, 1)):
            if s.acc:
                ax.plot([a[col] for a in s.acc], [a[2] for a in s.acc], color=color, marker="o",
                        markersize=3, linewidth=1.2, label=f"{s.label} eval")
            if s.final is not None:
                ax.plot([s.final[col]], [s.final[2]], color=color, marker="*", markersize=12,
                        linestyle="none", label=f"{s.label} final {s.final[2]:.3f}")
    for ax, xlabel in ((ls, "step"), (lt, "wall time (s)")):
        ax.set_title(f"training loss vs {xlabel.split(' (')[0]}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cross-entropy loss")
        if positive and any(s.loss for s in series):
            ax.set_yscale("log")  # the loss falls over orders of magnitude
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
        ax.tick_params(labelbottom=True)  # sharex would hide the upper panels' tick labels
    accs = [a[2] for s in series for a in s.acc] + [s.final[2] for s in series if s.final is not None]
    has_acc = bool(accs)
    for ax, xlabel in ((as_, "step"), (at, "wall time (s)")):
        ax.set_title(f"held-out accuracy vs {xlabel.split(' (')[0]}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(True, alpha=0.3)
        if has_acc:  # from a round number below the lowest point up to 1: differences keep scale
            ax.set_ylim(max(0.0, math.floor((min(accs) - 0.05) * 10) / 10), max(1.0, max(accs)) + 0.01)
        else:
            ax.text(0.5, 0.5, "no accuracy records", ha="center", va="center", transform=ax.transAxes)
    if any(s.loss for s in series):
        ls.legend(fontsize="small")
    if has_acc:
        as_.legend(fontsize="small", loc="lower right")
    sources = len({s.source for s in series})
    fig.suptitle(f"shardps training metrics: {len(series)} series from {sources} file(s)")
    return fig


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
