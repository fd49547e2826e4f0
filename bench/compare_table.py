"""The before/after table of bench/compare_commits.sh: medians per side, [min-max], and after /
before.

    python bench/compare_table.py bench/results/compare 0bf095a
"""
from __future__ import annotations

import collections
import json
import pathlib
import statistics
import sys


def lines(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spread(values: list[float], digits: int = 0) -> str:
    fmt = f"{{:.{digits}f}}"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main(argv: list[str]) -> int:
    out, rev = pathlib.Path(argv[0]), (argv[1] if len(argv) > 1 else "before")
    runs = {side: collections.defaultdict(list) for side in ("before", "after")}
    for side in runs:
        for r in lines(out / side / "ps_loop.jsonl"):
            runs[side][(r["preset"], r["servers"], r["workers"], r["impl"])].append(r)
    print(f"| preset | S | W | impl | MB/s at {rev} | MB/s now | now / {rev} | server RSS MB at {rev} | now |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted(set(runs["before"]) | set(runs["after"])):
        b, a = runs["before"].get(key, []), runs["after"].get(key, [])
        if not (a and b):
            continue
        mb, ma = (statistics.median(x["MBps"] for x in side) for side in (b, a))
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {spread([x['MBps'] for x in b])} | "
              f"{spread([x['MBps'] for x in a])} | {ma / mb:.2f} | "
              f"{statistics.median(x['server_rss_mb'] for x in b):.0f} | "
              f"{statistics.median(x['server_rss_mb'] for x in a):.0f} |")
    digits = {side: lines(out / f"{side}-digits.jsonl") for side in ("before", "after")}
    if all(digits.values()):
        print()
        print(f"| digits, W = 3 | at {rev} | now |")
        print("|---|---|---|")
        for field, label, d in (("time_to_target_s", "time to 95% s", 2), ("updates_per_s", "updates/s", 0)):
            row = [spread([r[field] for r in digits[s] if r.get(field) is not None], d) for s in ("before", "after")]
            print(f"| {label} | {row[0]} | {row[1]} |")
        ok = [f"{sum(bool(r.get('updates_ok')) for r in digits[s])}/{len(digits[s])}" for s in ("before", "after")]
        print(f"| updates_ok | {ok[0]} | {ok[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
