"""`psctl up`'s live view without processes: the state -> lines functions (live block, plain
line, the redraw escapes), rates over a window, metrics files read while they are written
(partial last lines, replaced files), the sampler on fake processes, probe and clock, the
drawing loop on a StringIO, the `up` flags; and the worker's progress bar naming the shard a
step waits for (issue 17)."""
from __future__ import annotations

import io
import json
import logging
import os

import pytest
from conftest import poll

from shardps.pscommon.errors import DeadlineExceeded, Unavailable
from shardps.psctl import cli, upview
from shardps.psctl.upview import (Progress, Sampler, ShardRow, ShardSample, UpState, UpView, WorkerRow, erase,
                                  redraw, render_live, render_plain, window_rate)

ESC = "\x1b"

STATE = UpState(
    elapsed_s=12.3, mode="async",
    workers=(WorkerRow(0, 120, 300, 0.41234, 9.83, "training"),
             WorkerRow(1, None, 300, None, None, "starting"),
             WorkerRow(2, 300, 300, 0.08, None, "done"),
             WorkerRow(10, 57, 300, 1.2, None, "killed (SIGKILL)")),
    shards=(ShardRow(0, "alive", 238, 119.43), ShardRow(1, "dead", down_s=12.2),
            ShardRow(2, "alive", 1234567, None), ShardRow(3, "missing", down_s=0.4)))


# -- the text ---------------------------------------------------------------------------------------
def test_live_block_has_a_row_per_worker_and_per_shard():
    assert render_live(STATE, width=120) == [
        "training for 12 s, mode async",
        "  worker 0   step    120/300  loss 0.412  9.8 steps/s",
        "  worker 1   step          -  loss     -  starting",
        "  worker 2   step    300/300  loss 0.080  done",
        "  worker 10  step     57/300  loss 1.200  killed (SIGKILL)",
        "  shard 0    version     238              119 updates/s",
        "  shard 1    no server for 12 s (missed its lease; workers wait for this shard)",
        "  shard 2    version 1234567                - updates/s",
        "  shard 3    no server for 0 s (none registered yet; workers wait for this shard)",
    ]


def test_live_block_fits_the_terminal_and_names_a_silent_scheduler():
    state = UpState(3.0, "sync", (WorkerRow(0, 5, None, 2.25, 1.04, "training"),), (ShardRow(0, "left", down_s=2),),
                    problem="scheduler: Unavailable")
    lines = render_live(state, width=40)
    assert lines[0] == "training for 3 s, mode sync  (schedule~"
    assert lines[1] == "  worker 0  step    5  loss 2.250  1.0~"   # --epochs: no total
    assert all(len(line) <= 39 for line in lines), lines
    assert render_live(UpState(0.0), width=80) == ["training for 0 s"]


def test_plain_line_says_the_same_without_escapes():
    line = render_plain(STATE)
    assert line == ("[12 s] worker 0 step 120/300 loss 0.412 9.8 steps/s; worker 1 starting; "
                    "worker 2 step 300/300 loss 0.080 done; worker 10 step 57/300 loss 1.200 killed (SIGKILL); "
                    "shard 0 version 238 119 updates/s; "
                    "shard 1 no server for 12 s (missed its lease; workers wait for this shard); "
                    "shard 2 version 1234567 - updates/s; "
                    "shard 3 no server for 0 s (none registered yet; workers wait for this shard)")
    assert ESC not in line and "\n" not in line
    assert render_plain(UpState(7, problem="scheduler: DeadlineExceeded")) == "[7 s] (scheduler: DeadlineExceeded) "


def test_odd_losses_stay_short():
    rows = [WorkerRow(0, 1, 2, float("nan"), None, "training"), WorkerRow(1, 1, 2, 123456.0, 1000.4, "training")]
    lines = render_live(UpState(1, workers=tuple(rows)))
    assert lines[1] == "  worker 0  step    1/2  loss      nan     - steps/s"
    assert lines[2] == "  worker 1  step    1/2  loss 1.23e+05  1000 steps/s"


def test_redraw_moves_up_over_the_last_block_and_clears_what_is_left():
    assert redraw(["a", "bb"], 0) == f"a{ESC}[K\nbb{ESC}[K\n{ESC}[J"
    assert redraw(["a"], 3) == f"{ESC}[3A\ra{ESC}[K\n{ESC}[J"
    assert erase(2) == f"{ESC}[2A\r{ESC}[J" and erase(0) == ""


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("view,tty,term,kind", [
    ("auto", True, "xterm-256color", "live"), ("auto", True, "dumb", "plain"), ("auto", True, "", "plain"),
    ("auto", False, "xterm", "plain"), ("live", False, "", "live"), ("plain", True, "xterm", "plain"),
    ("none", True, "xterm", "none")])
def test_auto_is_live_only_on_a_terminal_that_moves_its_cursor(monkeypatch, view, tty, term, kind):
    monkeypatch.setenv("TERM", term)
    assert upview.choose(view, _Stream(tty)) == kind


# -- rates ------------------------------------------------------------------------------------------
def test_rates_are_over_the_recent_window():
    samples = [(0.0, 0), (1.0, 100), (2.0, 110), (7.0, 160)]
    assert window_rate(samples, window_s=5.0) == pytest.approx(50 / 5)     # from t=2, not from t=0
    assert window_rate(samples, window_s=100.0) == pytest.approx(160 / 7)
    assert window_rate([(0.0, 0)]) is None
    assert window_rate([(0.0, 0), (0.2, 5)]) is None                       # too short to tell
    assert window_rate([(0.0, 10), (1.0, 5)]) is None                      # started again


def test_history_forgets_old_samples_and_restarts():
    h = upview.History(keep_s=3.0)
    for t in range(10):
        h.add(float(t), 10.0 * t)
    assert [t for t, _ in h.samples] == [6.0, 7.0, 8.0, 9.0]
    assert h.rate() == pytest.approx(10.0)
    h.add(10.0, 3.0)   # the counter went back: a restarted server
    assert list(h.samples) == [(10.0, 3.0)] and h.rate() is None


# -- metrics files ----------------------------------------------------------------------------------
def _step(i: int, loss: float = 1.0) -> str:
    return json.dumps({"step": i, "clock": i, "loss": loss, "worker": 3, "time": 0.1 * i}) + "\n"


def test_parse_lines_keeps_the_unfinished_line():
    records, rest = upview.parse_lines(b'{"step": 1}\nnot json\n[1, 2]\n\xff\xfe\n{"step": 2}\n{"st')
    assert records == [{"step": 1}, {"step": 2}] and rest == b'{"st'


def test_fold_reads_steps_and_the_final_summary():
    p = upview.fold(Progress(), {"step": 3, "loss": 0.5})
    assert p == Progress(3, 0.5)
    assert upview.fold(p, {"event": "partition_done", "epoch": 0}) == p
    assert upview.fold(p, {"step": 4, "loss": None}) == Progress(4, 0.5)
    assert upview.fold(p, {"steps": 40, "final_loss": 0.25, "eval_accuracy": 0.9}) == Progress(40, 0.25, True)


def test_a_metrics_file_is_followed_as_it_is_written(tmp_path):
    path = tmp_path / "worker-0.jsonl"
    tail = upview.MetricsTail(path)
    assert tail.read() == Progress()                       # not there yet
    with open(path, "w") as f:
        f.write(_step(1, 2.0) + _step(2, 1.5)[:9])         # the second line half written
        f.flush()
        assert tail.read() == Progress(1, 2.0)
        f.write(_step(2, 1.5)[9:] + _step(3, 1.25)[:-1])    # the third without its newline
        f.flush()
        assert tail.read() == Progress(2, 1.5)
        f.write("\n" + json.dumps({"worker": 3, "steps": 3, "final_loss": 1.25}) + "\n")
        f.flush()
        assert tail.read() == Progress(3, 1.25, finished=True)
    assert tail.read() == Progress(3, 1.25, finished=True)   # nothing new
    # replaced by a new run (a new file): read from its start
    new = tmp_path / "new.jsonl"
    new.write_text(_step(1, 9.0))
    os.replace(new, path)
    assert tail.read() == Progress(1, 9.0)
    # truncated in place (a new run reusing the file), then written again
    with open(path, "w") as f:
        f.write(json.dumps({"step": 1, "loss": 7.0}) + "\n")
    assert tail.read() == Progress(1, 7.0)


@pytest.mark.parametrize("rc,state", [(None, "training"), (0, "done"), (-9, "killed (SIGKILL)"),
                                      (-15, "killed (SIGTERM)"), (1, "exited 1")])
def test_exit_state(rc, state):
    assert upview.exit_state(rc, Progress(5, 1.0)) == state
    assert upview.exit_state(None, Progress()) == "starting"


def test_worker_procs_are_the_worker_n_entries():
    procs = {"scheduler": "s", "server-0": "a", "worker-0": "w0", "worker-12": "w12", "worker-x": "?"}
    assert upview.worker_procs(procs) == {0: "w0", 12: "w12"}


# -- the sampler, on fakes --------------------------------------------------------------------------
class _Proc:
    def __init__(self, rc=None):
        self.rc = rc

    def poll(self):
        return self.rc


class _Probe:
    def __init__(self):
        self.answers: list = []
        self.closed = False

    def sample(self):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self):
        self.closed = True


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_sampler_builds_rows_from_files_processes_and_the_probe(tmp_path):
    clock, probe = _Clock(), _Probe()
    procs = {0: _Proc(), 1: _Proc()}
    sampler = Sampler(tmp_path, lambda: dict(procs), probe, total_steps=40, mode="async", clock=clock)

    probe.answers.append(("async", [ShardSample(0, "alive", 1, 0, 1.0), ShardSample(1, "missing")]))
    state = sampler.sample()
    assert state.workers == (WorkerRow(0, total=40), WorkerRow(1, total=40))     # both starting
    assert state.shards == (ShardRow(0, "alive", 0, None), ShardRow(1, "missing", down_s=0.0))

    (tmp_path / "worker-0.jsonl").write_text("".join(_step(i, 1.0 / i) for i in range(1, 11)))
    (tmp_path / "worker-1.jsonl").write_text(_step(1))
    clock.t += 2.0
    probe.answers.append(("async", [ShardSample(0, "alive", 1, 20, 3.0), ShardSample(1, "alive", 2, 0, 0.5)]))
    state = sampler.sample()
    assert state.elapsed_s == 2.0
    assert [(w.step, w.state, w.rate) for w in state.workers] == [(10, "training", None), (1, "training", None)]
    assert state.shards[0] == ShardRow(0, "alive", 20, 10.0)   # 20 updates in 2 s of its uptime
    assert state.shards[1] == ShardRow(1, "alive", 0, None)

    with open(tmp_path / "worker-0.jsonl", "a") as f:
        f.write("".join(_step(i, 0.5) for i in range(11, 21)) + '{"step": 21, "lo')
    with open(tmp_path / "worker-1.jsonl", "a") as f:
        f.write(json.dumps({"steps": 1, "final_loss": 0.75}) + "\n")
    procs[1].rc = -9
    procs[2] = _Proc()                     # churn added a worker
    clock.t += 2.0
    probe.answers.append(DeadlineExceeded("slow"))   # the last shard rows stay, marked old
    state = sampler.sample()
    assert state.workers[0] == WorkerRow(0, 20, 40, 0.5, pytest.approx(5.0), "training")
    assert state.workers[1] == WorkerRow(1, 1, 40, 0.75, None, "killed (SIGKILL)")
    assert state.workers[2] == WorkerRow(2, total=40)
    assert state.shards[0].version == 20 and state.problem == "scheduler: DeadlineExceeded"

    clock.t += 3.0
    probe.answers.append(("async", [ShardSample(0, "dead", 1), ShardSample(1, "alive", 2, 30, 3.5)]))
    state = sampler.sample()
    assert state.shards == (ShardRow(0, "dead", down_s=0.0), ShardRow(1, "alive", 30, 10.0))
    assert state.problem == ""
    clock.t += 4.0
    # shard 0 taken over by a new incarnation: a rate of its own, never one across the two servers
    probe.answers.append(("async", [ShardSample(0, "dead", 1), ShardSample(1, "alive", 2, 30, 7.5)]))
    assert sampler.sample().shards[0] == ShardRow(0, "dead", down_s=4.0)
    probe.answers.append(("async", [ShardSample(0, "alive", 3, 25, 1.0), ShardSample(1, "alive", 2, 30, 8.5)]))
    assert sampler.sample().shards[0] == ShardRow(0, "alive", 25, None)

    sampler.close()
    assert probe.closed


# -- the loop that draws ----------------------------------------------------------------------------
class _Sampler:
    """Hands out states one after another (the last one again when they run out)."""

    def __init__(self, *states: UpState):
        self.states = list(states)
        self.closed = False

    def sample(self) -> UpState:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def close(self):
        self.closed = True


def _state(elapsed: float, step: int, state: str = "training") -> UpState:
    return UpState(elapsed, "async", (WorkerRow(0, step, 40, 0.5, 2.0 if state == "training" else None, state),),
                   (ShardRow(0, "alive", step, 2.0),))


def test_live_view_redraws_its_block_and_prints_lines_above_it():
    out = io.StringIO()
    view = UpView("live", _Sampler(_state(1, 3), _state(2, 5), _state(3, 40, "done")), out, width=lambda: 80)
    view._draw()
    first = out.getvalue()
    assert first == redraw(render_live(_state(1, 3)), 0)
    view.say("churn: killed worker 1 (SIGKILL) at 2.0s")
    assert out.getvalue()[len(first):] == (erase(3) + "churn: killed worker 1 (SIGKILL) at 2.0s\n"
                                           + redraw(render_live(_state(1, 3)), 0))
    mark = len(out.getvalue())
    view._draw()
    assert out.getvalue()[mark:] == redraw(render_live(_state(2, 5)), 3)
    view.stop(final=True)   # never started: draws the last state, closes the sampler
    assert out.getvalue().endswith(redraw(render_live(_state(3, 40, "done")), 3))
    assert "  worker 0  step    40/40  loss 0.500  done\x1b[K\n" in out.getvalue()
    assert view.sampler.closed


def test_plain_view_writes_a_line_every_few_seconds():
    out = io.StringIO()
    states = [_state(t, t) for t in (0, 1, 2, 3, 4, 5, 6, 7, 10, 11)] + [_state(11.5, 40, "done")]
    view = UpView("plain", _Sampler(*states), out, every_s=1.0, plain_every_s=5.0)
    for _ in range(10):
        view._draw()
    view.say("churn: started worker 2 at 3.0s")
    view.stop(final=True)
    lines = out.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[0 s", "[5 s", "[10 s", "churn: started worker 2 at 3.0s",
                                                     "[12 s"]
    assert lines[-1] == "[12 s] worker 0 step 40/40 loss 0.500 done; shard 0 version 40 2.0 updates/s"
    assert ESC not in out.getvalue()


def test_the_view_thread_draws_until_stopped_and_not_after():
    out = io.StringIO()
    view = UpView("live", _Sampler(*[_state(i, i) for i in range(1, 40)]), out, every_s=0.01).start()
    poll(lambda: out.getvalue().count(f"{ESC}[3A") >= 2, 30, what="the view to redraw")
    view.stop(final=False)
    drawn = out.getvalue()
    assert not view._thread.is_alive()
    view._draw()   # what a late sample would do: nothing once stopped
    assert out.getvalue() == drawn and view.sampler.closed


def test_a_failing_sampler_or_a_closed_stream_never_stops_psctl_up():
    class Broken:
        def sample(self):
            raise RuntimeError("boom")

        def close(self):
            pass
    out = io.StringIO()
    view = UpView("live", Broken(), out)
    view._draw()
    assert out.getvalue() == ""
    out.close()
    view = UpView("plain", _Sampler(_state(0, 0)), out)
    view._draw()
    view.say("still fine")
    view.stop()


# -- the flags --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,view", [([], "auto"), (["--view", "plain"], "plain"), (["--view", "live"], "live"),
                                       (["--view", "none"], "none"), (["--quiet"], "none")])
def test_up_view_flags(argv, view):
    assert cli.build_parser().parse_args(["up", *argv]).view == view


def test_an_unknown_view_is_a_usage_error(capsys):
    assert cli.main(["up", "--view", "fancy"]) == 2
    err = capsys.readouterr().err
    assert "argument --view: invalid choice: 'fancy'" in err and "Traceback" not in err


# -- the worker's progress bar while a step waits for a shard ---------------------------------------
class _Bar:
    def __init__(self):
        self.description = ""

    def set_description_str(self, text):
        self.description = text


def _notice(shard: int, exc: Exception, waited: float) -> logging.LogRecord:
    """The record Transport.call logs while it retries a shard."""
    return logging.LogRecord("shardps.worker", logging.WARNING, __file__, 1,
                             "waiting for shard %d at %s: %s (%.0f s so far, giving up after %.0f s)",
                             (shard, "127.0.0.1:1", exc, waited, 120.0), None)


def test_the_progress_bar_names_the_shard_a_step_waits_for():
    from shardps.worker import train
    assert train.wait_notice(_notice(1, Unavailable("connection refused"), 2.0)) == (1, "no server", 2.0)
    assert train.wait_notice(_notice(0, DeadlineExceeded("slow"), 7.0)) == (0, "no answer", 7.0)
    other = logging.LogRecord("shardps.worker", logging.WARNING, __file__, 1, "waiting for %s: %s", ("x", "y"), None)
    assert train.wait_notice(other) is None
    assert train.wait_text({}, 5.0) == ""
    assert train.wait_text({1: (0.0, "no server")}, 12.4) == "waiting for shard 1 (no server for 12 s)"

    clock, bar = _Clock(), _Bar()
    logger = logging.getLogger("shardps.test_upview")
    waits = train.BarWaits(bar, logger=logger, clock=clock)
    try:
        logger.warning("unrelated")
        assert bar.description == ""
        logger.handle(_notice(1, Unavailable("refused"), 2.0))
        assert bar.description == "waiting for shard 1 (no server for 2 s)"
        clock.t += 10.0
        waits.tick()
        assert bar.description == "waiting for shard 1 (no server for 12 s)"
        logger.handle(_notice(1, Unavailable("refused"), 12.0))   # the next notice: still since the first
        logger.handle(_notice(0, DeadlineExceeded("slow"), 2.0))
        assert bar.description == "waiting for shard 0 (no answer for 2 s), shard 1 (no server for 12 s)"
        waits.clear()   # the step went on
        assert bar.description == ""
        waits.tick()
        assert bar.description == ""
    finally:
        waits.close()
    assert waits not in logger.handlers
