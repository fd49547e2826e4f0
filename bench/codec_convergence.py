"""Push/pull codecs against accuracy: what compression costs a trained digits-mlp.

Each run is one `psctl up --json` (scheduler, 1 server, W workers as real processes; async,
SGD lr 0.1 on the server, batch 32, the same steps per worker for every codec), with the
push codec under test and bf16 pulls, plus the fp32/fp32 baseline; top-k at 1% density is
run with error feedback (the default) and without it (`--no-error-feedback`, the ablation).
Per run: `final_accuracy` from psctl up's summary (held-out accuracy of the served
parameters once every worker has finished, read through the job's pull codec), and the wire
ratios from its `status` (the servers' push_traffic / pull_traffic: logical fp32 bytes over
payload bytes on the wire), plus the workers' own count of what they sent (headers included).

    python bench/codec_convergence.py --seeds 0 --codecs topk:0.01 topk:0.01/noef --steps 100
    python bench/codec_convergence.py --render bench/results/codec_convergence.jsonl --out-dir bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))

from convergence import hist_merge, median, traffic_ratio  # noqa: E402  (bench/ is sys.path[0])

# (push codec, error feedback); every one with --pull (bf16), and the fp32/fp32 baseline
DEFAULT_CODECS = ["fp32", "fp16", "bf16", "int8", "topk:0.01", "topk:0.01/noef"]
BASELINE = ("fp32", "fp32", True)


def parse_codec(text: str) -> tuple[str, bool]:
    """`topk:0.01/noef` -> ("topk:0.01", False)."""
    name, _, flag = text.partition("/")
    if flag not in ("", "noef"):
        raise argparse.ArgumentTypeError(f"{text!r}: only /noef may follow the codec")
    return name, flag != "noef"


def label(push: str, pull: str, ef: bool) -> str:
    return f"push {push}{'' if ef else ' (no EF)'} / pull {pull}"


def worker_sent(run_dir: pathlib.Path) -> tuple[int, int]:
    """(logical, wire incl. headers) bytes the workers pushed, from their final metrics records."""
    logical = wire = 0
    for path in run_dir.glob("worker-*.jsonl"):
        lines = path.read_text().strip().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        for t in last.get("compression", {}).values():
            logical += t["logical_bytes"]
            wire += t["wire_bytes"]
    return logical, wire


def run_one(a, push: str, pull: str, ef: bool, seed: int, run_dir: pathlib.Path) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "shardps.psctl", "up", "--servers", "1", "--workers", str(a.workers),
           "--mode", "async", "--model", "digits-mlp", "--steps", str(a.steps), "--seed", str(seed),
           "--lr", repr(a.lr), "--push-codec", push, "--pull-codec", pull, "--json",
           "--run-dir", str(run_dir), "--timeout", str(a.timeout)]
    if not ef:
        cmd.append("--no-error-feedback")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(run_dir / "up.json", "wb") as out, open(run_dir / "up.stderr", "wb") as err:
        # a fresh interpreter (never a fork of this one); psctl up tears its cluster down itself
        proc = subprocess.run(cmd, stdout=out, stderr=err, cwd=ROOT, env=env, timeout=a.timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"psctl up exited {proc.returncode}: "
                           f"{(run_dir / 'up.stderr').read_text()[-500:]} (logs in {run_dir})")
    s = json.loads((run_dir / "up.json").read_text())
    servers = [v for v in s["status"]["servers"] if "keys" in v]
    stale = hist_merge([v["staleness"] for v in servers])
    logical, wire = worker_sent(run_dir)
    ws = s["workers"]
    return dict(
        label=label(push, pull, ef), push_codec=push, pull_codec=pull, error_feedback=ef, seed=seed,
        workers=a.workers, steps=a.steps, lr=a.lr, mode="async",
        final_accuracy=s["final_accuracy"], worker_eval_accuracy=[w["eval_accuracy"] for w in ws],
        worker_exit_codes=[w["exit_code"] for w in ws], worker_steps=[w["steps"] for w in ws],
        push_ratio=traffic_ratio(servers, "push"), pull_ratio=traffic_ratio(servers, "pull"),
        push_logical_bytes=sum(v["push_traffic"]["logical_bytes"] for v in servers),
        push_wire_bytes=sum(v["push_traffic"]["wire_bytes"] for v in servers),
        worker_push_ratio_with_headers=round(logical / wire, 3) if wire else None,
        version=sum(v["version"] for v in servers), staleness_mean=round(stale["mean"], 3),
        up_wall_s=s["wall_s"], train_wall_s=max((w["wall_s"] or 0) for w in ws))


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f}" if xs else "-"


def render_table(runs: list[dict]) -> str:
    groups = defaultdict(list)
    for r in runs:
        groups[(r["push_codec"], r["pull_codec"], r["error_feedback"])].append(r)
    base = [r["final_accuracy"] for r in groups.get(BASELINE, [])]
    base_med = median(base)
    r0 = runs[0]
    out = ["# Codecs and convergence\n",
           f"digits-mlp through `psctl up --json`: {r0['workers']} workers, 1 server, async, SGD lr {r0['lr']:g} on the "
           f"server, batch 32, {r0['steps']} steps per worker; {len({r['seed'] for r in runs})} seed(s). Final accuracy = "
           "held-out accuracy of the served parameters after training, read through the pull codec (psctl up's "
           "final_accuracy); median [min-max] over runs. Wire ratios = logical fp32 bytes / payload bytes on the wire, "
           "from the servers' traffic counters in `status` (push, pull); 'with headers' = the workers' own count of "
           "pushed bytes including each tensor's metadata.\n",
           "| push codec | pull codec | runs | final acc median [min-max] | vs fp32/fp32 | push ratio | "
           "push ratio with headers | pull ratio |",
           "|---|---|---|---|---|---|---|---|"]
    order = lambda k: (k != BASELINE, DEFAULT_CODECS.index(k[0] if k[2] else f"{k[0]}/noef")
                       if (k[0] if k[2] else f"{k[0]}/noef") in DEFAULT_CODECS else 99, k)
    for k in sorted(groups, key=order):
        rs = groups[k]
        acc = [r["final_accuracy"] for r in rs]
        delta = f"{median(acc) - base_med:+.3f}" if base_med is not None else "-"
        f = lambda key: f"{median([r[key] for r in rs]):.2f}x" if median([r[key] for r in rs]) else "-"
        out.append(f"| {k[0]}{'' if k[2] else ' **without error feedback**'} | {k[1]} | {len(rs)} "
                   f"| **{median(acc):.3f}** [{spread(acc)}] | {delta} | {f('push_ratio')} "
                   f"| {f('worker_push_ratio_with_headers')} | {f('pull_ratio')} |")
    with_ef = [r["final_accuracy"] for r in runs if r["push_codec"].startswith("topk") and r["error_feedback"]]
    no_ef = [r["final_accuracy"] for r in runs if r["push_codec"].startswith("topk") and not r["error_feedback"]]
    if with_ef and no_ef:
        paired = {(r["seed"], r["push_codec"], r["pull_codec"]): r["final_accuracy"] for r in runs
                  if r["push_codec"].startswith("topk") and r["error_feedback"]}
        drops = [paired[(r["seed"], r["push_codec"], r["pull_codec"])] - r["final_accuracy"] for r in runs
                 if r["push_codec"].startswith("topk") and not r["error_feedback"]
                 and (r["seed"], r["push_codec"], r["pull_codec"]) in paired]
        out.append(f"\nError-feedback ablation (top-k): median final accuracy {median(with_ef):.3f} with error feedback, "
                   f"{median(no_ef):.3f} without; drop per seed (with - without): "
                   + ", ".join(f"{d:+.3f}" for d in drops) + ".")
    out.append("\nNotes: tensors of at most 4096 bytes (the two biases) are sent as raw fp32 whatever the lossy push codec "
               "(the job's small_tensor_bytes), which caps top-k's ratio; int8 is blockwise with stochastic rounding; "
               "top-k at 1% keeps 82 of the 8192 first-layer and 13 of the 1280 second-layer weights per push, "
               "with their indices. psctl up starts each worker as soon as it has connected, so with W >= 2 the "
               "first steps run with fewer workers; that is the same for every codec.")
    return "\n".join(out)


def render(runs: list[dict], out_dir: pathlib.Path) -> None:
    md = render_table(runs)
    (out_dir / "CODEC_CONVERGENCE.md").write_text(md + "\n")
    print(md)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--codecs", type=parse_codec, nargs="+", default=[parse_codec(c) for c in DEFAULT_CODECS],
                    help="push codecs, CODEC[/noef] (noef: without error feedback); default "
                         + " ".join(DEFAULT_CODECS))
    ap.add_argument("--pull", default="bf16", help="pull codec with every push codec under test")
    ap.add_argument("--no-baseline", action="store_true", help="skip the fp32/fp32 run")
    ap.add_argument("--steps", type=int, default=150, help="steps per worker")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=1, help="runs per (seed, codec)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run (psctl up --timeout)")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--json-out", default=None, help="JSON lines (default OUT_DIR/codec_convergence.jsonl)")
    ap.add_argument("--append", action="store_true", help="keep earlier lines of --json-out")
    ap.add_argument("--keep-logs", action="store_true", help="keep each run's folder under OUT_DIR/runs")
    ap.add_argument("--render", nargs="+", metavar="JSONL", help="only render these files into OUT_DIR")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends TERM: run the cleanup
    a = parse(argv)
    out_dir = pathlib.Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.render:
        render([json.loads(l) for p in a.render for l in open(p) if l.startswith("{")], out_dir)
        return 0
    json_out = pathlib.Path(a.json_out or out_dir / "codec_convergence.jsonl")
    if not a.append:
        json_out.write_text("")
    configs = ([] if a.no_baseline else [BASELINE]) + [(push, a.pull, ef) for push, ef in a.codecs]
    run_root = out_dir / "runs" if a.keep_logs else pathlib.Path(tempfile.mkdtemp(prefix="shardps-codec-conv-"))
    failures = 0
    for seed in a.seeds:
        for rep in range(a.reps):
            for push, pull, ef in configs:  # interleaved, so machine noise spreads over every codec
                name = f"{push.replace(':', '')}{'' if ef else '-noef'}-{pull}-s{seed}-r{rep}"
                t = time.monotonic()
                try:
                    r = run_one(a, push, pull, ef, seed, run_root / name)
                except Exception as exc:  # one failed run must not lose the others
                    failures += 1
                    print(f"FAIL {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                r["rep"] = rep
                with open(json_out, "a") as f:
                    f.write(json.dumps(r) + "\n")
                if not a.keep_logs:
                    shutil.rmtree(run_root / name, ignore_errors=True)
                print(f"ok   {name}: {time.monotonic() - t:.0f}s, final accuracy {r['final_accuracy']}, "
                      f"push {r['push_ratio']}x, pull {r['pull_ratio']}x", file=sys.stderr)
    if not a.keep_logs and not failures:
        shutil.rmtree(run_root, ignore_errors=True)
    runs = [json.loads(l) for l in open(json_out) if l.startswith("{")]
    if runs:
        render(runs, out_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
