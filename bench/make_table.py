"""Render ps-loop JSON lines (bench/ps_loop.py and the peer scripts) as a markdown report.

    python bench/make_table.py bench/results/ps_loop.jsonl [more.jsonl ...] > RESULTS.md

Three tables: every implementation per preset and configuration (median over runs, as the
peers' RESULTS.md); shardps's MB/s over the raw-gRPC ceiling and over torch.distributed.rpc
on TCP, at the same malloc setting; the one-core copy ceiling when memcpy rows are present.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections import defaultdict

TUNED = "+malloc"


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            for line in f:
                if not line.startswith("{"):
                    continue  # a failed run leaves nothing or a traceback line; skip it
                r = json.loads(line)
                # grpc_raw runs both message granularities; each is its own row
                link = r.get("link")
                for row in (r.pop("modes").values() if "modes" in r else [r]):
                    if link:   # a shaped link is its own preset: ratios compare runs on the same link
                        row["preset"] = f"{row['preset']}@{link}"
                    rows.append(row)
    return rows


def split_impl(impl: str) -> tuple[str, bool]:
    """('shardps[pull=bf16]', True) from 'shardps[pull=bf16]+malloc'."""
    return (impl[:-len(TUNED)], True) if impl.endswith(TUNED) else (impl, False)


def family(base: str) -> str:
    return base.split("[", 1)[0]


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    versions = []
    for mod in ("grpc", "numpy", "torch"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return (f"nproc={os.cpu_count()} ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, " + ", ".join(versions))


def median(rs: list[dict], key: str):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


FAMILY_ORDER = {"shardps": 0, "grpc_raw": 1, "torch_rpc": 2}


def main_table(net: dict) -> list[str]:
    out = ["| preset | impl | S | W | N | n | wall s | steps/s | MB/s [min-max] | RSS srv/wkr MB "
           "| srv RSS / params | ok | lo |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def order(k):
        preset, impl, s, w = k
        base, tuned = split_impl(impl)
        return (preset != "small", s, w, FAMILY_ORDER.get(family(base), 9), base, tuned)

    for k in sorted(net, key=order):
        preset, impl, s, w = k
        rs = net[k]
        mb = [r["MBps"] for r in rs]
        ok = all(r.get("bytes_ok") and r.get("update_ok") for r in rs)
        ratio = median(rs, "server_rss_per_param")  # shardps only
        out.append(
            f"| {preset} | {impl} | {s} | {w} | {rs[0]['steps']} | {len(rs)} | {fmt(median(rs, 'wall_s'), '.2f')} "
            f"| {fmt(median(rs, 'steps_per_s'), '.1f')} | **{statistics.median(mb):.0f}** [{min(mb):.0f}-{max(mb):.0f}] "
            f"| {fmt(median(rs, 'server_rss_mb'), '.0f')}/{fmt(median(rs, 'worker_rss_mb'), '.0f')} "
            f"| {fmt(ratio, '.2f')} | {'yes' if ok else 'NO'} | {fmt(median(rs, 'lo_bytes_per_logical'), '.2f')} |")
    return out


def ratio_table(net: dict) -> list[str]:
    """shardps / best grpc_raw mode and shardps / torch_rpc[uv], same preset, S, W, malloc."""
    mbps = {k: statistics.median(r["MBps"] for r in rs) for k, rs in net.items()}
    by_cfg = defaultdict(dict)  # (preset, S, W, tuned) -> {base impl: median MB/s}
    for (preset, impl, s, w), v in mbps.items():
        base, tuned = split_impl(impl)
        by_cfg[(preset, s, w, tuned)][base] = v
    out = ["| preset | S | W | malloc | shardps impl | MB/s | grpc_raw best MB/s | shardps / grpc_raw "
           "| torch_rpc[uv] MB/s | shardps / torch_rpc[uv] |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(by_cfg, key=lambda k: (k[0] != "small", k[1], k[2], k[3])):
        preset, s, w, tuned = key
        impls = by_cfg[key]
        raw = [v for b, v in impls.items() if family(b) == "grpc_raw"]
        raw_best = max(raw) if raw else None
        uv = impls.get("torch_rpc[uv]")
        for base in sorted(b for b in impls if family(b) == "shardps"):
            v = impls[base]
            out.append(f"| {preset} | {s} | {w} | {'tuned' if tuned else 'default'} | {base} | {v:.0f} "
                       f"| {fmt(raw_best, '.0f')} | {fmt(raw_best and v / raw_best, '.2f')} "
                       f"| {fmt(uv, '.0f')} | {fmt(uv and v / uv, '.2f')} |")
    return out


def memcpy_table(mem: dict) -> list[str]:
    out = ["| preset | N | n | copy MB/s | = steps/s if each byte is copied once | SGD pass MB/s of grads "
           "| = pushes/s one server core can apply |", "|---|---|---|---|---|---|---|"]
    for preset in sorted(mem, key=lambda p: p != "small"):
        rs = mem[preset]
        out.append(f"| {preset} | {rs[0]['steps']} | {len(rs)} | {fmt(median(rs, 'MBps'), '.0f')} "
                   f"| {fmt(median(rs, 'steps_per_s'), '.1f')} | {fmt(median(rs, 'sgd_MBps'), '.0f')} "
                   f"| {fmt(median(rs, 'sgd_steps_per_s'), '.1f')} |")
    return out


def render(rows: list[dict]) -> str:
    net, mem = defaultdict(list), defaultdict(list)
    for r in rows:
        if r["impl"] == "memcpy":
            mem[r["preset"]].append(r)
        else:
            net[(r["preset"], r["impl"], r.get("servers"), r.get("workers"))].append(r)
    out = ["# ps-loop: shardps beside the peer baselines", "",
           f"Machine: {machine()}", "",
           "Workload and peer scripts: bench/peers/README.md; shardps: bench/ps_loop.py "
           "(bench/README.md). Median over n runs, MB/s range in brackets. MB/s = (pulled + pushed fp32 "
           "logical bytes) / wall / 1e6; steps/s summed over workers. RSS = peak resident set of the "
           "largest server / worker. srv RSS / params = a shardps server's peak RSS over the parameter "
           "bytes it holds. ok = server byte counts exact and every SGD update applied. lo = loopback TCP "
           "bytes / logical bytes (~1: the data crossed TCP; 0: shared memory). '+malloc' = glibc malloc "
           "tuned (peers: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the environment; shardps: "
           "mallopt at start-up, off with SHARDPS_MALLOC_TUNING=0). shardps places tensors byte-balanced, "
           "the peers round-robin: the same load per server for these equal-sized tensors.", ""]
    if net:
        out += main_table(net) + ["", "## shardps against the ceilings", "",
                                   "Median MB/s ratios at the same preset, S, W and malloc setting; grpc_raw "
                                   "best = the faster of [step] and [tensor].", ""]
        out += ratio_table(net)
    if mem:
        out += ["", "## One core, no IPC (peers' memcpy_limit.py, best of 5 timings per run)", ""]
        out += memcpy_table(mem)
    out += ["", "Runs share the machine's cores (S + W processes plus their gRPC/TensorPipe threads), so "
            "W=2 and S=2 runs are CPU-bound; see the ranges before trusting a digit."]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    paths = argv or ["bench/results/ps_loop.jsonl"]
    print(render(load(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
