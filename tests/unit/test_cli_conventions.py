"""psctl's command-line conventions, in-process (no daemon): no abbreviated flags, a usage
line and the closest valid flag on a typo, global options after the command, exit codes,
defaults and every codec in --help; and the worker's closing line and metrics file."""
from __future__ import annotations

import json
import re

import pytest

from shardps.pscommon.config import CODECS, PULL_CODECS
from shardps.pscommon.errors import InvalidArgument
from shardps.psctl import cli
from shardps.worker.train import MetricsWriter, TrainConfig, summary_line


@pytest.fixture(autouse=True)
def _no_malloc_tuning(monkeypatch):
    monkeypatch.setenv("SHARDPS_MALLOC_TUNING", "0")   # main() runs in the test process



def _stderr_of(capsys, argv: list[str], code: int) -> list[str]:
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return captured.err.splitlines()


def test_every_parser_refuses_abbreviations():
    parsers = list(cli._parsers(cli.build_parser()))
    assert len(parsers) >= 10   # psctl and each of its commands
    assert all(p.allow_abbrev is False for p in parsers), [p.prog for p in parsers if p.allow_abbrev]


def test_an_abbreviated_flag_is_refused_with_the_flag_it_abbreviates(capsys):
    assert _stderr_of(capsys, ["server", "--shard", "0", "--scheduler", "127.0.0.1:1"], 2) == [
        "usage: psctl server [options] --scheduler SCHEDULER",
        "psctl server: unrecognized argument --shard; did you mean --shard-id?"]


@pytest.mark.parametrize("typo", [["--stalenes", "2"], ["--stalenes=2"]])
def test_a_misspelt_flag_gets_the_usage_line_and_the_closest_flag(capsys, typo):
    assert _stderr_of(capsys, ["scheduler", *typo], 2) == [
        "usage: psctl scheduler [options]",
        "psctl scheduler: unrecognized argument --stalenes; did you mean --staleness?"]


def test_a_flag_like_nothing_valid_is_named_without_a_guess(capsys):
    assert _stderr_of(capsys, ["plot", "m.jsonl", "-o", "x.png", "--zzzzzz"], 2) == [
        "usage: psctl plot [options] --out OUT METRICS [METRICS ...]",
        "psctl plot: unrecognized argument --zzzzzz"]


def test_a_misspelt_command_gets_the_closest_command(capsys):
    assert _stderr_of(capsys, ["sheduler", "--servers", "2"], 2) == [
        "usage: psctl [options] COMMAND ...",
        "psctl: unknown command 'sheduler'; did you mean scheduler?"]


def test_other_usage_errors_stay_one_line(capsys):
    assert _stderr_of(capsys, ["worker"], 2) == ["psctl worker: the following arguments are required: --scheduler"]
    lines = _stderr_of(capsys, ["status", "--scheduler", "127.0.0.1:1", "--log-level", "LOUD"], 2)
    assert len(lines) == 1 and lines[0].startswith("psctl status: argument --log-level: invalid choice: 'LOUD'")


@pytest.mark.parametrize("argv,level", [
    (["status", "--scheduler", "127.0.0.1:1"], "INFO"),
    (["--log-level", "warning", "status", "--scheduler", "127.0.0.1:1"], "WARNING"),
    (["status", "--scheduler", "127.0.0.1:1", "--log-level", "debug"], "DEBUG"),
    (["--log-level", "ERROR", "status", "--scheduler", "127.0.0.1:1", "--log-level", "DEBUG"], "DEBUG"),
])
def test_log_level_is_accepted_before_and_after_the_command(argv, level):
    assert cli.build_parser().parse_args(argv).log_level == level


def test_every_command_accepts_the_global_options_after_it():
    top = cli.build_parser()
    globals_ = {o for a in top._actions for o in a.option_strings} - {"-h", "--help"}
    assert globals_ == {"--log-level"}
    for sub in list(cli._parsers(top))[1:]:
        assert globals_ <= set(sub._option_string_actions), sub.prog


def test_an_unreachable_scheduler_is_a_runtime_failure_exit_1(capsys):
    lines = _stderr_of(capsys, ["status", "--scheduler", "127.0.0.1:1", "--timeout", "1"], 1)
    assert len(lines) == 1 and lines[0].startswith("psctl: Unavailable: cannot reach scheduler at 127.0.0.1:1")


def test_a_bad_value_is_a_usage_error_exit_2(capsys):
    lines = _stderr_of(capsys, ["plot", "/nonexistent-dir/m.jsonl", "-o", "x.png"], 2)
    assert lines == ["psctl: InvalidArgument: metrics file /nonexistent-dir/m.jsonl does not exist"]


def test_ctrl_c_in_a_command_exits_130(monkeypatch, capsys):
    def interrupted(a):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "status", interrupted)
    assert _stderr_of(capsys, ["status", "--scheduler", "127.0.0.1:1"], 130) == []


def test_help_shows_defaults_and_exits_0(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")   # one line per option
    assert cli.main(["worker", "--help"]) == 0
    out = capsys.readouterr().out
    for flag, default in [("--steps STEPS", "300"), ("--batch-size BATCH_SIZE", "32"),
                          ("--model MODEL", "digits-mlp"), ("--step-delay STEP_DELAY", "0.0"),
                          ("--device {auto,cpu,cuda}", "auto"), ("--log-level {DEBUG,INFO,WARNING,ERROR,CRITICAL}",
                                                                  "INFO")]:
        assert re.search(rf"^  {re.escape(flag)}\s.*\(default: {re.escape(default)}\)$", out, re.M), (flag, out)
    assert "(default: None)" not in out and "(default: False)" not in out


def test_help_lists_every_codec_from_the_registry(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["scheduler", "--help"]) == 0
    out = capsys.readouterr().out
    push = re.search(r"^  --push-codec PUSH_CODEC\s+(.*)$", out, re.M).group(1)
    pull = re.search(r"^  --pull-codec PULL_CODEC\s+(.*)$", out, re.M).group(1)
    assert push == "gradients' codec: fp32|raw|fp16|bf16|int8[:BLOCK]|topk[:DENSITY] (raw is fp32) (default: fp32)"
    assert pull == "weights' codec: fp32|raw|fp16|bf16 (raw is fp32) (default: fp32)"
    listed = re.findall(r"[a-z0-9]+", push.split(":", 1)[1].split("(")[0].replace("[:BLOCK]", "")
                        .replace("[:DENSITY]", ""))
    assert listed == list(CODECS)   # the registry's names, in its order
    assert set(re.findall(r"[a-z0-9]+", pull.split(":", 1)[1].split("(")[0])) == PULL_CODECS


def test_root_help_documents_the_exit_codes(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["--help"]) == 0
    assert ("exit codes: 0 success, 1 failure while running, 2 bad command line, 130 interrupted (Ctrl-C)"
            in capsys.readouterr().out)


def test_append_reaches_the_worker_config():
    a = cli.build_parser().parse_args(["worker", "--scheduler", "127.0.0.1:1", "--metrics-out", "m", "--append"])
    assert a.append is True
    assert cli.build_parser().parse_args(["worker", "--scheduler", "127.0.0.1:1"]).append is False


# -- the worker's closing line --------------------------------------------------------------------
SUMMARY = dict(worker=2, steps=300, skipped=0, final_loss=0.08412, eval_accuracy=0.9621, wall_s=7.264,
               bytes_sent=12_084_000, bytes_received=24_020_000, stopped=False)


def test_a_finished_worker_says_so_in_one_readable_line():
    assert summary_line(SUMMARY, TrainConfig(scheduler="127.0.0.1:1", steps=300)) == (
        "worker 2 finished: 300 steps, loss 0.084, accuracy 0.962, 41.3 steps/s, pushed 12.1 MB, pulled 24.0 MB")


def test_a_finished_epochs_worker_names_the_epochs():
    line = summary_line(dict(SUMMARY, steps=1, wall_s=0.5), TrainConfig(scheduler="127.0.0.1:1", epochs=1))
    assert line == ("worker 2 finished: 1 step (1 epoch), loss 0.084, accuracy 0.962, 2.0 steps/s, "
                    "pushed 12.1 MB, pulled 24.0 MB")


def test_a_stopped_worker_says_how_far_it_got():
    cfg = TrainConfig(scheduler="127.0.0.1:1", steps=300)
    assert summary_line(dict(SUMMARY, steps=57, stopped=True), cfg) == \
        "worker 2 stopped after 57 of 300 steps (interrupted)"
    assert summary_line(dict(SUMMARY, steps=1, stopped=True), TrainConfig(scheduler="x:1", epochs=3)) == \
        "worker 2 stopped after 1 step (interrupted)"
    # a signal after the last step: the run finished all the same
    assert summary_line(dict(SUMMARY, stopped=True), cfg).startswith("worker 2 finished: 300 steps,")


# -- the metrics file -----------------------------------------------------------------------------
def test_metrics_out_starts_a_new_file_unless_appending(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"stale": "a record of an older run"}\n')
    w = MetricsWriter(str(path))
    w.write(step=1, loss=0.5)
    w.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]
    w = MetricsWriter(str(path), append=True)
    w.write(step=1, loss=0.4)
    w.close()
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [0.5, 0.4]


def test_an_unwritable_metrics_file_is_named(tmp_path):
    with pytest.raises(InvalidArgument) as err:
        MetricsWriter(str(tmp_path / "missing-dir" / "m.jsonl"))
    assert str(err.value) == f"cannot write --metrics-out {tmp_path / 'missing-dir' / 'm.jsonl'}: " \
                             "No such file or directory"


# -- how long a server keeps trying to reach the scheduler ----------------------------------------------
def test_server_connect_timeout_reaches_the_server_config(monkeypatch, capsys):
    import threading

    from shardps.psserver import daemon
    seen = []
    monkeypatch.setattr(cli, "_stop_event", threading.Event)   # no signal handlers in the test process
    monkeypatch.setattr(daemon, "run", lambda cfg, stop: seen.append(cfg) or 0)
    assert cli.main(["server", "--scheduler", "127.0.0.1:1", "--connect-timeout", "7.5"]) == 0
    assert cli.main(["server", "--scheduler", "127.0.0.1:1"]) == 0
    assert [c.register_timeout_s for c in seen] == [7.5, 60.0]
    for bad in ("0", "-1", "soon", "inf"):
        assert cli.main(["server", "--scheduler", "127.0.0.1:1", "--connect-timeout", bad]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("psctl server: argument --connect-timeout: "), err


# -- psctl up's workers are named as their files ---------------------------------------------------------
def test_psctl_up_names_each_worker_as_its_files(monkeypatch, tmp_path):
    from shardps.pscommon.config import JobSpec
    from shardps.psctl import up
    cluster = up.Cluster(tmp_path)
    cluster.scheduler_address = "127.0.0.1:7000"
    spawned = {}
    monkeypatch.setattr(cluster, "spawn", lambda name, args: spawned.setdefault(name, args))
    cluster.start_worker(2, up.UpConfig(job=JobSpec()))
    args = spawned["worker-2"]
    assert args[args.index("--name") + 1] == "worker-2"
    assert args[args.index("--metrics-out") + 1] == str(tmp_path / "worker-2.jsonl")
    a = cli.build_parser().parse_args(args)   # a command line psctl worker takes
    assert a.name == "worker-2"
    assert cli.build_parser().parse_args(["worker", "--scheduler", "127.0.0.1:1"]).name == ""   # HOST:PID


def test_a_misspelt_flag_is_named_before_a_missing_one(capsys):
    # docs/api.md's example, as written: `--shard` is the mistake, whatever else is missing
    assert _stderr_of(capsys, ["server", "--shard", "0"], 2) == [
        "usage: psctl server [options] --scheduler SCHEDULER",
        "psctl server: unrecognized argument --shard; did you mean --shard-id?"]
    assert _stderr_of(capsys, ["server"], 2) == ["psctl server: the following arguments are required: --scheduler"]
    parser = cli.build_parser()   # the look for a misspelt flag leaves every required flag required
    with pytest.raises(cli.UsageError):
        parser.parse_args(["server", "--shard", "0"])
    assert parser._subparsers._group_actions[0].choices["server"]._option_string_actions["--scheduler"].required
