"""The digits workload in one process, no RPC: the reference torch_rpc_digits.py distributes.
Trainer 0's batches, the gradient and its update all happen here, one after the other, so a
parameter server with one trainer must produce exactly this accuracy curve.

    python bench/peers/digits_single.py --seed 0 --json
"""
import time

STARTED = time.perf_counter()  # before torch is imported: startup_s includes the imports

import torch  # noqa: E402

import harness  # noqa: E402
from digits_spec import Referee, batch_gradient, build_model, load_split, parse_args, trainer_rng  # noqa: E402


def main():
    a = parse_args()
    harness.deadline(a.timeout)
    torch.set_num_threads(1)  # as every process of the parameter-server run
    x_tr, x_te, y_tr, y_te = load_split()
    model = build_model(a.seed)
    ref, rng = Referee(model, x_te, y_te, a.target), trainer_rng(a.seed, 0)
    while not ref.apply(batch_gradient(model, x_tr, y_tr, rng)):
        pass
    harness.emit(ref.report("single_process", 1, a.seed, startup_s=round(ref.t0 - STARTED, 4)), a.json)


if __name__ == "__main__":
    main()
