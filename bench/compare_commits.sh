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
set -u
rev=${1:?usage: bash bench/compare_commits.sh REV}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VENV=${VENV:-$root/.venv}
OUTDIR=${OUTDIR:-$root/bench/results/compare}
REPS=${REPS:-3}; PRESETS=${PRESETS:-small large}; CONFIGS=${CONFIGS:-1,1 2,2}; SEEDS=${SEEDS:-0 1 2}
before=$(mktemp -d "${TMPDIR:-/tmp}/shardps-before.XXXXXX")
cleanup() { git -C "$root" worktree remove --force "$before" >/dev/null 2>&1; rm -rf "$before"; }
trap cleanup EXIT
git -C "$root" worktree add --detach --force "$before" "$rev" >/dev/null || exit 2
rm -rf "$OUTDIR"; mkdir -p "$OUTDIR/before" "$OUTDIR/after"
for rep in $(seq "$REPS"); do
  for side in before after; do
    tree=$root; [ "$side" = before ] && tree=$before
    echo "=== $(date -u +%T) round $rep/$REPS: $side" >&2
    # PYTHONPATH: that tree's packages win over the installed (editable) ones, in every process
    ( cd "$tree" && PYTHONPATH=$tree VENV=$VENV IMPLS=shardps PRESETS="$PRESETS" CONFIGS="$CONFIGS" REPS=1 \
        APPEND=1 OUTDIR="$OUTDIR/$side" bash bench/run_ps_loop.sh >/dev/null 2>>"$OUTDIR/$side.log" )
    for seed in $SEEDS; do
      ( cd "$tree" && PYTHONPATH=$tree timeout 240 "$VENV/bin/python" bench/digits_peer.py --workers 3 \
          --seed "$seed" --timeout 200 --json >>"$OUTDIR/$side-digits.jsonl" 2>>"$OUTDIR/$side.log" )
    done
  done
done
"$VENV/bin/python" bench/compare_table.py "$OUTDIR" "$rev"
