"""The one-core, no-IPC ceiling for ps-loop. Two timings, each the best of 5 repetitions of
N steps after the warm-up (a ceiling, so the best and not the median):

- copy: np.copyto of the bytes one parameter-server step moves (P*4 pulled + P*4 pushed);
- sgd:  one server's update pass, p -= lr * g over all P parameters (the cost of one push).

MBps and steps_per_s count 2*P*4 logical bytes a step, as the PS scripts do, so MBps is the copy
bandwidth. --servers and --workers are accepted, so every ps-loop script takes the same
command line, and ignored.

    python bench/peers/memcpy_limit.py --preset large --json
"""
import os
import time

import numpy as np

import harness
from psloop_spec import LR, PRESETS, parse_args, tensor_sizes

REPEATS = 5


def best_time(step, n):
    for _ in range(harness.WARMUP_STEPS):
        step()
    best = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        for _ in range(n):
            step()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    a = parse_args()
    harness.deadline(a.timeout)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, whichever this process may use
    P, T = PRESETS[a.preset]
    sizes = tensor_sizes(a.preset)
    params = [np.ones(n, np.float32) for n in sizes]
    grads = [np.full(n, 1e-3, np.float32) for n in sizes]
    wire = [np.empty(n, np.float32) for n in sizes]

    def copy_step():  # the pull (params -> wire) and the push (wire -> grads) volumes
        for p, b, g in zip(params, wire, grads):
            np.copyto(b, p)
            np.copyto(g, b)

    def sgd_step():
        for p, g in zip(params, grads):
            p -= LR * g

    t_copy = best_time(copy_step, a.steps)
    t_sgd = best_time(sgd_step, a.steps)
    harness.emit(dict(
        impl="memcpy", preset=a.preset, params=P, tensors=T, steps=a.steps,
        wall_s=round(t_copy, 4), steps_per_s=round(a.steps / t_copy, 2),
        MBps=round(2 * P * 4 * a.steps / t_copy / 1e6, 1),
        sgd_wall_s=round(t_sgd, 4),
        sgd_steps_per_s=round(a.steps / t_sgd, 2),  # pushes one server core can apply per second
        sgd_MBps=round(P * 4 * a.steps / t_sgd / 1e6, 1),  # gradient bytes applied per second
        numpy=np.__version__), a.json)


if __name__ == "__main__":
    main()
