#!/usr/bin/env bash
# The peer baselines on their own, every workload, preset and configuration of README.md;
# one JSON line per run, a markdown table per workload. (bench/run_ps_loop.sh and
# bench/run_convergence.sh run the ps-loop and digits peers again beside shardps.)
#
#   bash bench/peers/run_peers.sh                  # ps-loop, digits and emb: about half an hour on 2 cores
#   bash bench/peers/run_peers.sh digits emb       # some of them
#   SMOKE=1 bash bench/peers/run_peers.sh          # every script once, tiny runs: do they work here?
#
# Output in $OUTDIR: ps_loop_peers.jsonl + RESULTS.md (bench/make_table.py), digits_peers.jsonl +
# DIGITS_RESULTS.md (bench/digits_peer.py --table), emb.jsonl + EMB_RESULTS.md (emb_table.py),
# run_peers.log (each command and its stderr); SMOKE=1 writes smoke.jsonl only.
#
# Env: OUTDIR (default bench/results/peers), VENV (default .venv), REPS (runs per configuration,
# default 2), TMO (seconds per run, default 240), PRESETS (default "small large"), CONFIGS (S,W
# pairs, default "1,1 1,2 2,2"), SEEDS (digits, default "0 1 2"), WORKERS (digits trainers,
# default "1 2 3"), TARGET (digits, default 0.95), STEPS (override the timed steps of ps-loop and
# emb runs; quick checks only), APPEND=1 (keep earlier JSON lines).
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
OUTDIR=${OUTDIR:-$root/bench/results/peers}
VENV=${VENV:-$root/.venv}
REPS=${REPS:-2}; TMO=${TMO:-240}
PRESETS=${PRESETS:-small large}; CONFIGS=${CONFIGS:-1,1 1,2 2,2}
SEEDS=${SEEDS:-0 1 2}; WORKERS=${WORKERS:-1 2 3}; TARGET=${TARGET:-0.95}
STEPS=${STEPS:-}
PY=$VENV/bin/python
WORKLOADS=${*:-ps-loop digits emb}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/run_peers.log
[ "${APPEND:-0}" = 1 ] || : > "$LOG"

# "+malloc": glibc stops mmap/munmap-ing every multi-MB buffer, a large effect on grpcio.
TUNED=(MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296)
# The Makefile exports the same variables; a plain run must not inherit them.
PLAIN=(-u MALLOC_MMAP_THRESHOLD_ -u MALLOC_TRIM_THRESHOLD_)
# A script's own deadline stays under `timeout`'s, so a slow run still reaps its children.
inner=$((TMO > 20 ? TMO - 10 : TMO))
failed=0

run() {  # run OUT ENV... -- SCRIPT ARGS...  -> one JSON line appended to OUT
  local out=$1 envs=() t0=$SECONDS; shift
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "### ${envs[*]} $*" >> "$LOG"
  if env "${envs[@]}" timeout "$TMO" "$PY" "$@" --json --timeout "$inner" >> "$out" 2>> "$LOG"; then
    echo "ok   $((SECONDS - t0))s  $*" >&2
  else
    echo "FAIL $((SECONDS - t0))s  $*  (see $LOG)" >&2
    failed=$((failed + 1))
  fi
}

fresh() { [ "${APPEND:-0}" = 1 ] || : > "$1"; }
has() { [[ " $WORKLOADS " == *" $1 "* ]]; }

if [ "${SMOKE:-0}" = 1 ]; then
  out=$OUTDIR/smoke.jsonl; fresh "$out"
  s=(--preset small --steps 5)
  run "$out" "${PLAIN[@]}" -- "$here/memcpy_limit.py" "${s[@]}"
  run "$out" "${PLAIN[@]}" -- "$here/torch_rpc_ps.py" "${s[@]}" --tp uv
  run "$out" "${PLAIN[@]}" -- "$here/torch_rpc_ps.py" "${s[@]}" --tp auto
  run "$out" "${PLAIN[@]}" -- "$here/grpc_raw_limit.py" "${s[@]}"
  run "$out" "${PLAIN[@]}" -- "$here/digits_single.py" --seed 0 --target 0.6
  run "$out" "${PLAIN[@]}" -- "$here/torch_rpc_digits.py" --workers 1 --seed 0 --target 0.6 --tp uv
  run "$out" "${PLAIN[@]}" -- "$here/emb_limit.py" "${s[@]}" --keys dense
  run "$out" "${PLAIN[@]}" -- "$here/emb_limit.py" "${s[@]}" --keys id64
  run "$out" "${PLAIN[@]}" -- "$here/torch_rpc_emb.py" "${s[@]}" --tp uv
  exit $((failed > 0))
fi

steps=(); [ -n "$STEPS" ] && steps=(--steps "$STEPS")

if has ps-loop; then
  out=$OUTDIR/ps_loop_peers.jsonl; fresh "$out"
  for preset in $PRESETS; do
    for rep in $(seq "$REPS"); do  # repetitions interleaved, so machine noise spreads over every cell
      run "$out" "${PLAIN[@]}" -- "$here/memcpy_limit.py" --preset "$preset" "${steps[@]}"
      for cfg in $CONFIGS; do
        a=(--preset "$preset" --servers "${cfg%,*}" --workers "${cfg#*,}" "${steps[@]}")
        run "$out" "${PLAIN[@]}" -- "$here/torch_rpc_ps.py" "${a[@]}" --tp auto
        run "$out" "${PLAIN[@]}" -- "$here/torch_rpc_ps.py" "${a[@]}" --tp uv
        run "$out" "${TUNED[@]}" -- "$here/torch_rpc_ps.py" "${a[@]}" --tp uv
        run "$out" "${PLAIN[@]}" -- "$here/grpc_raw_limit.py" "${a[@]}"  # [step] and [tensor]
        run "$out" "${TUNED[@]}" -- "$here/grpc_raw_limit.py" "${a[@]}"
      done
    done
  done
  "$PY" bench/make_table.py "$out" > "$OUTDIR/RESULTS.md" && cat "$OUTDIR/RESULTS.md"
fi

if has digits; then
  out=$OUTDIR/digits_peers.jsonl; fresh "$out"
  for seed in $SEEDS; do
    for rep in $(seq "$REPS"); do
      run "$out" "${PLAIN[@]}" -- "$here/digits_single.py" --seed "$seed" --target "$TARGET"
      for w in $WORKERS; do
        for tp in uv auto; do
          run "$out" "${PLAIN[@]}" -- "$here/torch_rpc_digits.py" --workers "$w" --seed "$seed" --target "$TARGET" --tp "$tp"
        done
      done
    done
  done
  "$PY" bench/digits_peer.py --table "$out" > "$OUTDIR/DIGITS_RESULTS.md" && cat "$OUTDIR/DIGITS_RESULTS.md"
fi

if has emb; then
  out=$OUTDIR/emb.jsonl; fresh "$out"
  for preset in $PRESETS; do
    for rep in $(seq "$REPS"); do
      for keys in dense id64; do
        run "$out" "${PLAIN[@]}" -- "$here/emb_limit.py" --preset "$preset" --keys "$keys" "${steps[@]}"
      done
      for cfg in $CONFIGS; do
        for tp in auto uv; do
          run "$out" "${PLAIN[@]}" -- "$here/torch_rpc_emb.py" --preset "$preset" --servers "${cfg%,*}" \
            --workers "${cfg#*,}" --tp "$tp" "${steps[@]}"
        done
      done
    done
  done
  "$PY" "$here/emb_table.py" "$out" > "$OUTDIR/EMB_RESULTS.md" && cat "$OUTDIR/EMB_RESULTS.md"
fi

exit $((failed > 0))
