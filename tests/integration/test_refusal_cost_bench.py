"""bench/refusal_cost.py, issue 16's soak explained: it runs end to end against real daemons
with security on, every forged kind is refused with its code (none answered OK), and the
accepted kinds are answered."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "refusal_cost.py"


@pytest.mark.slow
def test_every_forged_kind_is_refused_and_measured(tmp_path):
    out = tmp_path / "refusal.json"
    env = dict(os.environ, SECURITY="on", N="20")
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    r = json.loads(out.read_text())
    assert r["security"] == "on" and r["unexpected"] == []
    assert r["floor"]["codes"] == {"OK": 20}
    kinds = {row["kind"]: row for row in r["rows"]}
    assert len(kinds) == 10
    for name, row in kinds.items():
        assert sum(row["codes"].values()) == 20, row
        if name.startswith("accepted"):
            assert row["codes"] == {"OK": 20}, row
        else:
            assert "OK" not in row["codes"], row
        assert row["round_trip_us"] > 0
    assert "| bare grpcio echo (the floor) |" in done.stdout


def test_a_bad_setting_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=dict(os.environ, SECURITY="maybe"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "SECURITY='maybe'" in done.stderr
