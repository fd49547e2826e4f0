"""Attack: strings that reach an operator's terminal. A worker name or server address that
holds terminal escapes (stored by an older scheduler, which did not refuse them, and loaded
from its state file) must not reach the terminal raw through `psctl status`: the text view
shows them with repr-style escapes; the JSON view keeps the exact value, escaped by JSON."""
from __future__ import annotations

import json

import pytest

from shardps.pscommon.config import JobSpec
from shardps.psctl import cli
from shardps.scheduler import membership as mb
from shardps.scheduler.core import STATE_FILE, SchedulerCore
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess

NAME = "\x1b]0;owned\x07\x1b[2J\x1b[31mworker\r\nfake line\x00\u202e"
ADDRESS = "\x1b[8m127.0.0.1:1\x1b[0m"


def _raw_controls(text: str) -> list[str]:
    return sorted({repr(ch) for ch in text if not ch.isprintable() and ch != "\n"})


@pytest.fixture
def hostile_scheduler(tmp_path):
    """A scheduler resumed from a state file that holds hostile strings."""
    job = JobSpec(num_servers=1)
    state = tmp_path / "state"
    old = SchedulerCore(job, str(state))
    old.join_worker(NAME, None)
    old.register_server("127.0.0.1:1", 0)
    data = json.loads((state / STATE_FILE).read_text())
    for m in data["membership"]["members"]:
        if m["role"] == mb.SERVER:
            m["address"] = ADDRESS
    (state / STATE_FILE).write_text(json.dumps(data))
    proc = SchedulerProcess(SchedulerConfig(job=job, state_dir=str(state)))
    proc.start()
    yield proc
    proc.drain()


def test_status_text_escapes_control_characters(hostile_scheduler, capsys, monkeypatch):
    monkeypatch.setenv("SHARDPS_MALLOC_TUNING", "0")
    assert cli.main(["status", "--scheduler", hostile_scheduler.address, "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert _raw_controls(out) == []
    assert "fake line" in out and "\\x1b]0;owned\\x07" in out and "\\r\\n" in out
    assert "\\x1b[8m127.0.0.1:1\\x1b[0m" in out


def test_status_json_keeps_the_exact_strings(hostile_scheduler, capsys, monkeypatch):
    monkeypatch.setenv("SHARDPS_MALLOC_TUNING", "0")
    assert cli.main(["status", "--scheduler", hostile_scheduler.address, "--json", "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert _raw_controls(out) == []
    st = json.loads(out)
    assert [w["name"] for w in st["workers"]] == [NAME]
    assert [s["address"] for s in st["servers"]] == [ADDRESS]
