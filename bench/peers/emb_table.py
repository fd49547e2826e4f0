"""Render emb-loop JSON lines (torch_rpc_emb.py, emb_limit.py, or any system printing the same
fields) as a markdown table on stdout.

    python bench/peers/emb_table.py bench/results/peers/emb.jsonl > EMB_RESULTS.md
"""
import json
import os
import platform
import statistics
import sys
from collections import defaultdict


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    versions = []
    for mod in ("numpy", "torch"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return f"nproc={os.cpu_count()} ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, " + \
        ", ".join(versions)


def render(runs):
    cells = defaultdict(list)
    for r in runs:
        cells[(r["preset"], r["impl"], r["servers"], r["workers"])].append(r)
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    # the one-core limit of each preset: the yardstick of the "x limit" column
    limit = {k[0]: med(rs, "rows_per_s") for k, rs in cells.items() if k[1] == "emb_limit[dense]"}
    out = ["# emb-loop: sparse embedding tables", "", f"Machine: {machine()}", "",
           "Workload: bench/peers/README.md, emb-loop. Median over n runs, [min-max] of M rows/s = million unique "
           "rows pulled + pushed per second. MB/s = rows/s x D x 4 / 1e6 (ids not counted). x limit = rows/s over "
           "emb_limit[dense] of the same preset. uniq = unique ids / B. ok = rows_ok, update_ok and acc_ok. "
           "lo = loopback TCP bytes / fp32 row bytes (~1.1 over TCP, the ids included; 0: shared memory).", "",
           "| preset | impl | S | W | N | n | wall s | steps/s | M rows/s [min-max] | MB/s | x limit | uniq "
           "| RSS srv/wkr MB | ok | lo |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda k: (k[0] != "small", not k[1].startswith("emb_limit"), k[2], k[3], k[1])
    for k in sorted(cells, key=key):
        rs = cells[k]
        m = [r["rows_per_s"] / 1e6 for r in rs]
        mid = statistics.median(m)
        x = f"{mid * 1e6 / limit[k[0]]:.2f}" if k[0] in limit else "-"
        lo = f"{med(rs, 'lo_bytes_per_logical'):.2f}" if all("lo_bytes_per_logical" in r for r in rs) else "-"
        ok = all(r["rows_ok"] and r["update_ok"] and r.get("acc_ok", True) for r in rs)
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {rs[0]['steps']} | {len(rs)} | {med(rs, 'wall_s'):.2f} "
                   f"| {med(rs, 'steps_per_s'):.1f} | **{mid:.2f}** [{min(m):.2f}-{max(m):.2f}] | {med(rs, 'MBps'):.0f} "
                   f"| {x} | {med(rs, 'unique_frac'):.3f} | {med(rs, 'server_rss_mb'):.0f}/{med(rs, 'worker_rss_mb'):.0f} "
                   f"| {'yes' if ok else 'NO'} | {lo} |")
    out += ["", "emb_limit runs one process on one core with worker 0's ids (its S and W are nominal). "
            "The processes of a PS run share the machine's cores, so W = 2 and S = 2 are oversubscribed on a "
            "small machine; read the ranges before trusting a digit."]
    return "\n".join(out)


def main(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            runs += [json.loads(line) for line in f if line.startswith("{")]  # failed runs leave no JSON
    print(render(runs))


if __name__ == "__main__":
    main(sys.argv[1:] or ["emb.jsonl"])
