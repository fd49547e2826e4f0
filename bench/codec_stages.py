"""Where a compressed push and pull spend their CPU, stage by stage, in one process.

    python bench/codec_stages.py [--presets small,large] [--settings ...] [--repeats 7] [--json]
    python bench/codec_stages.py --before DIR [--rounds 3] [--stat min]   # DIR/shardps -> old tree

For each codec setting and each ps-loop preset's tensor size (bench/ps_loop.py: small is 8
tensors of 125,000 float32, large 50 of 500,000), one tensor goes the whole way through the
functions the worker and the server call, each stage timed on its own:

  encode    worker: ErrorFeedback.compress with the lossless layer off (residual + codec)
  lossless  worker: the lossless layer over that payload (codecs.apply_lossless, with the
            ErrorFeedback's per-tensor decision where the tree has one)
  framing   worker: framing.chunk_frames (the serialized messages gRPC sends)
  s.decode  server: framing.parse_frame of every message, then the servicer's _tensors
            (reassembly, lossless undo, codec decode, dtype check)
  s.apply   server: Shard.push (gate, ledger, one sgd step on the key)
  s.pull    server: the servicer's _pull (gate, codec encode, lossless, frames)
  w.decode  worker: parse_frame, then ShardClient._receive into the pull buffer

ms per stage is the median (or, --stat min, the best) over --repeats rounds (each a fresh gradient, so error feedback
and the lossless decision run as in training); MB/s is logical fp32 bytes per second of the
stage. The gRPC transfer itself is not here (bench/ps_loop.py measures the whole loop).
Gradients are N(0, 1e-3) float32, parameters N(0, 1): noise, the worst case for the
lossless layer. Run it against another tree with PYTHONPATH=<dir holding a shardps link>.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np  # noqa: E402

from shardps.pscommon import codecs, framing  # noqa: E402
from shardps.pscommon.lifecycle import tune_malloc  # noqa: E402
from shardps.pscommon.config import CodecConfig, JobSpec  # noqa: E402
from shardps.pscommon.sharding import Key  # noqa: E402
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2  # noqa: E402
from shardps.psserver.servicer import ParameterServerServicer  # noqa: E402
from shardps.psserver.shard import Shard  # noqa: E402
from shardps.worker.compression import ErrorFeedback  # noqa: E402
from shardps.worker.client import ShardClient, TransferCounts  # noqa: E402

PRESETS = {"small": 125_000, "large": 500_000}   # one tensor of each ps-loop preset
# name -> (push codec, pull codec, lossless)
SETTINGS = {
    "fp32": ("fp32", "fp32", "off"),
    "bf16": ("bf16", "bf16", "off"),
    "bf16+auto": ("bf16", "bf16", "auto"),
    "topk1%/bf16": ("topk:0.01", "bf16", "off"),
    "topk1%/bf16+auto": ("topk:0.01", "bf16", "auto"),
    # int8 payloads of noise do not compress by 10%: what the lossless decision saves
    "int8/bf16+auto": ("int8", "bf16", "auto"),
}
STAGES = ("encode", "lossless", "framing", "s.decode", "s.apply", "s.pull", "w.decode")
KEY = "t000"


class _Context:
    """What _pull asks of a gRPC context: the time left before the deadline."""

    def time_remaining(self):
        return 30.0


def _shard(n: int, push: str, pull: str, lossless: str):
    job = JobSpec(push_codec=CodecConfig.parse(push), pull_codec=CodecConfig.parse(pull), lossless=lossless)
    shard = Shard(0, job)
    key = Key(KEY, KEY, tensor_pb2.DTYPE_FLOAT32, (n,), 0, n, 0)
    rng = np.random.default_rng(1)
    shard.declare("bench", [key], {KEY: rng.standard_normal(n, dtype=np.float32)})
    return shard, key


def _client(key: Key) -> ShardClient:
    """A ShardClient's pull receiver without its session: _receive reads only these."""
    client = ShardClient.__new__(ShardClient)
    client.cfg = types.SimpleNamespace(max_tensor_bytes=1 << 31)
    client._lock = __import__("threading").Lock()
    client.traffic = TransferCounts()
    return client


def _timed(times: dict, stage: str, fn):
    start = time.perf_counter()
    out = fn()
    times.setdefault(stage, []).append(time.perf_counter() - start)
    return out


def _round(times, ef, servicer, shard, client, key, grad, push_cfg, lossless, pull_cfg, step, into):
    meta, payload = _timed(times, "encode", lambda: ef.compress(KEY, grad, push_cfg, small_tensor_bytes=4096))
    payload = _timed(times, "lossless", lambda: _lossless(ef, meta, payload, lossless))
    frames = _timed(times, "framing", lambda: list(framing.chunk_frames(meta, payload)))

    def server_decode():
        return servicer._tensors([framing.parse_frame(f) for f in frames], "Push")
    tensors, _ = _timed(times, "s.decode", server_decode)
    _timed(times, "s.apply", lambda: shard.push(1, 1, step, shard.version, {KEY: tensors[KEY]}))

    def pull():
        request = ps_pb2.PullRequest(shard=0, keys=[KEY], step=step + 1, codec=pull_cfg.to_proto(),
                                     model_fingerprint="bench")
        request.caller.observer = True
        _, frames = servicer._pull(request, _Context())
        return list(frames)
    pulled = _timed(times, "s.pull", pull)
    _timed(times, "w.decode", lambda: client._receive(0, {KEY: key}, [framing.parse_frame(f) for f in pulled], into))
    return sum(len(f) for f in frames), sum(len(f) for f in pulled)


def _lossless(ef, meta, payload, lossless):
    """The worker's lossless step, as ErrorFeedback.compress takes it: with the per-tensor
    decisions where the tree has them (older trees compress every message)."""
    decisions = getattr(ef, "lossless", None)
    if decisions is not None:
        return codecs.apply_lossless(meta, payload, lossless, decisions)
    return codecs.apply_lossless(meta, payload, lossless)


STATS = {"median": statistics.median, "min": min}


def run(preset: str, setting: str, repeats: int, stat: str = "median") -> dict:
    n = PRESETS[preset]
    push, pull, lossless = SETTINGS[setting]
    shard, key = _shard(n, push, pull, lossless)
    servicer = ParameterServerServicer(shard)
    client = _client(key)
    ef = ErrorFeedback()
    push_cfg, pull_cfg = CodecConfig.parse(push), CodecConfig.parse(pull)
    rng = np.random.default_rng(2)
    into = {KEY: np.empty(n, np.float32)}
    times: dict[str, list[float]] = {}
    wire = (0, 0)
    for step in range(repeats + 1):   # the first round warms caches and is dropped
        grad = rng.normal(0, 1e-3, n).astype(np.float32)
        round_times: dict[str, list[float]] = {}
        wire = _round(round_times, ef, servicer, shard, client, key, grad, push_cfg, lossless, pull_cfg,
                      step, into)
        if step:
            for s, v in round_times.items():
                times.setdefault(s, []).extend(v)
    ms = {s: STATS[stat](times[s]) * 1e3 for s in STAGES}
    logical = n * 4
    return {"preset": preset, "setting": setting, "elements": n, "push_wire_bytes": wire[0],
            "pull_wire_bytes": wire[1], "ms": ms, "total_ms": sum(ms.values()),
            "mb_s": {s: logical / (ms[s] / 1e3) / 1e6 if ms[s] else float("inf") for s in STAGES},
            "total_mb_s": logical / (sum(ms.values()) / 1e3) / 1e6}


def table(rows: list[dict]) -> str:
    head = f"{'preset':6} {'setting':17}" + "".join(f"{s:>9}" for s in STAGES) + f"{'total':>9}{'MB/s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['preset']:6} {r['setting']:17}" + "".join(f"{r['ms'][s]:9.3f}" for s in STAGES)
                     + f"{r['total_ms']:9.3f}{r['total_mb_s']:7.0f}")
    return "\n".join(lines)


def _best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def hooks(preset: str, repeats: int) -> list[str]:
    """What two hooks outside the codecs would save (see psserver/pull_cache.py and
    codecs.decode_into): the worker's decode + copy against decode_into its buffer, and a
    fresh pull encode (codec, lossless, frames, as the servicer does) against a cache hit."""
    from shardps.psserver.pull_cache import Encoded, PullCache
    n = PRESETS[preset]
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    into, lines = np.empty(n, np.float32), []
    for codec in ("bf16", "topk:0.01"):
        meta, payload = codecs.encode(KEY, x, tensor_pb2.DTYPE_FLOAT32, CodecConfig.parse(codec))
        payload = bytes(payload)
        copy = _best_ms(lambda: into.__setitem__(slice(None), codecs.decode(meta, payload, n).reshape(-1)), repeats)
        direct = _best_ms(lambda: codecs.decode_into(meta, payload, n, into), repeats)
        lines.append(f"{preset} w.decode {codec}: decode + copy {copy:.3f} ms, decode_into {direct:.3f} ms")
    cache, owner = PullCache(), object()
    for lossless in ("off", "auto"):
        def encode(lossless=lossless):
            meta, payload = codecs.encode(KEY, x, tensor_pb2.DTYPE_FLOAT32, CodecConfig.parse("bf16"), 4096, lossless)
            return Encoded(meta, tuple(framing.chunk_frames(meta, payload)), 0.0)
        fresh_ms = _best_ms(encode, repeats)
        cache.get(KEY, lossless, 1, owner, encode)
        hit_ms = _best_ms(lambda: cache.get(KEY, lossless, 1, owner, encode), repeats)
        lines.append(f"{preset} s.pull bf16 lossless={lossless}: fresh encode {fresh_ms:.3f} ms, "
                     f"PullCache hit {hit_ms:.4f} ms")
    return lines


def _side(path: str | None, args: list[str]) -> list[dict]:
    """This script's --json rows, run with `path` (a folder holding a `shardps` link) first
    on PYTHONPATH, or with the environment as it is."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = path
    out = subprocess.run([sys.executable, __file__, "--json", *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def compare(before: str, rounds: int, args: list[str]) -> str:
    """Before and after, alternated `rounds` times so that machine noise falls on both alike;
    per stage the best of the rounds' figures, and after/before."""
    best: dict[tuple, dict] = {}
    for _ in range(rounds):
        for side, path in (("before", before), ("after", None)):
            for r in _side(path, args):
                slot = best.setdefault((r["preset"], r["setting"], side), dict(r["ms"]))
                for s in STAGES:
                    slot[s] = min(slot[s], r["ms"][s])
    head = f"{'preset':6} {'setting':17} {'side':7}" + "".join(f"{s:>9}" for s in STAGES) + f"{'total':>9}{'MB/s':>7}"
    lines = [head, "-" * len(head)]
    rows = dict.fromkeys((preset, setting) for preset, setting, _ in best)
    for (preset, setting, side), ms in ((row + (side,), best[row + (side,)]) for row in rows
                                        for side in ("before", "after")):
        total = sum(ms.values())
        lines.append(f"{preset:6} {setting:17} {side:7}" + "".join(f"{ms[s]:9.3f}" for s in STAGES)
                     + f"{total:9.3f}{PRESETS[preset] * 4 / total / 1e3:7.0f}")
        if side == "after":
            was = best[(preset, setting, "before")]
            lines.append(f"{'':6} {'':17} {'ratio':7}" + "".join(
                f"{ms[s] / was[s] if was[s] else 1.0:9.2f}" for s in STAGES) + f"{total / sum(was.values()):9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="small,large")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--stat", choices=sorted(STATS), default="median",
                   help="per stage, the median or the best of the rounds (best: less noise on a loaded box)")
    p.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    p.add_argument("--before", metavar="DIR", help="compare with the tree a `shardps` link in DIR names")
    p.add_argument("--rounds", type=int, default=3, help="with --before: runs of each side, alternated")
    p.add_argument("--hooks", action="store_true",
                   help="what decode_into and the pull cache would save (not yet called by client/servicer)")
    a = p.parse_args(argv)
    if a.hooks:
        tune_malloc()
        for preset in a.presets.split(","):
            print("\n".join(hooks(preset, a.repeats)))
        return 0
    if a.before:
        args = ["--presets", a.presets, "--settings", a.settings, "--repeats", str(a.repeats), "--stat", a.stat]
        print(f"ms per stage: best of {a.rounds} alternated runs of each side, each the {a.stat} of "
              f"{a.repeats} rounds; ratio = after / before")
        print(compare(a.before, a.rounds, args))
        return 0
    if os.environ.get("SHARDPS_MALLOC_TUNING", "1") != "0":
        tune_malloc()   # as every psctl process does: fresh mmaps would add page faults to each stage
    rows = [run(pr, st, a.repeats, a.stat) for pr in a.presets.split(",") for st in a.settings.split(",")]
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"ms per stage ({a.stat} of {a.repeats} rounds); MB/s: logical fp32 bytes / total")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
