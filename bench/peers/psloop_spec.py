"""The ps-loop workload (README.md, "ps-loop"): model shape, placement, update rule, command
line, and the one JSON record every ps-loop script prints (bench/ps_loop.py prints the same
fields for shardps, and bench/make_table.py renders both)."""

from harness import WARMUP_STEPS, malloc_tag, parse_run_args

PRESETS = {"small": (1_000_000, 8), "large": (25_000_000, 50)}  # (params P, tensors T)
STEPS = {"small": 200, "large": 10}  # timed steps N
LR = 0.01  # servers: p -= LR * g
GRAD_SCALE = 1e-3  # workers: g = p * GRAD_SCALE


def tensor_sizes(preset):
    """T 1-D tensors holding P parameters; the first P % T are one element longer."""
    p, t = PRESETS[preset]
    return [p // t + (1 if i < p % t else 0) for i in range(t)]


def owned_by(server, n_tensors, n_servers):
    """Round-robin placement: tensor i on server i % S."""
    return [i for i in range(n_tensors) if i % n_servers == server]


def parse_args(add_more=None):
    return parse_run_args(PRESETS, lambda preset: STEPS[preset], 120, add_more)


def summarize(impl, a, workers, servers, lo=None, **extra):
    """workers: timed_steps() records; servers: bytes_pulled, bytes_pushed (warm-up included),
    param_sum (float64 sum of the shard after the run) and rss_mb."""
    P, T = PRESETS[a.preset]
    W, N = a.workers, a.steps
    wall = max(w["t1"] for w in workers) - min(w["t0"] for w in workers)
    pushes = W * (N + WARMUP_STEPS)  # every parameter is pulled and pushed once per step per worker
    each_way = pushes * P * 4
    mean = sum(s["param_sum"] for s in servers) / P
    # Parameters start at 1.0 and every applied push scales them by (1 - LR*GRAD_SCALE); the order
    # of racing pushes changes the result only in the rounding.
    serial = (1 - LR * GRAD_SCALE) ** pushes
    record = dict(
        impl=impl + malloc_tag(), preset=a.preset, params=P, tensors=T, servers=a.servers, workers=W, steps=N,
        wall_s=round(wall, 4),
        steps_per_s=round(sum(N / (w["t1"] - w["t0"]) for w in workers), 2),
        MBps=round(2 * W * N * P * 4 / wall / 1e6, 1),
        server_rss_mb=round(max(s["rss_mb"] for s in servers), 1),
        worker_rss_mb=round(max(w["rss_mb"] for w in workers), 1),
        bytes_ok=(sum(s["bytes_pulled"] for s in servers) == each_way
                  and sum(s["bytes_pushed"] for s in servers) == each_way),
        update_ok=abs((1 - mean) / (1 - serial) - 1) < 0.05,
        param_mean=round(mean, 6), param_mean_serial=round(serial, 6),
    )
    if lo is not None:
        record["lo_bytes_per_logical"] = round(lo / (2 * each_way), 3)
    record.update(extra)
    return record
