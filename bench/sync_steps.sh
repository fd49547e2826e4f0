#!/usr/bin/env bash
# Sync steps over several shards, before/after on one machine: `psctl up --mode sync` with the
# digits MLP (a step of a few milliseconds, where a round trip more per step shows most) at
# REV (a temporary git worktree) against the working tree, rounds alternated so that machine
# noise falls on both sides alike. Prints each run's slowest worker's steps/s.
#
#   bash bench/sync_steps.sh 7625d35      # REPS=3 rounds, SERVERS=2 WORKERS=2 STEPS=400
#
# Each side imports its own tree through a bench/tree_shim.py folder on PYTHONPATH and runs from
# $OUTDIR (PYTHONPATH=TREE alone would load the working tree's subpackages: the editable install
# maps them). Before each side of each round the shim's self-check must pass, and after the
# rounds `tree_shim.py verify` checks what the measured processes recorded at their exit
# ($OUTDIR/{before,after}-imports.jsonl); the comparison stops (exit 2) if either fails.
set -u
rev=${1:?usage: bash bench/sync_steps.sh REV}
root=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$root/.venv}
REPS=${REPS:-3}; SERVERS=${SERVERS:-2}; WORKERS=${WORKERS:-2}; STEPS=${STEPS:-400}
OUTDIR=${OUTDIR:-$(mktemp -d "${TMPDIR:-/tmp}/shardps-sync.XXXXXX")}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
SHIM=("$VENV/bin/python" "$root/bench/tree_shim.py")
work=$(mktemp -d "${TMPDIR:-/tmp}/shardps-before.XXXXXX")
cleanup() { git -C "$root" worktree remove --force "$work/tree" >/dev/null 2>&1; rm -rf "$work"; }
trap cleanup EXIT
git -C "$root" worktree add --detach --force "$work/tree" "$rev" >/dev/null || exit 2
tree_of() { if [ "$1" = before ]; then echo "$work/tree"; else echo "$root"; fi; }
for side in before after; do
  "${SHIM[@]}" build "$(tree_of $side)" "$work/shim-$side" || exit 2
  rm -f "$OUTDIR/$side-imports.jsonl"
done
for rep in $(seq "$REPS"); do
  for side in before after; do
    tree=$(tree_of $side); shim=$work/shim-$side; out=$OUTDIR/$side-$rep.json
    "${SHIM[@]}" check "$tree" "$shim" 2>>"$OUTDIR/$side.log" || { tail -n 1 "$OUTDIR/$side.log" >&2; exit 2; }
    ( cd "$OUTDIR" && PYTHONPATH=$shim SHARDPS_SHIM_RECORD=$OUTDIR/$side-imports.jsonl timeout 300 \
        "$VENV/bin/psctl" up --servers "$SERVERS" --workers "$WORKERS" --mode sync --steps "$STEPS" \
        --model digits-mlp --json --run-dir "$OUTDIR/run-$side-$rep" >"$out" 2>>"$OUTDIR/$side.log" )
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
for side in before after; do  # what the measured processes themselves imported
  "${SHIM[@]}" verify "$(tree_of $side)" "$OUTDIR/$side-imports.jsonl" 2>&1 | tee -a "$OUTDIR/$side.log" >&2
  [ "${PIPESTATUS[0]}" = 0 ] || exit 2
done
