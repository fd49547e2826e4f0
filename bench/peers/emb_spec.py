"""The emb-loop workload (README.md, "emb-loop"): sparse embedding tables trained with Adagrad.
Presets, the deterministic id stream, the 64-bit keys, placement, the checks and the JSON record;
process plumbing comes from harness.py."""

import numpy as np

from harness import WARMUP_STEPS, parse_run_args

# fields F, rows per field N, dims D, batch B (ids per field per step), timed steps
PRESETS = {"small": dict(fields=8, rows=100_000, dim=16, batch=512, steps=200),
           "large": dict(fields=26, rows=500_000, dim=32, batch=4096, steps=20)}
ZIPF_A = 1.2  # id popularity: a few hot rows, a long tail
LR, EPS = 0.01, 1e-10  # Adagrad
GRAD_SCALE = 1e-3  # fake gradient g = rows * GRAD_SCALE
ROW_INIT, ACC_INIT = 1.0, 0.1
# id64 = idx * KEY_MUL + field * FIELD_MUL (mod 2**64). KEY_MUL is odd, so idx -> id64 is a
# bijection per field: the same rows, keys spread over all 64 bits.
KEY_MUL, FIELD_MUL = 0x9E3779B97F4A7C15, 0x632BE59BD9B4E019


def draw(w, f, s, preset):
    """Raw ids of worker w, field f, step s (warm-up steps count: s = 0 is the first warm-up):
    B Zipf draws folded into [0, N), duplicates kept. Seeded per (w, f, s), so any system
    that calls this sees the same ids."""
    p = PRESETS[preset]
    rng = np.random.default_rng(seed=(1000 * w + f) * 100003 + s)
    return (rng.zipf(ZIPF_A, p["batch"]) - 1) % p["rows"]


def unique_ids(w, f, s, preset):
    """The rows a step touches: each distinct id once (sorted int64)."""
    return np.unique(draw(w, f, s, preset))


def all_draws(w, preset, n_steps):
    """Every raw batch of worker w, [step][field], drawn before the clock starts: the generator is
    the benchmark's cost. The dedup stays inside each step, as it is the worker's work."""
    return [[draw(w, f, s, preset) for f in range(PRESETS[preset]["fields"])] for s in range(n_steps)]


def id64(idx, f):
    """64-bit key of row idx of field f, for systems keyed by arbitrary ids (uint64, wraps mod 2**64)."""
    return np.asarray(idx).astype(np.uint64) * np.uint64(KEY_MUL) + np.uint64(f * FIELD_MUL % 2**64)


def rows_on_server(s, n_servers, preset):
    """Rows of each field that server s holds: idx % S == s, stored at local index idx // S."""
    return len(range(s, PRESETS[preset]["rows"], n_servers))


def acc_growth(accs):
    """How much the accumulators grew (float64 sum of acc - ACC_INIT): each applied row adds
    about D * GRAD_SCALE**2. Measured from float32(ACC_INIT) so untouched rows add exactly 0."""
    start = float(np.float32(ACC_INIT))
    return sum(float(a.sum(dtype=np.float64)) - start * a.size for a in accs)


def expected_rows(preset, n_workers, n_steps):
    """Rows every worker pulls (and pushes) over n_steps, from the id stream alone: the reference
    update_ok holds the servers' counts to, independent of anything the processes counted."""
    F = PRESETS[preset]["fields"]
    return sum(len(unique_ids(w, f, s, preset))
               for w in range(n_workers) for f in range(F) for s in range(n_steps))


def parse_args(add_more=None):
    return parse_run_args(PRESETS, lambda preset: PRESETS[preset]["steps"], 180, add_more)


def summarize(impl, a, workers, servers, lo=None, **extra):
    """workers: timed_steps() records plus unique rows received and pushed, over the timed steps
    (timed_pulled, timed_pushed) and over all steps (rows_pulled, rows_pushed).
    servers: rows_served, rows_updated, acc_growth, rss_mb."""
    p = PRESETS[a.preset]
    W, N, D = a.workers, a.steps, p["dim"]
    wall = max(w["t1"] for w in workers) - min(w["t0"] for w in workers)
    timed_pulled = sum(w["timed_pulled"] for w in workers)
    moved = timed_pulled + sum(w["timed_pushed"] for w in workers)
    pulled, pushed = sum(w["rows_pulled"] for w in workers), sum(w["rows_pushed"] for w in workers)
    served, updated = sum(s["rows_served"] for s in servers), sum(s["rows_updated"] for s in servers)
    acc_ratio = sum(s["acc_growth"] for s in servers) / (D * GRAD_SCALE ** 2) / max(1, updated)
    record = dict(
        impl=impl, preset=a.preset, fields=p["fields"], rows=p["rows"], dim=D, batch=p["batch"],
        servers=a.servers, workers=W, steps=N, wall_s=round(wall, 4),
        rows_per_s=round(moved / wall),
        MBps=round(moved * D * 4 / wall / 1e6, 1),  # row payload only; the ids are not counted
        steps_per_s=round(sum(N / (w["t1"] - w["t0"]) for w in workers), 2),
        unique_frac=round(timed_pulled / (W * N * p["fields"] * p["batch"]), 4),
        server_rss_mb=round(max(s["rss_mb"] for s in servers), 1),
        worker_rss_mb=round(max(w["rss_mb"] for w in workers), 1),
        rows_ok=served == pulled and updated == pushed,
        update_ok=updated == expected_rows(a.preset, W, WARMUP_STEPS + N),
        # Catches a server that counts rows but drops their updates. Unlocked pushes racing on a
        # hot row may lose a few, well inside the 5%.
        acc_ok=abs(acc_ratio - 1) < 0.05, acc_ratio=round(acc_ratio, 4),
    )
    if lo is not None:  # over fp32 row bytes of all steps; the int64 ids push TCP runs to ~1.1
        record["lo_bytes_per_logical"] = round(lo / ((pulled + pushed) * D * 4), 3)
    record.update(extra)
    return record
