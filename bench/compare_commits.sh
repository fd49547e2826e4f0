#!/usr/bin/env bash
# Before/after on one machine in one session: shardps at REV (a temporary git worktree) against
# the working tree, runs alternated so that machine noise falls on both sides alike.
#
#   bash bench/compare_commits.sh 0bf095a          # REPS=3 rounds
#
# Each round runs, for each side: ps-loop (shardps only, tuned and untuned malloc) on PRESETS x
# CONFIGS, then the digits workload with 3 trainers for each seed. Results in $OUTDIR/{before,
# after}/ps_loop.jsonl and $OUTDIR/{before,after}-digits.jsonl, a table on stdout
# (bench/compare_table.py). Env: OUTDIR (default bench/results/compare), VENV (default .venv),
# REPS (default 3), PRESETS (default "small large"), CONFIGS (default "1,1 2,2"), SEEDS
# (default "0 1 2"). About 15 minutes on 2 cores with the defaults.
#
# Each side imports its own tree through a bench/tree_shim.py folder on PYTHONPATH, and runs
# from $OUTDIR with that tree's bench scripts by absolute path. PYTHONPATH=TREE alone is not
# enough: the editable install maps shardps.pscommon, .worker, ... to the working tree, so the
# old side would run the working tree's code. Before each side of each round the shim's
# self-check imports every package and stops the comparison unless all of them come from the
# side's tree ($OUTDIR/{before,after}.log has its line); at the end, `tree_shim.py verify` does
# the same for what the measured processes recorded at their exit ($OUTDIR/{before,after}-
# imports.jsonl), and the table is printed only if all of them loaded their side's tree.
set -u
rev=${1:?usage: bash bench/compare_commits.sh REV}
root=$(cd "$(dirname "$0")/.." && pwd)
abs() { case $1 in /*) echo "$1" ;; *) echo "$root/$1" ;; esac; }  # relative: to the repository root
VENV=$(abs "${VENV:-.venv}")
OUTDIR=$(abs "${OUTDIR:-bench/results/compare}")
REPS=${REPS:-3}; PRESETS=${PRESETS:-small large}; CONFIGS=${CONFIGS:-1,1 2,2}; SEEDS=${SEEDS:-0 1 2}
SHIM=("$VENV/bin/python" "$root/bench/tree_shim.py")
work=$(mktemp -d "${TMPDIR:-/tmp}/shardps-compare.XXXXXX")
cleanup() { git -C "$root" worktree remove --force "$work/tree" >/dev/null 2>&1; rm -rf "$work"; }
trap cleanup EXIT
git -C "$root" worktree add --detach --force "$work/tree" "$rev" >/dev/null || exit 2
rm -rf "$OUTDIR"; mkdir -p "$OUTDIR/before" "$OUTDIR/after" || exit 2
tree_of() { if [ "$1" = before ]; then echo "$work/tree"; else echo "$root"; fi; }
for side in before after; do
  "${SHIM[@]}" build "$(tree_of $side)" "$work/shim-$side" || exit 2
done
for rep in $(seq "$REPS"); do
  for side in before after; do
    tree=$(tree_of $side); shim=$work/shim-$side
    echo "=== $(date -u +%T) round $rep/$REPS: $side ($tree)" >&2
    if ! msg=$("${SHIM[@]}" check "$tree" "$shim" 2>&1); then
      echo "$msg" | tee -a "$OUTDIR/$side.log" >&2; exit 2
    fi
    echo "$msg" >> "$OUTDIR/$side.log"
    export SHARDPS_SHIM_RECORD=$OUTDIR/$side-imports.jsonl  # each process's module files, at its exit
    ( cd "$OUTDIR" && PYTHONPATH=$shim VENV=$VENV BENCH=$tree/bench IMPLS=shardps PRESETS="$PRESETS" \
        CONFIGS="$CONFIGS" REPS=1 APPEND=1 OUTDIR="$OUTDIR/$side" \
        bash "$root/bench/run_ps_loop.sh" >/dev/null 2>>"$OUTDIR/$side.log" )
    for seed in $SEEDS; do
      ( cd "$OUTDIR" && PYTHONPATH=$shim timeout 240 "$VENV/bin/python" "$tree/bench/digits_peer.py" --workers 3 \
          --seed "$seed" --timeout 200 --json >>"$OUTDIR/$side-digits.jsonl" 2>>"$OUTDIR/$side.log" )
    done
    unset SHARDPS_SHIM_RECORD
  done
done
for side in before after; do  # what the measured processes themselves imported
  "${SHIM[@]}" verify "$(tree_of $side)" "$OUTDIR/$side-imports.jsonl" 2>&1 | tee -a "$OUTDIR/$side.log" >&2
  [ "${PIPESTATUS[0]}" = 0 ] || exit 2
done
"$VENV/bin/python" "$root/bench/compare_table.py" "$OUTDIR" "$rev"
