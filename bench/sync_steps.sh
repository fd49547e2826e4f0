#!/usr/bin/env bash
# Sync steps over several shards, before/after on one machine: `psctl up --mode sync` with the
# digits MLP (a step of a few milliseconds, where a round trip more per step shows most) at
# REV (a temporary git worktree) against the working tree, rounds alternated so that machine
# noise falls on both sides alike. Prints each run's slowest worker's steps/s.
#
#   bash bench/sync_steps.sh 7625d35      # REPS=3 rounds, SERVERS=2 WORKERS=2 STEPS=400
set -u
rev=${1:?usage: bash bench/sync_steps.sh REV}
root=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$root/.venv}
REPS=${REPS:-3}; SERVERS=${SERVERS:-2}; WORKERS=${WORKERS:-2}; STEPS=${STEPS:-400}
OUTDIR=${OUTDIR:-$(mktemp -d "${TMPDIR:-/tmp}/shardps-sync.XXXXXX")}
work=$(mktemp -d "${TMPDIR:-/tmp}/shardps-before.XXXXXX")
cleanup() { git -C "$root" worktree remove --force "$work/tree" >/dev/null 2>&1; rm -rf "$work"; }
trap cleanup EXIT
git -C "$root" worktree add --detach --force "$work/tree" "$rev" >/dev/null || exit 2
# the package is the repository root: a folder named shardps that is that tree, first on the path
mkdir -p "$work/path" "$OUTDIR" && ln -s "$work/tree" "$work/path/shardps"
for rep in $(seq "$REPS"); do
  for side in before after; do
    path=; [ "$side" = before ] && path=$work/path
    out=$OUTDIR/$side-$rep.json
    ( cd "$OUTDIR" && PYTHONPATH=$path timeout 300 "$VENV/bin/psctl" up --servers "$SERVERS" --workers "$WORKERS" \
        --mode sync --steps "$STEPS" --model digits-mlp --json --run-dir "$OUTDIR/run-$side-$rep" >"$out" 2>/dev/null )
    "$VENV/bin/python" - "$out" "$side" "$rep" "$STEPS" <<'PY'
import json, sys
path, side, rep, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
d = json.load(open(path))
walls = [w["wall_s"] for w in d["workers"]]
print(f"{side:6} round {rep}: {steps / max(walls):6.1f} steps/s (slowest worker {max(walls):.2f} s), "
      f"held-out accuracy {d['final_accuracy']}")
PY
  done
done
