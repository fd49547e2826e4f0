"""Codec benchmark: wire ratio and encode/decode throughput per codec and tensor size.

    python -m bench.codecs [--sizes 65536,1048576,25000000] [--codecs fp32,bf16+zstd,...]
                           [--repeats 3] [--json-out results.jsonl]

Each codec spec is `<codec>[+<lossless>]` with codec as in --push-codec (fp32, fp16, bf16,
int8[:BLOCK], topk[:DENSITY]) and lossless one of zstd, lz4, auto. Inputs are float32
N(0, 1), the usual shape of a gradient; real gradients often compress better under the
lossless layer (sparse embeddings, zero rows).

ratio = logical bytes / (payload bytes + serialized TensorMeta); the payload includes top-k
indices and int8 scales. Encode/decode MB/s = logical bytes / seconds, best of --repeats (and
of at least 0.2 s of runs for small tensors), through the public codecs.encode/codecs.decode
(lossless layer and validation included). rel. RMSE = ||decoded - x|| / ||x||.
A lossless layer that saves under 10% is not applied (the "lossless" column says whether it
was), so "int8+zstd" on noise-like data usually equals "int8".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from shardps.pscommon import codecs
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.tensors import chunk_payload
from shardps.pscommon.wire.v1 import tensor_pb2

DEFAULT_SIZES = [1 << 16, 1 << 20, 25_000_000]
DEFAULT_CODECS = ["fp32", "fp16", "bf16", "int8", "topk:0.01", "topk:0.1", "bf16+zstd", "int8+zstd"]


def parse_spec(spec: str) -> tuple[CodecConfig, str]:
    codec, _, lossless = spec.partition("+")
    return CodecConfig.parse(codec), lossless or "off"


MIN_TOTAL_S = 0.2   # small tensors run more often than --repeats, so the best is less noisy
MAX_RUNS = 50


def _best(fn, repeats: int):
    best, result, runs, total = float("inf"), None, 0, 0.0
    while runs < repeats or (total < MIN_TOTAL_S and runs < MAX_RUNS):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best, runs, total = min(best, elapsed), runs + 1, total + elapsed
    return best, result


def run_one(spec: str, x: np.ndarray, repeats: int, rng: np.random.Generator) -> dict:
    cfg, lossless = parse_spec(spec)
    n = x.size
    enc_s, (meta, payload) = _best(
        lambda: codecs.encode("bench", x, tensor_pb2.DTYPE_FLOAT32, cfg, 0, lossless, rng), repeats)
    # The meta as it goes on the wire: chunk_payload fills payload_size.
    next(iter(chunk_payload(meta, payload)))
    header = meta.ByteSize()
    dec_s, out = _best(lambda: codecs.decode(meta, payload, n), repeats)
    assert out.shape == x.shape
    logical = x.nbytes
    wire = len(payload) + header
    return {
        "codec": spec, "elements": n, "logical_bytes": logical, "payload_bytes": len(payload),
        "header_bytes": header, "ratio": logical / wire,
        "wire_codec": tensor_pb2.Codec.Name(meta.codec),
        "lossless": (tensor_pb2.Lossless.Name(meta.lossless.algorithm)
                     if meta.HasField("lossless") else "none"),
        "encode_MBps": logical / enc_s / 1e6, "decode_MBps": logical / dec_s / 1e6,
        "encode_s": enc_s, "decode_s": dec_s,
        "rel_rmse": float(np.sqrt(np.mean((out.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2))),
    }


def _size_label(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}Mi"
    if n % 1024 == 0:
        return f"{n >> 10}Ki"
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return str(n)


def markdown(rows: list[dict]) -> str:
    lines = ["| codec | elements | wire codec | lossless | ratio | encode MB/s | decode MB/s | rel. RMSE |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        # raw without a lossless layer is a zero-copy view both ways: its MB/s measure nothing
        zero_copy = r["wire_codec"] == "CODEC_RAW" and r["lossless"] == "none"
        enc, dec = (("zero-copy",) * 2 if zero_copy
                    else (f"{r['encode_MBps']:.0f}", f"{r['decode_MBps']:.0f}"))
        lines.append(
            f"| {r['codec']} | {_size_label(r['elements'])} | {r['wire_codec'].removeprefix('CODEC_')} "
            f"| {r['lossless'].removeprefix('LOSSLESS_').lower()} | {r['ratio']:.2f} "
            f"| {enc} | {dec} | {r['rel_rmse']:.2g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                    help="comma-separated element counts")
    ap.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help="comma-separated specs")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", help="write one JSON object per result line to this file")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    specs = [s for s in args.codecs.split(",") if s]
    for spec in specs:
        parse_spec(spec)  # refuse a bad spec before minutes of work
    rng = np.random.default_rng(args.seed)
    machine = {"python": platform.python_version(), "numpy": np.__version__,
               "machine": platform.machine(), "cpus": _cpus()}
    rows = []
    for n in sizes:
        x = rng.standard_normal(n, dtype=np.float32)
        for spec in specs:
            row = run_one(spec, x, args.repeats, rng)
            row.update(machine)
            rows.append(row)
            print(f"{spec:>12} {n:>10}: ratio {row['ratio']:.2f} enc {row['encode_MBps']:.0f} MB/s "
                  f"dec {row['decode_MBps']:.0f} MB/s", file=sys.stderr, flush=True)
        del x
    print(markdown(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
