#!/usr/bin/env bash
# Convergence figures: (1) the peers' digits time-to-accuracy workload on shardps beside
# digits_single.py and torch_rpc_digits.py (--tp uv and auto) from bench/peers, (2)
# convergence by consistency mode with and without a straggler, (3) codecs against accuracy.
# Results into $OUTDIR: digits_results.jsonl + DIGITS_RESULTS.md, convergence.jsonl +
# CONVERGENCE.md + convergence.png, codec_convergence.jsonl + CODEC_CONVERGENCE.md, and
# run_convergence.log (each command and its stderr). See bench/README.md.
#
# Env: OUTDIR (default bench/results), VENV (default .venv), PEERS (default bench/peers),
# PARTS (any of "digits convergence codecs", default all), SEEDS (default "0 1 2"), REPS (runs per
# seed and configuration, default 1), WORKERS (digits trainer counts, default "1 2 3"), TARGET
# (default 0.95), TMO (seconds per single run, default 240), CONV_STEPS (steps per worker, default
# 800), CONV_MODES (default "sync ssp async"), CODEC_STEPS (default 150), CODECS (push codecs, default
# "fp32 fp16 bf16 int8 topk:0.01 topk:0.01/noef"), APPEND=1 (keep earlier lines of the JSONL files).
# About 40 minutes on 2 idle cores with the defaults.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
OUTDIR=${OUTDIR:-$root/bench/results}
VENV=${VENV:-$root/.venv}
PEERS=${PEERS:-$root/bench/peers}
PARTS=${PARTS:-digits convergence codecs}
SEEDS=${SEEDS:-0 1 2}; REPS=${REPS:-1}; WORKERS=${WORKERS:-1 2 3}; TARGET=${TARGET:-0.95}; TMO=${TMO:-240}
CONV_STEPS=${CONV_STEPS:-800}; CONV_MODES=${CONV_MODES:-sync ssp async}
CODEC_STEPS=${CODEC_STEPS:-150}; CODECS=${CODECS:-fp32 fp16 bf16 int8 topk:0.01 topk:0.01/noef}
PY=$VENV/bin/python
mkdir -p "$OUTDIR"
LOG=$OUTDIR/run_convergence.log
append=(); [ "${APPEND:-0}" = 1 ] && append=(--append)
[ "${APPEND:-0}" = 1 ] || : > "$LOG"
# The scripts' own per-run deadline stays under `timeout`'s, so a slow run reports and cleans up.
inner_tmo=$((TMO > 20 ? TMO - 10 : TMO))
nseeds=$(echo $SEEDS | wc -w)
want() { [[ " $PARTS " == *" $1 "* ]]; }

status() {  # status T0 RC WHAT...
  local t0=$1 rc=$2; shift 2
  if [ "$rc" = 0 ]; then echo "ok   $((SECONDS - t0))s  $*" >&2; else echo "FAIL $((SECONDS - t0))s  $*  (see $LOG)" >&2; fi
}

# -- (1) digits: one JSON line per run, the peers' scripts and ours interleaved ---------------------
if want digits; then
  OUT=$OUTDIR/digits_results.jsonl
  [ "${APPEND:-0}" = 1 ] || : > "$OUT"
  digits() {  # digits SCRIPT ARGS...
    local t0=$SECONDS
    echo "### $*" >> "$LOG"
    timeout "$TMO" "$PY" "$@" --target "$TARGET" --json >> "$OUT" 2>> "$LOG"
    status "$t0" $? "$@"
  }
  for seed in $SEEDS; do
    for rep in $(seq "$REPS"); do
      digits "$PEERS/digits_single.py" --seed "$seed"
      for w in $WORKERS; do
        digits bench/digits_peer.py --workers "$w" --seed "$seed" --timeout "$inner_tmo"
        digits "$PEERS/torch_rpc_digits.py" --workers "$w" --seed "$seed" --tp uv --timeout "$inner_tmo"
        digits "$PEERS/torch_rpc_digits.py" --workers "$w" --seed "$seed" --tp auto --timeout "$inner_tmo"
      done
    done
  done
  "$PY" bench/digits_peer.py --table "$OUT" > "$OUTDIR/DIGITS_RESULTS.md" && cat "$OUTDIR/DIGITS_RESULTS.md"
fi

# -- (2) consistency modes: one invocation, each run with its own deadline ---------------------------
if want convergence; then
  nruns=$(( nseeds * REPS * $(echo $CONV_MODES | wc -w) * 2 + 1 ))  # + the calibration run
  t0=$SECONDS
  echo "### bench/convergence.py ($nruns runs)" >> "$LOG"
  timeout $(( nruns * TMO )) "$PY" bench/convergence.py --seeds $SEEDS --modes $CONV_MODES \
    --steps "$CONV_STEPS" --reps "$REPS" --target "$TARGET" --timeout "$inner_tmo" --out-dir "$OUTDIR" \
    "${append[@]}" 2>> "$LOG"
  status "$t0" $? bench/convergence.py
fi

# -- (3) codecs against accuracy ----------------------------------------------------------------------
if want codecs; then
  nruns=$(( nseeds * REPS * ($(echo $CODECS | wc -w) + 1) ))  # + the fp32/fp32 baseline
  t0=$SECONDS
  echo "### bench/codec_convergence.py ($nruns runs)" >> "$LOG"
  timeout $(( nruns * TMO )) "$PY" bench/codec_convergence.py --seeds $SEEDS --codecs $CODECS \
    --steps "$CODEC_STEPS" --reps "$REPS" --timeout "$inner_tmo" --out-dir "$OUTDIR" "${append[@]}" 2>> "$LOG"
  status "$t0" $? bench/codec_convergence.py
fi
