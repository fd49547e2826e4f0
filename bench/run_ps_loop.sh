#!/usr/bin/env bash
# ps-loop: shardps beside the peer baselines of bench/peers, every preset and
# configuration, REPS times each; JSON lines into $OUTDIR/ps_loop.jsonl, table into
# $OUTDIR/RESULTS.md (bench/make_table.py). See bench/README.md.
#
# Env: OUTDIR (default bench/results), VENV (default .venv), REPS (default 2), TMO (seconds per
# run, default 150), PEERS (the peer scripts, default bench/peers), PRESETS (default
# "small large"), CONFIGS (S,W pairs, default "1,1 1,2 2,2"), IMPLS (any of shardps torch_rpc
# grpc_raw memcpy, default all), CODEC_RUNS (extra shardps runs, "PULL,PUSH" pairs such as
# "bf16,bf16 fp32,topk:0.01"; default none), STEPS (override N for every run; quick checks
# only, the workload's N is small 200 / large 10), APPEND=1 (keep earlier lines in the file),
# BENCH (the folder of ps_loop.py, default this script's; bench/compare_commits.sh points it at
# the old tree's), LINK (a tc rate such as 1gbit or 10gbit: every run goes through
# bench/peers/linkrate.sh, one shaped loopback in a private network namespace, and its JSON line
# gets "link"; make_table.py then shows the preset as small@1gbit; needs root; memcpy skipped).
#
# Which shardps the runs import is whatever `import shardps` gives in $OUTDIR: the installed
# package, or a bench/tree_shim.py folder on PYTHONPATH. Every run starts in $OUTDIR, never in a
# repository root, whose ./shardps would be the first sys.path entry of `python -m shardps.psctl`.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
abs() { case $1 in /*) echo "$1" ;; *) echo "$root/$1" ;; esac; }  # relative: to the repository root
OUTDIR=$(abs "${OUTDIR:-bench/results}")
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) && cd "$OUTDIR" || exit 2
VENV=$(abs "${VENV:-.venv}")
PEERS=$(abs "${PEERS:-bench/peers}")
BENCH=$(abs "${BENCH:-bench}")
REPS=${REPS:-2}; TMO=${TMO:-150}
PRESETS=${PRESETS:-small large}
CONFIGS=${CONFIGS:-1,1 1,2 2,2}
IMPLS=${IMPLS:-shardps torch_rpc grpc_raw memcpy}
CODEC_RUNS=${CODEC_RUNS:-}
STEPS=${STEPS:-}
LINK=${LINK:-}
PY=$VENV/bin/python
OUT=$OUTDIR/ps_loop.jsonl; LOG=$OUTDIR/run_ps_loop.log
[ "${APPEND:-0}" = 1 ] || : > "$OUT"
: > "$LOG"

# The peers' "+malloc" variant (glibc stops mmap/munmap-ing every multi-MB buffer).
TUNED=(MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296)
# Untuned runs must not inherit tuning from the caller (the Makefile exports these).
UNTUNED=(-u MALLOC_MMAP_THRESHOLD_ -u MALLOC_TRIM_THRESHOLD_)
# The script's own deadline stays under `timeout`'s, so a slow run reports and cleans up.
inner_tmo=$((TMO > 20 ? TMO - 10 : TMO))

want() { [[ " $IMPLS " == *" $1 "* ]]; }

run() {  # run ENV-ARGS... -- SCRIPT ARGS...  -> one JSON line appended; failures on stderr and in the log
  local envs=() t0=$SECONDS
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "### ${envs[*]} $*" >> "$LOG"
  local wrap=() line
  # TensorPipe picks its interface by name: in the link's namespace there is only lo
  [ -n "$LINK" ] && wrap=(bash "$PEERS/linkrate.sh" "$LINK" env TP_SOCKET_IFNAME=lo)
  if line=$(env "${envs[@]}" timeout "$TMO" "${wrap[@]}" "$PY" "$@" --json --timeout "$inner_tmo" 2>> "$LOG"); then
    [ -n "$LINK" ] && line=$(printf '%s\n' "$line" | sed "s/^{/{\"link\": \"$LINK\", /")
    printf '%s\n' "$line" >> "$OUT"
    echo "ok   $((SECONDS - t0))s  ${envs[*]} $*" >&2
  else
    echo "FAIL $((SECONDS - t0))s  ${envs[*]} $*  (see $LOG)" >&2
  fi
}

for preset in $PRESETS; do
  steps=(); [ -n "$STEPS" ] && steps=(--steps "$STEPS")
  for rep in $(seq "$REPS"); do
    want memcpy && [ -z "$LINK" ] && run "${UNTUNED[@]}" -- "$PEERS/memcpy_limit.py" --preset "$preset"
    for cfg in $CONFIGS; do
      a=(--preset "$preset" --servers "${cfg%,*}" --workers "${cfg#*,}" "${steps[@]}")
      if want shardps; then
        run "${UNTUNED[@]}" SHARDPS_MALLOC_TUNING=1 -- "$BENCH/ps_loop.py" "${a[@]}"
        run "${UNTUNED[@]}" SHARDPS_MALLOC_TUNING=0 -- "$BENCH/ps_loop.py" "${a[@]}"
        for pair in $CODEC_RUNS; do
          run "${UNTUNED[@]}" SHARDPS_MALLOC_TUNING=1 -- "$BENCH/ps_loop.py" "${a[@]}" \
            --pull-codec "${pair%%,*}" --push-codec "${pair#*,}"
        done
      fi
      if want torch_rpc; then
        run "${UNTUNED[@]}" -- "$PEERS/torch_rpc_ps.py" "${a[@]}" --tp auto
        run "${UNTUNED[@]}" -- "$PEERS/torch_rpc_ps.py" "${a[@]}" --tp uv
        run "${TUNED[@]}" -- "$PEERS/torch_rpc_ps.py" "${a[@]}" --tp uv
      fi
      if want grpc_raw; then
        run "${UNTUNED[@]}" -- "$PEERS/grpc_raw_limit.py" "${a[@]}"   # both modes, [step] and [tensor]
        run "${TUNED[@]}" -- "$PEERS/grpc_raw_limit.py" "${a[@]}"
      fi
    done
  done
done
"$PY" "$root/bench/make_table.py" "$OUT" > "$OUTDIR/RESULTS.md" && cat "$OUTDIR/RESULTS.md"
