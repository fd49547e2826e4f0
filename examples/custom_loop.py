"""Train your own model through shardps with your own loop.

Start a new job, a scheduler and two servers by hand as in README.md's tour (one job trains
one model: a job whose workers already declared another model, such as the tour's or
`psctl up`'s digits-mlp, refuses this one and says how it differs), then:

    python examples/custom_loop.py --scheduler 127.0.0.1:7000 --steps 300
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

from shardps import PSClient
from shardps.worker import data


def build_model() -> nn.Module:
    torch.manual_seed(0)  # every worker starts from the same weights
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheduler", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--overlap", action="store_true", help="stream gradients during backward")
    a = ap.parse_args()

    split = data.digits(image=True)          # scikit-learn's bundled digits, 1x8x8
    model = build_model()
    gen = torch.Generator().manual_seed(1)
    with PSClient.connect(a.scheduler, model, overlap=a.overlap) as ps:
        for _ in range(a.steps):
            ps.pull()                            # the servers' current weights
            idx = torch.randint(len(split.x_train), (32,), generator=gen)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            ps.push()                            # gradients, compressed per the job spec
        ps.pull()
        acc = data.accuracy(model, split.x_test, split.y_test)
        print(f"worker {ps.worker_id}: clock {ps.clock}, sent {ps.bytes_sent} B, "
              f"received {ps.bytes_received} B, held-out accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
