"""psctl's conventions through real `psctl` processes: a typo or an abbreviation is refused
with the usage line and the closest flag (exit 2), a runtime failure exits 1, Ctrl-C 130 and
SIGTERM 0, global options work after the command; the worker ends with one readable line and
`--metrics-out` starts a new file unless `--append`.

The first tests start no daemon, the signal test one scheduler (a couple of seconds); the
worker test, which trains, is in the slow tier.
"""
from __future__ import annotations

import re
import signal

import pytest

from .helpers import assert_worker_metrics, poll, read_metrics, run_psctl


def _refused(r, *stderr_lines: str) -> None:
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert r.stdout == ""
    assert r.stderr.splitlines() == list(stderr_lines)


def test_a_misspelt_flag_is_refused_with_the_usage_line_and_the_closest_flag():
    _refused(run_psctl("scheduler", "--stalenes", "2"),
             "usage: psctl scheduler [options]",
             "psctl scheduler: unrecognized argument --stalenes; did you mean --staleness?")


def test_an_abbreviated_flag_is_refused_not_expanded():
    # `--shard` once started a server as `--shard-id 0`; now nothing starts
    _refused(run_psctl("server", "--shard", "0", "--scheduler", "127.0.0.1:1"),
             "usage: psctl server [options] --scheduler SCHEDULER",
             "psctl server: unrecognized argument --shard; did you mean --shard-id?")


def test_global_option_after_the_command_and_runtime_failure_exit_1():
    # --log-level after the command is accepted (no usage error); the unreachable scheduler is
    # a failure while running: exit 1, one line
    r = run_psctl("status", "--scheduler", "127.0.0.1:1", "--timeout", "2", "--log-level", "warning")
    assert r.returncode == 1, f"exit {r.returncode}\nstderr: {r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("psctl: Unavailable: cannot reach scheduler at 127.0.0.1:1"), lines
    _refused(run_psctl("status", "--scheduler", "127.0.0.1:1", "--log-levl", "DEBUG"),
             "usage: psctl status [options] --scheduler SCHEDULER",
             "psctl status: unrecognized argument --log-levl; did you mean --log-level?")


def test_help_shows_defaults_and_lists_raw():
    r = run_psctl("worker", "--help")
    assert r.returncode == 0 and r.stderr == ""
    text = " ".join(r.stdout.split())   # whatever the terminal width wrapped
    assert "--steps STEPS (default: 300)" in text
    assert "override the job's push codec: fp32|raw|fp16|bf16|int8[:BLOCK]|topk[:DENSITY] (raw is fp32)" in text


def test_ctrl_c_exits_130_sigterm_0_and_log_level_after_the_command_applies(procs):
    quiet = procs.spawn("quiet", "scheduler", "--listen", "127.0.0.1:0", "--ready-file",
                        str(procs.root / "quiet.addr"), "--log-level", "WARNING")
    loud = procs.spawn("loud", "scheduler", "--listen", "127.0.0.1:0", "--ready-file", str(procs.root / "loud.addr"))
    procs.wait_ready(quiet, procs.root / "quiet.addr")
    procs.wait_ready(loud, procs.root / "loud.addr")
    quiet.popen.send_signal(signal.SIGINT)
    loud.popen.send_signal(signal.SIGTERM)
    assert quiet.wait(30) == 130, quiet.log_text()
    assert loud.wait(30) == 0, loud.log_text()
    assert quiet.log_text() == "", "--log-level WARNING after the command hides the INFO lines"
    assert " INFO shardps" in loud.log_text()   # the default level logs the start
    assert "Traceback" not in loud.log_text()


# -- the worker's closing line and its metrics file ----------------------------------------------
FINISHED = re.compile(r"worker (\d+) finished: 5 steps, loss (\d+\.\d{3}), accuracy (\d\.\d{3}), "
                      r"(\d+\.\d) steps/s, pushed (\d+\.\d) MB, pulled (\d+\.\d) MB")


@pytest.mark.slow
def test_worker_closing_lines_and_metrics_file(procs):
    sched = procs.scheduler("--mode", "async")
    procs.server(sched.address, 0)
    metrics = procs.root / "w.jsonl"
    metrics.write_text('{"step": 1, "loss": 9.9, "worker": 99}\n')   # an older run's file

    out = procs.root / "first.out"
    with open(out, "wb") as f:
        first = procs.spawn("first", "worker", "--scheduler", sched.address, "--steps", "5", "--no-progress",
                            "--metrics-out", str(metrics), stdout=f)
    assert first.wait(240) == 0, first.log_text()[-3000:]
    final = assert_worker_metrics(metrics, 5)   # the older run is gone: a new file
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and FINISHED.fullmatch(lines[0]), lines
    assert lines[0] == (f"worker {final['worker']} finished: 5 steps, loss {final['final_loss']:.3f}, "
                        f"accuracy {final['eval_accuracy']:.3f}, {5 / final['wall_s']:.1f} steps/s, "
                        f"pushed {final['bytes_sent'] / 1e6:.1f} MB, pulled {final['bytes_received'] / 1e6:.1f} MB")
    assert "worker done" not in first.log_text() and "{'worker'" not in first.log_text()

    out = procs.root / "second.out"
    with open(out, "wb") as f:
        second = procs.spawn("second", "worker", "--scheduler", sched.address, "--steps", "100000",
                             "--step-delay", "0.05", "--no-progress", "--metrics-out", str(metrics), "--append",
                             stdout=f)
    poll(lambda: len(read_metrics(metrics)) >= 6 + 3, 240, what="the second worker's steps appended")
    second.popen.send_signal(signal.SIGINT)
    assert second.wait(60) == 130, second.log_text()[-3000:]
    records = read_metrics(metrics)
    assert [r.get("step") for r in records[:5]] == [1, 2, 3, 4, 5] and records[5] == final   # appended to
    stopped = records[-1]
    assert stopped["stopped"] is True and 0 < stopped["steps"] < 100000
    assert [r["step"] for r in records[6:-1]] == list(range(1, stopped["steps"] + 1))
    assert out.read_text().splitlines() == [
        f"worker {stopped['worker']} stopped after {stopped['steps']} of 100000 steps (interrupted)"]
    assert "Traceback" not in second.log_text()
