"""bench/row_step_cost.py --quick: it runs the servicer's row path for real and reports every
stage for every configuration (fields, never timings)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
STAGES = ("decode", "apply", "lookup", "encode", "stages", "handler")


def test_quick_run_reports_every_stage_of_every_layout():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "row_step_cost.py"), "--quick", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["bench"] == "row_step_cost" and result["optimizer"] == "adagrad" and result["mode"] == "async"
    assert result["field_counts"] == [1, 2] and result["rounds"] == 1
    layouts = {(c["fields"], c["layout"]): c for c in result["configs"]}
    assert set(layouts) == {(1, "per-field"), (1, "shared"), (2, "per-field"), (2, "shared")}
    assert layouts[2, "per-field"]["tables"] == 2 and layouts[2, "shared"]["tables"] == 1
    # the same rows either way: the layouts differ in tables only
    assert layouts[2, "per-field"]["rows_per_step"] == layouts[2, "shared"]["rows_per_step"] > \
        layouts[1, "per-field"]["rows_per_step"] > 0
    for c in result["configs"]:
        assert set(c["ms"]) == set(STAGES) and all(v >= 0 for v in c["ms"].values())
    assert set(result["per_table_ms"]) == set(STAGES)
    assert all(isinstance(v, float) for v in result["per_table_ms"].values())
