"""emb-loop JSON lines (bench/emb_loop.py and the peers of bench/peers) as markdown: first
shardps beside torch_rpc_emb and the one-core limits per preset and configuration, with
shardps as x of torch_rpc_emb[uv] and x of emb_limit[id64]; then every run, as the peers'
own bench/peers/emb_table.py renders them.

    python bench/emb_compare_table.py bench/results/emb_loop.jsonl [MORE.jsonl ...] > EMB_LOOP.md
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys
from collections import defaultdict

sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent / "peers"))

import emb_table  # noqa: E402  (bench/peers: the peers' renderer, kept as it is)

UV, AUTO, DENSE, ID64 = "torch_rpc_emb[uv]", "torch_rpc_emb[auto]", "emb_limit[dense]", "emb_limit[id64]"
GOAL_X_UV = 1.0  # issue 13: emb-loop rows/s >= 1.0x torch_rpc_emb[uv] at every preset and configuration


def base(impl: str) -> str:
    """shardps+malloc and shardps are one column; the JSON's malloc_tuned tells them apart."""
    return impl.removesuffix("+malloc")


def compare(runs: list[dict]) -> str:
    cells = defaultdict(list)  # (preset, impl, S, W) -> M rows/s of each run
    limits = defaultdict(list)  # (preset, impl) -> M rows/s; the limits' S and W are nominal
    for r in runs:
        m = r["rows_per_s"] / 1e6
        if r["impl"].startswith("emb_limit"):
            limits[(r["preset"], r["impl"])].append(m)
        else:
            cells[(r["preset"], base(r["impl"]), r["servers"], r["workers"])].append(m)
    ours = sorted({k[1] for k in cells if k[1].startswith("shardps")})
    peers = [p for p in (UV, AUTO) if any(k[1] == p for k in cells)]
    med = statistics.median

    def cell(ms):
        if not ms:
            return "-"
        return f"**{med(ms):.3f}** [{min(ms):.3f}-{max(ms):.3f}] n={len(ms)}" if len(ms) > 1 else f"**{ms[0]:.3f}** n=1"

    def ratio(a, b):
        return f"{med(a) / med(b):.2f}" if a and b else "-"

    head = ["preset", "S,W", *ours, *peers, DENSE, ID64]
    for o in ours:
        head += [f"{o} x uv", f"{o} x id64"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    short = []
    for preset in sorted({k[0] for k in cells} | {k[0] for k in limits}, key=lambda p: (p != "small", p)):
        dense, id64 = limits.get((preset, DENSE), []), limits.get((preset, ID64), [])
        for s, w in sorted({(k[2], k[3]) for k in cells if k[0] == preset}):
            mine = {o: cells.get((preset, o, s, w), []) for o in ours}
            theirs = {p: cells.get((preset, p, s, w), []) for p in peers}
            row = [preset, f"{s},{w}", *(cell(mine[o]) for o in ours), *(cell(theirs[p]) for p in peers),
                   cell(dense), cell(id64)]
            for o in ours:
                row += [ratio(mine[o], theirs.get(UV, [])), ratio(mine[o], id64)]
                # the two-call variant (--no-fuse) is a comparison, not the path the goal is about
                if (mine[o] and theirs.get(UV) and "[two-call]" not in o
                        and med(mine[o]) / med(theirs[UV]) < GOAL_X_UV):
                    short.append(f"{o} {preset} ({s},{w}): {med(mine[o]) / med(theirs[UV]):.2f}x {UV}")
            out.append("| " + " | ".join(row) + " |")
    notes = ["", "M rows/s = million distinct rows pulled + pushed per second (median [min-max] over n runs). "
             "x uv = shardps over torch_rpc_emb[uv] at the same preset and (S,W); x id64 = shardps over the "
             "one-core emb_limit[id64] of the preset (a per-core yardstick, S and W nominal). "
             f"Goal (issue 13): x uv >= {GOAL_X_UV:.1f} everywhere. [two-call]: bench/emb_loop.py --no-fuse "
             "(PullRows then Push per shard and step, instead of one PushPullBatch), for comparison."]
    notes.append("Short of the goal: " + ("; ".join(short) if short else "none") + ".")
    return "\n".join(out + notes)


def main(paths: list[str]) -> None:
    runs = []
    for path in paths:
        with open(path) as f:
            runs += [json.loads(line) for line in f if line.startswith("{")]  # failed runs leave no JSON
    print("# emb-loop: shardps beside torch.distributed.rpc and the one-core limits\n")
    print(f"Machine: {emb_table.machine()}\n")
    print(compare(runs))
    print("\n## Every run\n")
    print(emb_table.render(runs).split("\n", 4)[-1])  # without the peers' title and machine line


if __name__ == "__main__":
    main(sys.argv[1:] or ["bench/results/emb_loop.jsonl"])
