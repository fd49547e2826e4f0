"""A synthetic click log with a planted teacher, for the ctr-sparse workload (issue 13).

Each sample has FIELDS categorical ids, one per field, and DENSE standard-normal features.
A field's ids are Zipf-distributed ranks (rank 0 the most frequent) of a per-field vocabulary,
each (field, rank) scrambled to a 64-bit id that can land anywhere in the int64 range, as
real hashed feature ids do: a sharded table cannot assume small or dense keys.

The label is Bernoulli(sigmoid(teacher logit)). The teacher adds a hidden weight per
(field, rank), a linear term on the dense features and a small pairwise (factorization
machine) term among the first PAIR_FIELDS fields. Its held-out AUC is the best any model can
reach on this data (`teacher_auc`), so a trained model is judged by its distance to it.

Hidden weights are a counter-based hash of (seed, field, rank), not a seeded table: only the
ranks that occur are ever computed, so generation costs the same for a vocabulary of 200k or
of 10^9, and the sharded workload can recompute any row's truth without a vocabulary-sized
array. Past rank `head` the weights shrink as head / rank: ids seen a few times in a
training set cannot be learned by any model, and a teacher that put much of its signal there
would measure the sample size rather than the model. The tail still holds most of the
distinct ids (and of the table's rows), with about 6% of the ids' logit variance.

The test split comes from its own random stream: logs of any n_train with the same seed,
vocab and exponent share one test set, hence one teacher AUC.

The single-process reference model (CTRSparseModel) takes dense row indices from
`dense_indices`; the sharded one (CTRShardedModel, the built-in `ctr-sparse`) keys the rows
of a shardps table by the raw 64-bit ids. `click_data` is the built-in workload's log as
torch tensors, and `ClickPrediction` the worker loop's task for it: binary cross-entropy,
held-out AUC and log loss beside the teacher's.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shardps.pscommon.errors import FailedPrecondition
from shardps.worker.embedding import ShardedEmbedding

FIELDS = 26
DENSE = 13
VOCAB = 200_000          # ranks per field
ZIPF_A = 1.1
HEAD = 100               # ranks past this one carry shrinking teacher weight
PAIR_FIELDS = 6          # fields 0..5 interact pairwise in the teacher
PAIR_DIM = 4
DIM = 16
# The teacher's logit variance is about 1.7 from the ids, 0.8 from the dense features and 0.1
# from the pairwise term; with BIAS a third to a half of the labels are 1 and the teacher's
# AUC is about 0.82 (seed 0: 42% and 0.832; seed 1: 33% and 0.818). The pairwise term stays
# small because one pass over a few hundred thousand samples teaches a model little of it:
# unlearned, it costs 0.007 of AUC.
BIAS, ID_SCALE, DENSE_SCALE, PAIR_SCALE = -1.0, 0.55, 0.25, 0.07
ZIPF_TABLE = 4096        # ranks drawn from an exact CDF table (zipf_ranks)
GUIDE = 1 << 16          # slices of the table's mass in zipf_ranks' guide

# id = rank * KEY_MUL ^ FIELD_XOR[field] (mod 2**64): multiplying by an odd constant and
# xoring a constant are both bijections of uint64, so every field's ranks get distinct ids
# spread over all 64 bits. The constants do not depend on the seed: a (field, rank) names the
# same id in every log, only its popularity and its teacher weight change.
KEY_MUL = np.uint64(0x9E3779B97F4A7C15)
_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose outputs pass as independent."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


FIELD_XOR = _mix(np.arange(1, FIELDS + 1, dtype=np.uint64) * KEY_MUL)


@dataclasses.dataclass(frozen=True)
class ClickLog:
    ids_train: np.ndarray            # int64 (n_train, FIELDS), scrambled 64-bit ids
    dense_train: np.ndarray          # float32 (n_train, DENSE)
    labels_train: np.ndarray         # float32 (n_train,), 0 or 1
    ids_test: np.ndarray
    dense_test: np.ndarray
    labels_test: np.ndarray
    teacher_logits_test: np.ndarray  # float32 (n_test,): the logit each test label was drawn from
    seed: int
    vocab: int
    zipf_a: float
    head: int


def make_click_log(n_train: int = 200_000, n_test: int = 50_000, seed: int = 0,
                   vocab: int = VOCAB, zipf_a: float = ZIPF_A, head: int = HEAD) -> ClickLog:
    """A click log drawn from `seed`; train and test come from the same distribution."""
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if vocab < 1 or head < 1:
        raise ValueError(f"vocab and head must be positive, got {vocab} and {head}")
    if not zipf_a > 0 or zipf_a == 1:
        raise ValueError(f"zipf_a must be positive and not 1, got {zipf_a}")
    ids_tr, dense_tr, labels_tr, _ = _draw(n_train, [seed, 0x5EED, 0], seed, vocab, zipf_a, head)
    ids_te, dense_te, labels_te, logits_te = _draw(n_test, [seed, 0x5EED, 1], seed, vocab,
                                                   zipf_a, head)
    return ClickLog(ids_tr, dense_tr, labels_tr, ids_te, dense_te, labels_te,
                    logits_te.astype(np.float32), seed, vocab, zipf_a, head)


def _draw(n: int, stream: list[int], seed: int, vocab: int, zipf_a: float, head: int):
    """(ids, dense, labels, teacher logits) of n samples from the random stream `stream`."""
    rng = np.random.default_rng(stream)
    ranks = zipf_ranks(rng, (n, FIELDS), vocab, zipf_a)
    dense = rng.standard_normal((n, DENSE), dtype=np.float32)
    logits = teacher_logits(ranks, dense, seed, head)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    return scramble(ranks), dense, labels, logits


def scramble(ranks: np.ndarray) -> np.ndarray:
    """int64 ids of ranks (n, FIELDS); a bijection per field (module docstring)."""
    return ((ranks.astype(np.uint64) * KEY_MUL) ^ FIELD_XOR[: ranks.shape[1]]).view(np.int64)


def zipf_ranks(rng: np.random.Generator, shape: tuple[int, int], vocab: int,
               a: float) -> np.ndarray:
    """0-based ranks with P(rank k) proportional to (k + 1) ** -a, k < vocab.

    The CDF is exact over the first ZIPF_TABLE ranks (most of the draws) and, past them, the
    closed-form inverse of the midpoint integral of x ** -a, whose relative error per rank is
    about a(a+1) / (24 k^2): under 1e-8 from rank 4096 on. In the table a guide (the first
    candidate rank of each of GUIDE equal slices of its mass) replaces a binary search, which
    costs a cache miss per level and per draw: 1 s for 200k samples of 26 fields, 3-4 times
    this.
    """
    table = min(vocab, ZIPF_TABLE)
    mass = np.cumsum(np.arange(1, table + 1, dtype=np.float64) ** -a)
    lo = (table + 0.5) ** (1 - a)
    total = mass[-1] + ((vocab + 0.5) ** (1 - a) - lo) / (1 - a)
    scale = GUIDE / mass[-1]
    u = rng.random(shape).ravel()
    u *= total
    # floor(x * scale) rises with x, so every rank below guide[j] has cumulative mass <= any u with
    # floor(u * scale) = j: a draw starts at or below its rank and only steps up. Slices past
    # the table's mass start (and stay) at `table`, the tail's stand-in.
    slices = np.arange(int(total * scale) + 2)
    guide = np.searchsorted(np.floor(mass * scale), slices, side="left")
    ranks = guide[(u * scale).astype(np.int64)]
    upper = np.r_[mass, np.inf]
    climbing = np.flatnonzero(upper[ranks] <= u)
    while climbing.size:
        ranks[climbing] += 1
        climbing = climbing[upper[ranks[climbing]] <= u[climbing]]
    tail = np.flatnonzero(ranks == table)
    beyond = (lo + (1 - a) * (u[tail] - mass[-1])) ** (1 / (1 - a))
    ranks[tail] = np.minimum(np.floor(beyond + 0.5).astype(np.int64) - 1, vocab - 1)
    return ranks.reshape(shape)


def teacher_logits(ranks: np.ndarray, dense: np.ndarray, seed: int, head: int = HEAD) -> np.ndarray:
    """float64 logits of the planted teacher for ranks (n, FIELDS) and dense (n, DENSE)."""
    # fields differ in how much they tell, as real ones do: scales uniform in [0.25, 1]
    all_fields = np.arange(ranks.shape[1])
    field_scale = 0.25 + 0.75 * _uniform(seed, 1, all_fields, np.zeros_like(all_fields))

    def weight(fields, r):
        return _centered(seed, 2, fields, r) * _shrink(r, head) * field_scale[fields]

    def factors(fields, r):
        shrink = _shrink(r, head)
        return np.stack([_centered(seed, 3 + c, fields, r) * shrink for c in range(PAIR_DIM)], -1)

    v = _per_rank(ranks[:, :PAIR_FIELDS], factors)
    # sum over field pairs f < g of <v_f, v_g>, without the loop over pairs
    pairwise = 0.5 * ((v.sum(axis=1) ** 2).sum(axis=1) - (v ** 2).sum(axis=(1, 2)))
    beta = np.random.default_rng([seed, 0xDE45E]).normal(0.0, DENSE_SCALE, dense.shape[1])
    return (BIAS + ID_SCALE * _per_rank(ranks, weight).sum(axis=1)
            + dense.astype(np.float64) @ beta + PAIR_SCALE * pairwise)


def _shrink(ranks, head: int):
    """The teacher's weight scale by rank: 1 up to `head`, then head / rank."""
    return np.minimum(1.0, head / (ranks + 1.0))


def _per_rank(ranks: np.ndarray, value) -> np.ndarray:
    """value(fields, ranks) at each (field, rank) of ranks (n, F): float64 (n, F, ...), the
    trailing axes those value adds.

    The ZIPF_TABLE most frequent ranks of each field, most of the draws, are evaluated once
    and looked up; only the rarer ones are evaluated per draw."""
    fields = np.arange(ranks.shape[1])
    hot = value(fields[:, None], np.arange(ZIPF_TABLE)[None, :])
    slot = fields * ZIPF_TABLE + np.minimum(ranks, ZIPF_TABLE - 1)
    out = hot.reshape((-1,) + hot.shape[2:])[slot]
    cold = np.nonzero(ranks >= ZIPF_TABLE)
    out[cold] = value(cold[1], ranks[cold])
    return out


def _uniform(seed: int, stream: int, fields, ranks) -> np.ndarray:
    """U[0, 1) per (seed, stream, field, rank): a counter-based hash, no table."""
    key = _mix(np.array([seed, stream], dtype=np.uint64) * KEY_MUL)
    counter = (np.asarray(ranks, dtype=np.uint64) ^ key[0]) * KEY_MUL
    h = _mix(counter + (np.asarray(fields, dtype=np.uint64) + key[1]) * _U64(0xD6E8FEB86659FD93))
    return (h >> _U64(11)).astype(np.float64) * 2.0 ** -53


def _centered(seed: int, stream: int, fields, ranks) -> np.ndarray:
    """Mean 0, variance 1: uniform on [-sqrt 3, sqrt 3], per (seed, stream, field, rank)."""
    return (_uniform(seed, stream, fields, ranks) * 2.0 - 1.0) * np.sqrt(3.0)


def teacher_auc(log: ClickLog) -> float:
    """Held-out AUC of the teacher's own logits: the best a model can reach on this test set."""
    return auc(log.labels_test, log.teacher_logits_test)


def auc(labels, scores) -> float:
    """Exact ROC AUC: the Mann-Whitney statistic over ranks, ties counted half."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} and {s.size}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes among the labels")
    rank_sum = average_ranks(s)[pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(first) - 1]
    return ranks


def dense_indices(*id_sets: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Rows of one shared table for the single-process reference: each field's distinct ids
    (over all the given sets, so test ids get rows too) numbered from that field's offset.
    Returns the int64 index arrays, shaped as the inputs, and the table's row count."""
    widths = {ids.shape[1] for ids in id_sets}
    if len(widths) != 1:
        raise ValueError(f"id sets differ in field count: {sorted(widths)}")
    sizes = [len(ids) for ids in id_sets]
    stacked = np.concatenate(id_sets)
    out = np.empty(stacked.shape, dtype=np.int64)
    offset = 0
    for f in range(stacked.shape[1]):
        distinct, inverse = np.unique(stacked[:, f], return_inverse=True)
        out[:, f] = inverse.ravel() + offset
        offset += len(distinct)
    return np.split(out, np.cumsum(sizes)[:-1]), offset


def _deep_head(width: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """The deep part's MLP, the same in the reference and the sharded model."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


class CTRSparseModel(nn.Module):
    """Wide & deep over one shared embedding table (fields at their own row offsets).

    wide: a 1-dim row per id, summed over the fields (the EmbeddingBag's bag is the sample),
    plus a linear term on the dense features; deep: a DIM row per id (bags of one), the
    FIELDS rows concatenated with the dense features into a small MLP. Both tables have
    sparse gradients, so an optimizer step touches only the rows of the batch, as a
    parameter server's row push will.
    """

    def __init__(self, num_rows: int, fields: int = FIELDS, dense: int = DENSE, dim: int = DIM,
                 hidden: tuple[int, ...] = (64, 32)):
        super().__init__()
        self.fields, self.dim = fields, dim
        self.wide = nn.EmbeddingBag(num_rows, 1, mode="sum", sparse=True)
        self.deep = nn.EmbeddingBag(num_rows, dim, mode="sum", sparse=True)
        nn.init.zeros_(self.wide.weight)
        nn.init.normal_(self.deep.weight, 0.0, 0.01)
        self.wide_dense = nn.Linear(dense, 1)
        self.mlp = _deep_head(fields * dim + dense, hidden)

    def forward(self, rows: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """rows int64 (B, fields), dense float32 (B, dense) -> one logit per sample (B,)."""
        if rows.dim() != 2 or rows.shape[1] != self.fields:
            raise ValueError(f"rows must be (batch, {self.fields}), got {tuple(rows.shape)}")
        batch = rows.shape[0]
        wide = self.wide(rows) + self.wide_dense(dense)
        emb = self.deep(rows.reshape(-1, 1)).reshape(batch, self.fields * self.dim)
        return (wide + self.mlp(torch.cat([emb, dense], dim=1))).squeeze(1)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.wide.weight, self.deep.weight]

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]


# -- the built-in workload: `psctl worker --model ctr-sparse` -------------------------------------
# One pass over TRAIN_SAMPLES is 195 steps of 1024 (`--epochs 1 --batch-size 1024`). 200k, not
# the 400k of bench/ctr_sparse_reference.py's defaults: generating 400k + 50k samples takes 4-8 s
# on a busy 2-core machine, and every worker generates its own copy before it joins. The test
# set is the reference's (50k, seed 0): teacher AUC 0.832 whatever n_train is.
TRAIN_SAMPLES = 200_000
TEST_SAMPLES = 50_000
DATA_SEED = 0
TABLE = "ctr"


@dataclasses.dataclass(frozen=True)
class ClickSplit:
    """A click log as tensors: ids int64 (n, FIELDS), dense float32 (n, DENSE), labels float32."""

    ids_train: torch.Tensor
    dense_train: torch.Tensor
    y_train: torch.Tensor
    ids_test: torch.Tensor
    dense_test: torch.Tensor
    y_test: torch.Tensor
    teacher: dict          # the teacher's held-out metrics: teacher_auc, teacher_logloss


def click_split(log: ClickLog) -> ClickSplit:
    y_test = torch.from_numpy(log.labels_test)
    teacher_logits = torch.from_numpy(log.teacher_logits_test)
    teacher = {"teacher_auc": round(teacher_auc(log), 4),
               "teacher_logloss": round(F.binary_cross_entropy_with_logits(teacher_logits, y_test).item(), 4)}
    return ClickSplit(torch.from_numpy(log.ids_train), torch.from_numpy(log.dense_train),
                      torch.from_numpy(log.labels_train), torch.from_numpy(log.ids_test),
                      torch.from_numpy(log.dense_test), y_test, teacher)


@functools.lru_cache(maxsize=2)
def click_data(n_train: int = TRAIN_SAMPLES, n_test: int = TEST_SAMPLES, seed: int = DATA_SEED) -> ClickSplit:
    """The built-in workload's data: the same log in every worker (a fixed seed, no download)."""
    return click_split(make_click_log(n_train, n_test, seed=seed))


class CTRShardedModel(nn.Module):
    """CTRSparseModel (wide & deep, the same head) over one shardps table keyed by the raw
    64-bit ids of every field.

    One table for all fields: a field's ids are distinct from every other field's (the ids
    are per-field bijections spread over 64 bits), so the fields need no offsets, and a step
    is one row pull and one row push per shard whatever the field count (a table per field
    would be 26 pull calls per shard and step). One row per id holds both of the reference's
    rows: column 0 is the wide weight, columns 1..dim the deep embedding, so a batch's ids are
    looked up, sent and updated once instead of twice (a dim-1 row alone costs 8 bytes of id
    on the wire for 4 of value). The optimizers are per coordinate (sgd, adagrad) or per row
    with one step count per table (lazy adam), so the update is the reference's. The one
    difference: the wide column starts as normal(`scale`) like the rest of the row (a table
    has one initializer) where the reference starts it at zero; summed over 26 fields that is
    a logit of about +-0.05 at the start.

    The rows are a ShardedEmbedding over the (batch, fields) ids: the reference's deep
    EmbeddingBag has bags of one id, i.e. it is an embedding lookup, and its wide bag (the
    fields of a sample) is the sum of column 0 over the fields.
    """

    def __init__(self, fields: int = FIELDS, dense: int = DENSE, dim: int = DIM,
                 hidden: tuple[int, ...] = (64, 32), table: str = TABLE, scale: float = 0.01, seed: int = 0):
        super().__init__()
        self.fields, self.dim = fields, dim
        # the table's spec is part of the job: every worker declares the same (seed fixed,
        # not the worker's --seed)
        self.emb = ShardedEmbedding(table, 1 + dim, initializer="normal", scale=scale, seed=seed)
        self.wide_dense = nn.Linear(dense, 1)
        self.mlp = _deep_head(fields * dim + dense, hidden)

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """ids int64 (B, fields) raw 64-bit ids, dense float32 (B, dense) -> a logit per sample (B,)."""
        if ids.dim() != 2 or ids.shape[1] != self.fields:
            raise ValueError(f"ids must be (batch, {self.fields}), got {tuple(ids.shape)}")
        batch = ids.shape[0]
        rows = self.emb(ids)                                    # (B, fields, 1 + dim)
        wide = rows[:, :, 0].sum(dim=1, keepdim=True) + self.wide_dense(dense)
        emb = rows[:, :, 1:].reshape(batch, self.fields * self.dim)
        return (wide + self.mlp(torch.cat([emb, dense], dim=1))).squeeze(1)

    def row_ids(self, ids: torch.Tensor, dense: torch.Tensor) -> dict:
        """The ids each sharded module reads for these inputs (what the loop fetches before
        the forward): {module: ids}."""
        return {self.emb: ids}


EVAL_BATCH = 8192


class ClickPrediction:
    """The worker loop's task for ctr-sparse: inputs (ids, dense), binary cross-entropy on one
    logit per sample, held-out AUC and log loss, the teacher's beside them."""

    name = "click"

    def size(self, split: ClickSplit) -> int:
        return len(split.y_train)

    def batch(self, split: ClickSplit, idx: torch.Tensor, device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return ((split.ids_train[idx].to(device), split.dense_train[idx].to(device)),
                split.y_train[idx].to(device))

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, y)

    def evaluate(self, model: nn.Module, split: ClickSplit, fetch_rows: Callable | None = None) -> dict:
        """Held-out AUC and log loss over the whole test set. `fetch_rows({module: ids})` loads
        the rows of the test ids (the worker reads them without creating any: rows of ids no
        one trained on read as their initial value)."""
        if fetch_rows is None:
            raise FailedPrecondition("evaluating ctr-sparse needs its table's rows: pass fetch_rows")
        device = next(model.parameters()).device
        ids, dense = split.ids_test.to(device), split.dense_test.to(device)
        fetch_rows(model.row_ids(ids, dense))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = torch.cat([model(i, d) for i, d in zip(ids.split(EVAL_BATCH), dense.split(EVAL_BATCH))])
        finally:
            model.train(was_training)
        logits = logits.to("cpu", torch.float32)
        logloss = F.binary_cross_entropy_with_logits(logits, split.y_test).item()
        return {"eval_auc": round(auc(split.y_test.numpy(), logits.numpy()), 4),
                "eval_logloss": round(logloss, 4), **split.teacher}


CLICK = ClickPrediction()
