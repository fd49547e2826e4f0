"""Single-process reference for the ctr-sparse workload: CTRSparseModel trained on the
synthetic click log (worker/models/ctr_sparse.py) with no parameter server, to give the
sharded runs a target: the held-out AUC this model reaches, beside the planted teacher's
(the best any model can reach on the same test set).

The embedding tables (sparse gradients) get --optimizer (adagrad, sparse_adam: torch's
SparseAdam, or sgd) at --lr; the MLP and the dense wide term get Adam at --dense-lr. Raw
64-bit ids become rows of one table here, per field by np.unique over train and test.

The defaults make one pass over the training set, as production CTR training does, for the
same reason: in a second pass the rows of rare ids have seen their few labels and memorize
them (held-out AUC falls by 0.02 to 0.06 within half an epoch here).

    .venv/bin/python bench/ctr_sparse_reference.py                   # the defaults below
    .venv/bin/python bench/ctr_sparse_reference.py --optimizer sparse_adam --json-out ref.jsonl

Prints one JSON line per evaluation (every --eval-every steps and at the end: held-out AUC
and log loss) and a final summary line with the teacher's AUC and log loss beside the
model's; --json-out writes the same lines to a file.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from shardps.worker.models import ctr_sparse

DEFAULT_LR = {"adagrad": 0.02, "sparse_adam": 0.002, "sgd": 3.0}
# Adagrad's first step on a row is lr * sign(g) whatever |g| is, so a row seen once moves by
# the full lr and memorizes its one label. A small initial accumulator (the mean loss's row
# gradients are ~1e-4) scales those steps down; rows seen often soon outgrow it.
ADAGRAD_INIT = 1e-6


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=390, help="390 x 1024 is one pass over --train")
    ap.add_argument("--batch", type=int, default=1024, help="samples per step")
    ap.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="adagrad",
                    help="for the embedding tables")
    ap.add_argument("--lr", type=float, default=None,
                    help="embedding learning rate; when unset: " +
                         ", ".join(f"{k} {v}" for k, v in DEFAULT_LR.items()))
    ap.add_argument("--dense-lr", type=float, default=1e-3, help="Adam's, for the MLP")
    ap.add_argument("--dim", type=int, default=ctr_sparse.DIM, help="of the deep embeddings")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    ap.add_argument("--train", type=int, default=400_000, help="training samples")
    ap.add_argument("--test", type=int, default=50_000, help="held-out samples")
    ap.add_argument("--vocab", type=int, default=ctr_sparse.VOCAB, help="ranks per field")
    ap.add_argument("--zipf-a", type=float, default=ctr_sparse.ZIPF_A, help="the ids' exponent")
    ap.add_argument("--seed", type=int, default=0, help="of the data and of the model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads: batches this small gain nothing from more, and a loaded "
                         "machine loses much")
    ap.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    a = ap.parse_args(argv)
    for name in ("steps", "batch", "eval_every", "train", "test", "vocab", "dim", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if not a.zipf_a > 0 or a.zipf_a == 1:
        ap.error(f"--zipf-a must be positive and not 1, got {a.zipf_a}")
    if not 0 <= a.seed < 2**63:
        ap.error(f"--seed must be in [0, 2**63), got {a.seed}")
    if a.batch > a.train:
        ap.error(f"--batch {a.batch} is larger than --train {a.train}")
    if a.lr is None:
        a.lr = DEFAULT_LR[a.optimizer]
    return a


def embedding_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, initial_accumulator_value=ADAGRAD_INIT)
    return torch.optim.SGD(params, lr=lr)


def evaluate(model, rows, dense, labels) -> tuple[float, float]:
    """(AUC, mean log loss) over the whole held-out set."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(r, d) for r, d in zip(rows.split(8192), dense.split(8192))])
    model.train()
    loss = F.binary_cross_entropy_with_logits(logits, labels).item()
    return ctr_sparse.auc(labels.numpy(), logits.numpy()), loss


@dataclasses.dataclass
class Data:
    rows_train: torch.Tensor   # int64 (n, FIELDS): rows of the shared table
    dense_train: torch.Tensor
    y_train: torch.Tensor
    rows_test: torch.Tensor
    dense_test: torch.Tensor
    y_test: torch.Tensor
    num_rows: int
    teacher: dict              # the teacher's held-out AUC and log loss


def load(a: argparse.Namespace) -> Data:
    log = ctr_sparse.make_click_log(a.train, a.test, seed=a.seed, vocab=a.vocab, zipf_a=a.zipf_a)
    (rows_train, rows_test), num_rows = ctr_sparse.dense_indices(log.ids_train, log.ids_test)
    y_test = torch.from_numpy(log.labels_test)
    teacher_logits = torch.from_numpy(log.teacher_logits_test)
    teacher = {"teacher_auc": round(ctr_sparse.teacher_auc(log), 4),
               "teacher_logloss": round(
                   F.binary_cross_entropy_with_logits(teacher_logits, y_test).item(), 4)}
    return Data(torch.from_numpy(rows_train), torch.from_numpy(log.dense_train),
                torch.from_numpy(log.labels_train), torch.from_numpy(rows_test),
                torch.from_numpy(log.dense_test), y_test, num_rows, teacher)


def batches(n: int, batch: int, seed: int):
    """Endless minibatch indices: a new order each pass, the short last batch dropped."""
    order = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=order)
        yield from perm[: n // batch * batch].split(batch)


def train(a: argparse.Namespace, d: Data, emit) -> tuple[float, float]:
    """Trains for a.steps, emitting an eval record every a.eval_every; the last (AUC, log loss)."""
    torch.manual_seed(a.seed)
    model = ctr_sparse.CTRSparseModel(d.num_rows, dim=a.dim)
    sparse_opt = embedding_optimizer(a.optimizer, model.sparse_parameters(), a.lr)
    dense_opt = torch.optim.Adam(model.dense_parameters(), lr=a.dense_lr)
    t0 = time.perf_counter()
    losses = []
    for step, idx in zip(range(1, a.steps + 1), batches(len(d.y_train), a.batch, a.seed)):
        sparse_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        logits = model(d.rows_train[idx], d.dense_train[idx])
        loss = F.binary_cross_entropy_with_logits(logits, d.y_train[idx])
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
        losses.append(loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            auc, logloss = evaluate(model, d.rows_test, d.dense_test, d.y_test)
            emit({"event": "eval", "step": step, "epoch": round(step * a.batch / a.train, 2),
                  "auc": round(auc, 4), "logloss": round(logloss, 4),
                  "train_loss": round(float(np.mean(losses)), 4),
                  "wall_s": round(time.perf_counter() - t0, 2)})
            losses = []
    return auc, logloss


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    # the sparse gradients are torch's own, well formed: checking each would only cost time
    torch.sparse.check_sparse_tensor_invariants.disable()
    with open(a.json_out, "w") if a.json_out else contextlib.nullcontext() as out:
        def emit(record: dict):
            line = json.dumps(record)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()

        t0 = time.perf_counter()
        d = load(a)
        data_s = time.perf_counter() - t0
        auc, logloss = train(a, d, emit)
        emit({"event": "summary", "auc": round(auc, 4), "logloss": round(logloss, 4), **d.teacher,
              "auc_gap": round(d.teacher["teacher_auc"] - auc, 4),
              "positive_rate": round(float(d.y_train.mean()), 4),
              "optimizer": a.optimizer, "lr": a.lr, "dense_lr": a.dense_lr, "steps": a.steps,
              "batch": a.batch, "dim": a.dim, "train": a.train, "test": a.test,
              "vocab": a.vocab, "zipf_a": a.zipf_a, "seed": a.seed, "table_rows": d.num_rows,
              "threads": torch.get_num_threads(), "data_s": round(data_s, 2),
              "total_s": round(time.perf_counter() - t0, 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
