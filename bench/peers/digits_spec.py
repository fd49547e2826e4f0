"""The "digits" time-to-accuracy workload (README.md, "digits"): data, model, batches, the
update rule, the evaluation cadence and the stop rule. digits_single.py and torch_rpc_digits.py
both run this module's code, so they compute the same thing and differ only in where each
step happens (bench/digits_peer.py reimplements it on shardps with the same fields)."""
import argparse
import time

import torch
import torch.nn.functional as F

LR = 0.1  # plain SGD on the server
BATCH = 32  # samples per gradient, drawn uniformly with replacement
EVAL_EVERY = 25  # updates between held-out evaluations
MAX_UPDATES, MAX_SECONDS = 3000, 120.0  # stop even if the target is never reached


def load_split():
    """sklearn's bundled digits (1797 x 64, pixels 0..16) scaled to [0, 1], split 75/25
    stratified with random_state=0: 1347 training and 450 test samples (float32, int64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    as_x = lambda v: torch.tensor(v, dtype=torch.float32)
    as_y = lambda v: torch.tensor(v, dtype=torch.int64)
    return as_x(x_tr), as_x(x_te), as_y(y_tr), as_y(y_te)


def build_model(seed):
    """64-128-10 MLP, PyTorch's default init drawn right after manual_seed(seed): 9,610 parameters."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def trainer_rng(seed, rank):
    """Each trainer draws its batches from its own stream, so W=1 replays the single-process run."""
    return torch.Generator().manual_seed(seed * 1000 + rank)


def batch_gradient(model, x_train, y_train, rng):
    idx = torch.randint(len(x_train), (BATCH,), generator=rng)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
    return [p.grad for p in model.parameters()]


class Referee:
    """The server side of the workload: owns the model, applies p -= LR * g for each gradient it
    is handed (callers serialize the calls), evaluates on the test set every EVAL_EVERY updates
    (and at either cap), and decides when training stops. Its clock starts at the first update,
    so process start-up is not part of any time it reports."""

    def __init__(self, model, x_test, y_test, target):
        self.model, self.params = model, list(model.parameters())
        self.x_test, self.y_test, self.target = x_test, y_test, target
        self.n = 0  # updates applied
        self.t0 = None  # perf_counter at the start of update 1
        self.t = 0.0  # seconds from t0 to the end of update n
        self.curve = []  # [t, n, accuracy] per evaluation
        self.reached_at = None  # (t, n) of the first evaluation at or above the target
        self.stop = None  # why training stopped: target, max_updates or max_seconds

    def accuracy(self):
        with torch.no_grad():
            right = (self.model(self.x_test).argmax(1) == self.y_test).sum()
        return int(right) / len(self.y_test)

    def apply(self, grads):
        """One update; True once training must stop."""
        if self.t0 is None:
            self.t0 = time.perf_counter()
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.sub_(g, alpha=LR)
        self.n += 1
        self.t = time.perf_counter() - self.t0
        timed_out, capped = self.t >= MAX_SECONDS, self.n >= MAX_UPDATES
        if self.n % EVAL_EVERY == 0 or capped or timed_out:
            acc = self.accuracy()  # inline: no update lands while the model is being evaluated
            self.curve.append([round(self.t, 4), self.n, round(acc, 4)])
            if acc >= self.target:
                self.reached_at, self.stop = (self.t, self.n), "target"
            elif capped:
                self.stop = "max_updates"
            elif timed_out:
                self.stop = "max_seconds"
        return self.stop is not None

    def report(self, impl, workers, seed, **extra):
        accs = [c[2] for c in self.curve]
        hit = self.reached_at
        return dict(
            impl=impl, workers=workers, seed=seed, target=self.target, reached=hit is not None,
            time_to_target_s=round(hit[0], 4) if hit else None,
            updates_to_target=hit[1] if hit else None,
            final_accuracy=accs[-1] if accs else None,
            updates_per_s=round(self.n / self.t, 1) if self.t > 0 else None,
            torch=torch.__version__, updates=self.n, elapsed_s=round(self.t, 4), stop=self.stop,
            # did it learn at all: the first evaluation against the best one
            first_accuracy=accs[0] if accs else None, best_accuracy=max(accs) if accs else None,
            **extra, curve=self.curve)  # the long field last


def parse_args(add_more=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.95, help="held-out accuracy that ends training")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a listing")
    ap.add_argument("--timeout", type=float, default=200, help="give up on the run after this many seconds")
    if add_more:
        add_more(ap)
    return ap.parse_args()
