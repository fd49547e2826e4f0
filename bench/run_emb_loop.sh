#!/usr/bin/env bash
# emb-loop: shardps (bench/emb_loop.py) beside the peers of bench/peers (emb_limit.py dense and
# id64, torch_rpc_emb.py --tp uv), every preset and configuration, REPS times each, interleaved
# so that machine noise spreads over all of them; JSON lines into $OUTDIR/emb_loop.jsonl, tables
# into $OUTDIR/EMB_LOOP.md (bench/emb_compare_table.py). See bench/README.md.
#
#   bash bench/run_emb_loop.sh                          # both presets, (1,1) (1,2) (2,2), REPS=2
#   PRESETS=small CONFIGS="1,1" REPS=1 STEPS=20 bash bench/run_emb_loop.sh   # a quick check
#
# Env: OUTDIR (default bench/results), VENV (default .venv), REPS (default 2), TMO (seconds per
# run, default 240), PEERS (the peer scripts, default bench/peers), PRESETS (default
# "small large"), CONFIGS (S,W pairs, default "1,1 1,2 2,2"), IMPLS (any of shardps shared
# torch_rpc limit two_call shared_two_call; default "shardps torch_rpc limit"; "shared" adds
# shardps with one table for all fields; "two_call" and "shared_two_call" add those two with
# --no-fuse, a PullRows and a Push per shard and step instead of one PushPullBatch, so the
# fused and the two-call paths and the peer come from one invocation), TPS (torch_rpc_emb transports, default "uv"; "uv auto" adds shared memory),
# STEPS (override N for every run; quick checks only: the workload's N is small 200, large 20),
# APPEND=1 (keep earlier lines in the file).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
OUTDIR=${OUTDIR:-$root/bench/results}
VENV=${VENV:-$root/.venv}
PEERS=${PEERS:-$root/bench/peers}
REPS=${REPS:-2}; TMO=${TMO:-240}
PRESETS=${PRESETS:-small large}
CONFIGS=${CONFIGS:-1,1 1,2 2,2}
IMPLS=${IMPLS:-shardps torch_rpc limit}
TPS=${TPS:-uv}
STEPS=${STEPS:-}
PY=$VENV/bin/python
mkdir -p "$OUTDIR"
OUT=$OUTDIR/emb_loop.jsonl; LOG=$OUTDIR/run_emb_loop.log
[ "${APPEND:-0}" = 1 ] || : > "$OUT"
: > "$LOG"

# Every run without the peers' MALLOC variables (the Makefile exports them): the peers run as
# plain processes, shardps tunes glibc malloc itself at start-up (impl "shardps+malloc").
UNTUNED=(-u MALLOC_MMAP_THRESHOLD_ -u MALLOC_TRIM_THRESHOLD_)
# The script's own deadline stays under `timeout`'s, so a slow run reports and cleans up.
inner_tmo=$((TMO > 20 ? TMO - 10 : TMO))
failed=0

want() { [[ " $IMPLS " == *" $1 "* ]]; }

run() {  # run ENV-ARGS... -- SCRIPT ARGS...  -> one JSON line appended; failures on stderr and in the log
  local envs=() t0=$SECONDS
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "### ${envs[*]} $*" >> "$LOG"
  if env "${envs[@]}" timeout "$TMO" "$PY" "$@" --json --timeout "$inner_tmo" >> "$OUT" 2>> "$LOG"; then
    echo "ok   $((SECONDS - t0))s  $*" >&2
  else
    echo "FAIL $((SECONDS - t0))s  $*  (see $LOG)" >&2
    failed=$((failed + 1))
  fi
}

steps=(); [ -n "$STEPS" ] && steps=(--steps "$STEPS")
for preset in $PRESETS; do
  for rep in $(seq "$REPS"); do
    if want limit; then
      for keys in dense id64; do
        run "${UNTUNED[@]}" -- "$PEERS/emb_limit.py" --preset "$preset" --keys "$keys" "${steps[@]}"
      done
    fi
    for cfg in $CONFIGS; do
      a=(--preset "$preset" --servers "${cfg%,*}" --workers "${cfg#*,}" "${steps[@]}")
      want shardps && run "${UNTUNED[@]}" -- bench/emb_loop.py "${a[@]}"
      want shared && run "${UNTUNED[@]}" -- bench/emb_loop.py "${a[@]}" --tables shared
      want two_call && run "${UNTUNED[@]}" -- bench/emb_loop.py "${a[@]}" --no-fuse
      want shared_two_call && run "${UNTUNED[@]}" -- bench/emb_loop.py "${a[@]}" --tables shared --no-fuse
      if want torch_rpc && [ -f "$PEERS/torch_rpc_emb.py" ]; then
        for tp in $TPS; do
          run "${UNTUNED[@]}" -- "$PEERS/torch_rpc_emb.py" "${a[@]}" --tp "$tp"
        done
      fi
    done
  done
done
"$PY" bench/emb_compare_table.py "$OUT" > "$OUTDIR/EMB_LOOP.md" && cat "$OUTDIR/EMB_LOOP.md"
exit $((failed > 0))
