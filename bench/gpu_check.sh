#!/usr/bin/env bash
# bench/gpu_check.sh: a short check of the worker's CUDA path (pinned host buffers, copies on a
# side stream, gradients streamed from autograd hooks) on a machine with a GPU.
#
# Starts a local `psctl scheduler` and one `psctl server` (background, ready files, cleaned up
# on exit), then runs a digits-cnn `psctl worker --device cuda` four times on that cluster:
# plain, --overlap, and --overlap with bf16 and with top-k 5% pushes encoded on the device,
# each with --metrics-out.
# Prints one summary JSON: per variant the step time (median / mean of the gaps between
# consecutive step records of the metrics file, after WARMUP steps), host<->device bytes per
# step (H2D: the fp32 weights of each pull; D2H: the gradients of each push, fp32 or encoded
# on the device; from the worker's final summary), wire bytes, held-out accuracy and
# torch.cuda memory statistics; then the overlap/plain step-time and encoded/fp32 D2H ratios.
# Well under 3 minutes.
#
#   bash bench/gpu_check.sh                # exits 0 with a message where CUDA is unavailable
#   STEPS=500 bash bench/gpu_check.sh
#   DEVICE=cpu bash bench/gpu_check.sh     # the same flow on the CPU (to test this script)
#
# Env: PY (default .venv/bin/python), STEPS (default 300), WARMUP (default 20), DEVICE (cuda),
# KEEP=1 (keep the run folder with logs and metrics; it is kept anyway when something fails),
# OUT (also write the summary JSON to this file).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PY:-$root/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
STEPS=${STEPS:-300}
WARMUP=${WARMUP:-20}
DEVICE=${DEVICE:-cuda}
READY_S=90        # daemons import grpc; be patient on a busy machine
WORKER_S=120      # one worker run, CUDA initialisation included

if [ "$DEVICE" = cuda ]; then
  avail=$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null || echo "False (torch failed to import)")
  if [ "$avail" != "True" ]; then
    echo "gpu_check: torch.cuda.is_available() is $avail on $(hostname): no GPU to check, nothing done"
    exit 0
  fi
fi

run=$(mktemp -d "${TMPDIR:-/tmp}/shardps-gpu-check.XXXXXX")
pids=()
cleanup() {
  local rc=$? i p
  # newest first: a worker stopping on SIGTERM still pulls once from the server
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    p=${pids[i]}
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ "$rc" -eq 0 ] && [ "${KEEP:-0}" != 1 ]; then
    rm -rf "$run"
  else
    echo "gpu_check: logs and metrics kept in $run" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_ready FILE PID NAME: the daemon's ready file holds its address
wait_ready() {
  local file=$1 pid=$2 name=$3 i
  for i in $(seq $((READY_S * 10))); do
    if [ -s "$file" ]; then cat "$file"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "gpu_check: $name exited before it was ready:" >&2; tail -20 "$run/$name.log" >&2; return 1
    fi
    sleep 0.1
  done
  echo "gpu_check: $name not ready after ${READY_S}s" >&2
  return 1
}

"$PY" -m shardps.psctl scheduler --listen 127.0.0.1:0 --ready-file "$run/scheduler.addr" --mode async \
  --optimizer sgd --lr 0.2 --heartbeat-timeout 30 >"$run/scheduler.log" 2>&1 &
pids+=($!)
sched=$(wait_ready "$run/scheduler.addr" "$!" scheduler)
"$PY" -m shardps.psctl server --scheduler "$sched" --listen 127.0.0.1:0 --shard-id 0 \
  --ready-file "$run/server.addr" >"$run/server.log" 2>&1 &
pids+=($!)
wait_ready "$run/server.addr" "$!" server >/dev/null

# The worker is `psctl worker` (psctl.cli.main) in an interpreter that afterwards records
# torch.cuda's memory statistics of that same process. It runs in the background and is waited
# for, so a SIGTERM/Ctrl-C of this script reaches the cleanup at once.
worker() {
  local variant=$1 pid rc=0; shift
  timeout -k 10 "$WORKER_S" "$PY" - "$run/$variant.cuda.json" worker --scheduler "$sched" --model digits-cnn \
    --steps "$STEPS" --device "$DEVICE" --metrics-out "$run/$variant.jsonl" --no-progress "$@" \
    >"$run/$variant.log" 2>&1 <<'EOF' &
import json, sys, time
import torch
from psctl.cli import main
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.time()
rc = main(argv)
stats = {"rc": rc, "process_s": round(time.time() - t0, 2)}
if torch.cuda.is_available() and torch.cuda.is_initialized():
    s = torch.cuda.memory_stats()
    stats["cuda"] = {"device": torch.cuda.get_device_name(),
                     "max_allocated_bytes": torch.cuda.max_memory_allocated(),
                     "max_reserved_bytes": torch.cuda.max_memory_reserved(),
                     "allocations": s.get("allocation.all.allocated", 0),
                     "alloc_retries": s.get("num_alloc_retries", 0),
                     "ooms": s.get("num_ooms", 0)}
with open(out, "w") as f:
    json.dump(stats, f)
sys.exit(rc)
EOF
  pid=$!
  pids+=("$pid")
  wait "$pid" || rc=$?
  unset 'pids[${#pids[@]}-1]'
  return "$rc"
}

status=0
worker plain || { echo "gpu_check: plain worker failed:" >&2; tail -20 "$run/plain.log" >&2; status=1; }
worker overlap --overlap || { echo "gpu_check: overlap worker failed:" >&2; tail -20 "$run/overlap.log" >&2; status=1; }
# bf16 pushes, cast on the device (--device-compression on, so DEVICE=cpu runs the same path)
worker cast --overlap --push-codec bf16 --device-compression on || {
  echo "gpu_check: cast worker failed:" >&2; tail -20 "$run/cast.log" >&2; status=1; }
# top-k pushes (5%), selected on the device
worker topk --overlap --push-codec topk:0.05 --device-compression on || {
  echo "gpu_check: topk worker failed:" >&2; tail -20 "$run/topk.log" >&2; status=1; }

"$PY" - "$run" "$STEPS" "$WARMUP" "$DEVICE" "${OUT:-}" <<'EOF'
import json, pathlib, statistics, sys
run, steps, warmup, device, out = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]

def variant(name):
    r = {"ok": False}
    try:
        recs = [json.loads(l) for l in (run / f"{name}.jsonl").read_text().splitlines() if l.strip()]
    except OSError as exc:
        return dict(r, error=str(exc))
    times = [x["time"] for x in recs if "step" in x and "time" in x]
    final = next((x for x in reversed(recs) if "eval_accuracy" in x), None)
    gaps = [b - a for a, b in zip(times, times[1:])][warmup:]
    if gaps:
        r.update(step_ms_median=round(1e3 * statistics.median(gaps), 3), step_ms_mean=round(1e3 * statistics.mean(gaps), 3),
                 measured_steps=len(gaps))
    if final:
        n = max(final["steps"], 1)
        pulls = n + 2   # connect's pull, one per step, the final pull before evaluation
        r.update(steps=final["steps"], eval_accuracy=final["eval_accuracy"], wall_s=final["wall_s"],
                 h2d_bytes_per_pull=final["weight_host_bytes"] // pulls,
                 d2h_bytes_per_step=final["grad_host_bytes"] // n,
                 device_encoded=final["device_encoded"],
                 wire_received_per_pull=final["bytes_received"] // pulls,
                 wire_sent_per_step=final["bytes_sent"] // n)
    try:
        r.update(json.loads((run / f"{name}.cuda.json").read_text()))
    except (OSError, ValueError):
        pass
    r["ok"] = bool(final) and r.get("rc") == 0 and final["steps"] == steps and final["eval_accuracy"] >= 0.7  # chance is 0.1
    return r

plain, overlap, cast, topk = variant("plain"), variant("overlap"), variant("cast"), variant("topk")

def d2h_ratio(v):
    if v.get("d2h_bytes_per_step") and overlap.get("d2h_bytes_per_step"):
        return round(v["d2h_bytes_per_step"] / overlap["d2h_bytes_per_step"], 3)
    return None

summary = {"check": "gpu", "device": device, "model": "digits-cnn", "steps": steps, "warmup": warmup,
           "plain": plain, "overlap": overlap, "cast": cast, "topk": topk,
           "cast_d2h_over_overlap": d2h_ratio(cast), "topk_d2h_over_overlap": d2h_ratio(topk),
           "overlap_over_plain_step": (round(overlap["step_ms_median"] / plain["step_ms_median"], 3)
                                       if plain.get("step_ms_median") and overlap.get("step_ms_median") else None),
           "ok": all(v["ok"] for v in (plain, overlap, cast, topk))}
text = json.dumps(summary, indent=2)
print(text)
if out:
    pathlib.Path(out).write_text(text + "\n")
sys.exit(0 if summary["ok"] else 1)
EOF
[ "$status" -eq 0 ]
