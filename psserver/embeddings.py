"""A shard's rows of the model's embedding tables: one RowStore per table, keyed by 64-bit id.

Every shard holds some rows of every table: an id lives on `pscommon.tables.shard_of(id,
num_servers)`, which workers compute before they send, so a row never moves and no shard
needs a map of the others. A table is declared with its spec (name, dim, initializer, seed)
on every shard; a row is created on first touch with the spec's counter-based initial value.

Row gradients ride in the shard's ordinary push (ps.proto RowBlock bodies beside the dense
chunks), so one push per step and shard keeps one ledger entry and one clock tick whatever a
step touched. Inside the shard they are values of the push's gradient mapping under a
`TableKey` (never equal to a dense key's string): the consistency modes pass the mapping on
without looking inside, sync accumulates the step's row gradients (`accumulate`) and applies
their average when the step completes (`average`), the others apply them at once.

The table's optimizer follows the job's: sgd -> sgd, adagrad -> adagrad, adam -> sparse
(lazy) adam, each touching only the rows a push names (psserver/sparse_optim.py). Momentum
has no sparse form here: a job with it is refused when a table is declared.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from shardps.pscommon import tables
from shardps.pscommon.config import OptimizerConfig
from shardps.pscommon.errors import FailedPrecondition, InvalidArgument, NotFound
from shardps.pscommon.tables import TableSpec, sum_duplicates
from shardps.psserver import rowstore, sparse_optim
from shardps.psserver.rowstore import Initializer, RowStore, RowStoreConfig

MAX_TABLES = 256


@dataclasses.dataclass(frozen=True)
class TablePolicy:
    """How a server keeps its rows (psctl server flags; the same on every server of a job is
    the sane choice, but nothing breaks if they differ). `admit_after`: an id gets a stored
    row from its N-th lookup (before: the initial value is answered and its gradients are
    dropped, counted). `evict_idle_steps`: rows no pull or push touched for that many steps
    (the fastest worker's clock at this shard) are dropped, counted. `max_rows`: a cap per
    table on this shard; past it the least recently used rows go, counted."""

    admit_after: int = 1
    evict_idle_steps: int | None = None
    max_rows: int | None = None

    def __post_init__(self):
        for name, low in (("admit_after", 1), ("evict_idle_steps", 1), ("max_rows", 1)):
            value = getattr(self, name)
            if value is None and name != "admit_after":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgument(f"{name}={value!r} must be an integer >= {low}")


@dataclasses.dataclass(frozen=True)
class TableKey:
    """The key of a table's row gradients in a push's gradient mapping."""

    table: str


@dataclasses.dataclass(frozen=True)
class RowGrad:
    """A push's gradients for rows of one table: unique uint64 ids, finite float32
    [len(ids), dim] (the servicer checks them before any is applied; `of` sums repeats)."""

    ids: np.ndarray
    grads: np.ndarray

    @classmethod
    def of(cls, ids: np.ndarray, grads: np.ndarray) -> "RowGrad":
        ids, grads = rowstore.as_ids(ids), np.ascontiguousarray(grads, np.float32)
        ids, grads = sum_duplicates(ids, grads)   # duplicate ids in one push are one row's gradient
        return cls(ids, grads)


def sparse_optimizer(cfg: OptimizerConfig) -> sparse_optim.SparseOptimizer:
    """The sparse form of the job's optimizer (same hyperparameters)."""
    if cfg.kind == "sgd":
        return sparse_optim.build("sgd", lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.kind == "adagrad":
        return sparse_optim.build("adagrad", lr=cfg.lr, lr_decay=cfg.lr_decay, eps=cfg.eps,
                                  initial_accumulator_value=cfg.initial_accumulator_value)
    if cfg.kind == "adam":
        return sparse_optim.build("sparse_adam", lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps)
    raise FailedPrecondition(f"optimizer {cfg.kind!r} has no sparse form for embedding tables; "
                             "use sgd, adagrad or adam")


class TableSet:
    """The tables of one shard. Not thread-safe: the shard calls it under its lock."""

    def __init__(self, shard_id: int, num_shards: int, optimizer: OptimizerConfig,
                 policy: TablePolicy = TablePolicy()):
        self.shard_id, self.num_shards, self.optimizer, self.policy = shard_id, num_shards, optimizer, policy
        self.specs: dict[str, TableSpec] = {}
        self.stores: dict[str, RowStore] = {}
        # per table since this set was made (not checkpointed): rows answered to pulls, and
        # rows the optimizer updated (gradients dropped under admission are not updates)
        self.rows_served: dict[str, int] = {}
        self.rows_updated: dict[str, int] = {}
        self._swept_at = 0

    def check_declare(self, specs: list[TableSpec]) -> None:
        """Refuse, before anything changes, a table declared twice in one call, one that
        exists with another spec, and too many tables."""
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"a table is declared twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
        for spec in specs:
            old = self.specs.get(spec.name)
            if old is not None and old != spec:
                raise FailedPrecondition(f"table {spec.name!r} exists with another spec ({old}); declared {spec}")
        if len(set(self.specs) | set(names)) > MAX_TABLES:
            raise InvalidArgument(f"more than {MAX_TABLES} tables")
        if specs:
            sparse_optimizer(self.optimizer)

    def declare(self, specs: list[TableSpec]) -> int:
        """Create the tables not held yet; returns how many were created."""
        self.check_declare(specs)
        created = 0
        for spec in specs:
            if spec.name in self.specs:
                continue
            init = Initializer(spec.initializer, spec.scale, spec.seed)
            cfg = RowStoreConfig(dim=spec.dim, initializer=init, admit_after=self.policy.admit_after,
                                 evict_idle=self.policy.evict_idle_steps, max_rows=self.policy.max_rows)
            self.stores[spec.name] = RowStore(cfg, sparse_optimizer(self.optimizer))
            self.specs[spec.name] = spec
            self.rows_served[spec.name] = self.rows_updated[spec.name] = 0
            created += 1
        return created

    def spec(self, table: str) -> TableSpec:
        spec = self.specs.get(table)
        if spec is None:
            raise NotFound(f"table {table!r} is not declared on shard {self.shard_id}")
        return spec

    def check_ids(self, table: str, ids: np.ndarray) -> None:
        """Every id must live here: a worker with another shard count would read rows nobody
        else updates."""
        if not len(ids):
            return
        owners = tables.shard_of(ids, self.num_shards)
        wrong = np.flatnonzero(owners != self.shard_id)
        if len(wrong):
            i = int(wrong[0])
            raise InvalidArgument(f"table {table!r}: id {int(ids[i])} belongs to shard {int(owners[i])} of "
                                  f"{self.num_shards}, not shard {self.shard_id} ({len(wrong)} such ids)")

    def first_foreign(self, asks: list[tuple[str, np.ndarray]]) -> int | None:
        """The index of the first (table, ids) of `asks` with an id that does not live here,
        None when all do: one hash over every ask's ids (none with one shard, which holds
        every id); check_ids names the id."""
        if self.num_shards == 1 or not asks:
            return None
        every = np.concatenate([ids for _, ids in asks]) if len(asks) > 1 else asks[0][1]
        wrong = np.flatnonzero(tables.shard_of(every, self.num_shards) != self.shard_id)
        if not len(wrong):
            return None
        ends = np.cumsum([len(ids) for _, ids in asks])
        return int(np.searchsorted(ends, wrong[0], side="right"))

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """A training pull's rows (created on first touch), float32 [len(ids), dim]."""
        self.spec(table)
        rows = self.stores[table].lookup(ids)
        self.rows_served[table] += len(rows)
        return rows

    def peek(self, table: str, ids: np.ndarray) -> np.ndarray:
        """An observer's read: stored rows, or the initial value, creating nothing."""
        self.spec(table)
        rows = self.stores[table].lookup(ids, create=False)
        self.rows_served[table] += len(rows)
        return rows

    def apply(self, table: str, grad: RowGrad) -> int:
        """One optimizer step of the table with a push's checked, summed gradients; returns
        the rows updated."""
        updated = self.stores[table].apply_unique(grad.ids, grad.grads)
        self.rows_updated[table] += updated
        return updated

    def tick(self, step: int) -> int:
        """The shard's step clock moved to `step`: rows are stamped with it from now on, and
        rows idle for `evict_idle_steps` are swept (every eighth of that, not every push: the
        sweep scans the table). Returns the rows evicted."""
        evicted = 0
        for store in self.stores.values():
            if step > store.clock:
                store.advance(step)
        idle = self.policy.evict_idle_steps
        if idle and step - self._swept_at >= max(1, idle // 8):
            self._swept_at = step
            evicted = sum(store.evict_idle() for store in self.stores.values())
        return evicted

    def snapshot(self) -> dict[str, tuple[dict, rowstore.Snapshot]]:
        """Copies of every table (under the shard's lock, with its dense keys: one moment)."""
        return {name: (self.specs[name].to_json(), store.snapshot()) for name, store in self.stores.items()}

    def restore(self, snaps: dict[str, tuple[dict, rowstore.Snapshot]]) -> None:
        """Tables from a checkpoint, into this empty set; FailedPrecondition naming the table
        when one does not fit (its spec, or its arrays against the spec and the optimizer)."""
        for name, (spec_json, snap) in snaps.items():
            try:
                spec = TableSpec.from_json(spec_json)
                if spec.name != name:
                    raise InvalidArgument(f"its spec names table {spec.name!r}")
                self.declare([spec])
                self.stores[name].restore(snap)
            except (InvalidArgument, FailedPrecondition) as exc:
                raise FailedPrecondition(f"checkpoint table {name!r}: {exc}") from None


def accumulate(pending: list[RowGrad] | None, grad: RowGrad) -> list[RowGrad]:
    """Sync: keep a step's row gradients until it completes (they are summed at the end,
    where a sum over the contributors' rows is one concatenation)."""
    return [grad] if pending is None else pending + [grad]


def average(pending: list[RowGrad], contributors: int) -> RowGrad:
    """The step's row gradient: each id's gradients summed over the contributors, divided by
    their number (as the dense keys' average, so a row one worker touched moves by 1/n of
    its gradient, the same scaling as a dense row of a dense gradient)."""
    ids = np.concatenate([g.ids for g in pending])
    grads = np.concatenate([g.grads for g in pending]) / np.float32(contributors)
    return RowGrad.of(ids, grads)
