#!/usr/bin/env bash
# Every figure in docs/benchmarks.md, one after the other on an otherwise idle machine (never two
# at once: on a small machine they would share cores and spoil each other's figures).
# Results into $OUTDIR (default bench/results). About 80 minutes on 2 cores.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export OUTDIR=${OUTDIR:-$root/bench/results}
VENV=${VENV:-$root/.venv}
PY=$VENV/bin/python
mkdir -p "$OUTDIR"
machine() {
  echo "nproc=$(nproc) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "$(uname -sr), $("$PY" -c 'import sys, torch, grpc, numpy; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, grpcio {grpc.__version__}, numpy {numpy.__version__}")')"
  date -u +%FT%TZ
}
machine > "$OUTDIR/MACHINE.txt"
step() { echo "=== $(date -u +%T) $*" >&2; }

step ps-loop; CODEC_RUNS=${CODEC_RUNS:-"bf16,bf16 bf16,topk:0.01"} bash bench/run_ps_loop.sh > /dev/null
step codecs; "$PY" -m bench.codecs --json-out "$OUTDIR/codecs.jsonl" > "$OUTDIR/CODECS.md"
step overlap; : > "$OUTDIR/overlap.jsonl"
"$PY" bench/overlap.py --json-out "$OUTDIR/overlap.jsonl" > "$OUTDIR/OVERLAP.md" 2>> "$OUTDIR/overlap.log"
step convergence; bash bench/run_convergence.sh > /dev/null
step done
