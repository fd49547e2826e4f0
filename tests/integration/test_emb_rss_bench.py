"""bench/emb_rss.py, issue 13's memory goal: it runs end to end at --quick size, the rows the
servers report are the rows the worker created, and the bytes it divides by add up."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "emb_rss.py"
TOP = ("dim", "optimizer", "servers", "batch", "malloc_tuned", "runs", "worker_rss_mb", "goal_size",
       "goal_worker_under_400mb", "goal_server_ratio_le_1_5")
RUN = ("rows_asked", "rows_pushed", "table_rows", "steps", "train_s", "rows_updated", "worker_rss_mb",
       "worker_rss_before_training_mb", "server_base_rss_mb", "max_server_ratio", "per_server")
SERVER = ("shard", "rows", "peak_rss_mb", "values_mb", "state_mb", "index_mb", "bookkeeping_mb", "held_mb",
          "slab_capacity", "index_check", "ratio", "ratio_with_bookkeeping")


@pytest.mark.slow
def test_quick_run_reports_every_field_and_the_servers_hold_the_rows_pushed():
    # one size: the tenth before it is the same code on a second cluster (the suite's time)
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--one-size", "--json", "--timeout", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(TOP) <= set(r) and r["dim"] == 16 and r["servers"] == 2
    assert [run["rows_asked"] for run in r["runs"]] == [20_000]
    for run in r["runs"]:
        assert set(RUN) <= set(run)
        # every id is fresh: each one pushed is one row created, held by exactly one server
        assert run["rows_pushed"] == run["rows_asked"] == run["table_rows"] == run["rows_updated"]
        assert len(run["per_server"]) == 2
        assert sum(s["rows"] for s in run["per_server"]) == run["table_rows"]
        for s in run["per_server"]:
            assert set(SERVER) <= set(s)
            assert s["rows"] > 0 and s["slab_capacity"] >= s["rows"]
            assert s["index_check"], s   # the server's held bytes = whole slab rows + this index
            assert s["peak_rss_mb"] > s["values_mb"] + s["state_mb"] > 0
            assert s["ratio"] > s["ratio_with_bookkeeping"] > 0
        assert 0 < run["worker_rss_before_training_mb"] <= run["worker_rss_mb"]
    assert r["worker_rss_mb"] == [run["worker_rss_mb"] for run in r["runs"]]
    assert r["goal_size"] is False   # 20,000 rows: the goal's ratio is not claimed at this size
