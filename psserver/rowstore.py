"""The rows of one embedding table on one shard: 64-bit ids, created on first touch.

Numpy in, numpy out, no network and no locks (the shard that owns a store serializes calls).

Layout. An index maps each stored id to a slot; slabs hold the rows by slot: `values`
float32 [capacity, dim], one slab per optimizer state (psserver/sparse_optim.py) with the same
row layout, and per row its id (uint64), the clock of its last touch (float64) and its touch
count (int64). Capacity doubles when the slots run out, so memory follows the rows that exist,
not the id range; slots freed by eviction are reused before the slabs grow. Per row that is
dim * 4 * (1 + optimizer state columns) bytes, 25 bytes of bookkeeping and the index. Each slab
is an anonymous mapping of its own (`Slabs`), grown by mremap: no copy, so growth never holds
two slabs at once, and capacity not yet written is address space, not memory (peak RSS of a
server at 10M rows of dim 16 with adagrad: bench/emb_rss.py).

Ids are any 64-bit integers: int64 and uint64 arrays name the same id when their bits agree
(-1 is 2**64 - 1), every id is valid (0, 2**63 - 1, 2**63 included), and ids always come back
as uint64.

The index, chosen by measurement: `bench/rowstore.py --rounds 3` (section "index": a table
holding all N rows of one emb-loop field keyed by its scrambled 64-bit ids, lookups of each
step's unique ids, inserts of the N rows in batches of B; best of 3; 2-core AMD EPYC box,
numpy 2.4.6, pandas 3.1.1, 2026-12-07, one core pinned, measured while other work ran on the
machine, so read +-30% into any digit). M rows/s, lookup (insert):

    ==================================  ==================  ===================
    index                               small, N = 100k     large, N = 500k
    ==================================  ==================  ===================
    Python dict, one get per id          4.4  (4.3)          1.7  (2.2)
    sorted array + np.searchsorted,      5.6  (0.3)          4.3  (0.3)
      re-sorted on insert (emb_limit)
    SortedIndex: sorted + sorted delta   3.2  (2.2)          2.9  (2.5)
    numpy open addressing, vectorized    3.5  (2.9)         10.6  (5.9)
    pandas Int64HashTable (khash)       35.8 (10.1)         52.8 (10.2)
    ==================================  ==================  ===================

The dict pays an interpreter round trip per id, a binary search a cache miss per level, a
vectorized open-addressing table a numpy call per probe round. pandas' khash table does the
whole batch in one C loop, 5-10x faster than the next, so `index="auto"` uses it
(`pandas._libs.hashtable.Int64HashTable` on the ids' int64 view: `lookup`,
`map_keys_to_values`, `sizeof`). That is a private pandas API, so `SortedIndex` (pure numpy:
sorted keys plus a small sorted delta merged in when it passes 1/8 of them) is the fallback
when pandas is missing or its hashtable API moved, and the tests run both. khash offers no
delete here: an evicted id is mapped to -1 (a tombstone) and the table is rebuilt from the
live rows once tombstones outnumber them.

The whole store on the emb-loop step (section "store": per field `lookup(unique ids)` then
`apply(unique ids, rows * 1e-3)` with Adagrad, rows pulled + pushed per second of store time,
emb-loop's rows_per_s accounting; every row present beforehand, as in the peers' tables),
beside bench/peers/emb_limit.py run in the same invocation:

    ===========================  =====================  =====================
    M rows/s                     small (8 fields)       large (4 of 26)
    ===========================  =====================  =====================
    lookup / apply alone         4.5 / 3.1              5.6 / 3.4
    store, HashIndex             3.7 (1.11x id64)       4.2 (1.49x id64)
    store, SortedIndex           2.6 (0.67x id64)       2.0 (1.12x id64)
    emb_limit[id64] / [dense]    3.4 / 6.5              2.8 / 4.0
    ===========================  =====================  =====================

(emb_limit does the worker's np.unique too; the store's "step" figure, which adds it, is
2.7 and 2.9.) Rows created on first touch cost more on small (2.2) and nothing on large (4.2,
a compact table caches better).

Row initial values are a pure function of (seed, id, column): a counter-based generator
(splitmix64's mixer over the id and the column, Box-Muller for normal; pscommon/tables.py
`initial_values`, the one implementation, shared with the table spec), so a row's first value
does not depend on the order rows are created, on the shard that holds it or on eviction and
re-creation. numpy's Philox keyed by the id gives the same property but needs a generator per
row: 0.057 against 1.46 M rows/s at dim 16, 25x slower (bench/rowstore.py, "init").

Admission (`admit_after=N`): an id gets a stored row from the lookup that touches it the N-th
time. Until then a lookup returns the initializer's value (nothing stored) and a gradient for
it is dropped and counted. Touches (one per lookup call naming the id; applies do not count,
a pull precedes every push) of ids without a row are counted in a count-min sketch: depth 4,
`admission_width` counters per row, conservative update, fixed memory (16 bytes per counter
column). Between halvings it can only overcount (a collision admits an id early, never
late); every `admission_width` touches all counters are halved so it follows recent frequency:
a flood of one-off ids cannot saturate it, and an id whose touches are spread thinner than that
may need a few more. A capped dict would be exact until full and then arbitrary, at a dict operation
per id.

Eviction: `evict_idle(idle)` drops rows whose last touch (lookup or apply) is at least `idle`
clock units old; the clock is the owner's (`advance(now)`: a step count or seconds). With
`max_rows` a store that would grow past the cap first evicts the least recently touched rows
not named by the current call (a `lru_slack` fraction of the cap extra, so the O(rows) scan
is paid once per that many new rows). Both are counted.
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import numbers

import numpy as np

from shardps.pscommon.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from shardps.pscommon.tables import initial_values, is_sorted_unique, mix64, sum_duplicates
from shardps.psserver import sparse_optim

U64 = np.uint64
MAX_DIM = 1 << 16
SNAPSHOT_FORMAT = "shardps.rowstore/1"


# ---------------------------------------------------------------- ids and counter-based hashing

def _key(seed: int, salt: int) -> np.uint64:
    return mix64(np.array([seed ^ salt], U64))[0]


def as_ids(ids, what: str = "ids") -> np.ndarray:
    """A 1-D uint64 array of ids from any integer array-like; int64 bits are kept (-1 is 2**64-1)."""
    if type(ids) is np.ndarray and ids.dtype == U64 and ids.ndim == 1 and ids.flags.c_contiguous:
        return ids   # a request's ids as tables.ids_from_bytes makes them: nothing to convert
    if isinstance(ids, (list, tuple)):
        ids = _python_ids(ids, what)
    a = np.asarray(ids)
    if a.size == 0 and a.ndim == 1:
        return np.empty(0, U64)
    if a.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must be integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise InvalidArgument(f"{what} must be one-dimensional, got shape {a.shape}")
    if a.dtype.itemsize != 8:
        a = a.astype(np.int64)
    return np.ascontiguousarray(a).view(U64)


def _python_ids(ids, what):
    """A list of Python ints: np.asarray would make [3, 2**64 - 1] float64 and lose bits."""
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        return ids  # let the dtype check name what it is
    if any(not -2 ** 63 <= i < 2 ** 64 for i in ids):
        raise InvalidArgument(f"{what} must fit in 64 bits (-2**63 to 2**64 - 1)")
    return np.array([i % 2 ** 64 for i in ids], U64)


def as_grads(grads, n: int, dim: int) -> np.ndarray:
    g = np.asarray(grads)
    if g.dtype.kind != "f":
        raise InvalidArgument(f"grads must be floating point, got dtype {g.dtype}")
    if g.ndim != 2 or g.shape[1] != dim:
        raise InvalidArgument(f"grads must have shape (n, {dim}), got {g.shape}")
    if g.shape[0] != n:
        raise InvalidArgument(f"grads has {g.shape[0]} rows for {n} ids")
    g = np.ascontiguousarray(g, np.float32)
    if not np.isfinite(g).all():
        bad = int(np.flatnonzero(~np.isfinite(g).all(axis=1))[0])
        raise InvalidArgument(f"grads contain NaN or infinity (row {bad})")
    return g


def _int(owner: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(f"{owner} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidArgument(f"{owner} must be {bound}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- initializer

@dataclasses.dataclass(frozen=True)
class Initializer:
    """A row's first value, a pure function of (seed, id, column).

    kind "zeros"; "constant" (every element `scale`); "normal" (mean 0, std `scale`);
    "uniform" (U(-scale, scale), torch's nn.init.uniform_(-a, a) with a = scale)."""

    kind: str = "zeros"
    scale: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ("zeros", "constant", "normal", "uniform"):
            raise InvalidArgument(f"initializer kind must be zeros, constant, normal or uniform, got {self.kind!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale):
            raise InvalidArgument(f"initializer scale must be a finite number, got {self.scale!r}")
        if self.kind in ("normal", "uniform") and self.scale < 0:
            raise InvalidArgument(f"initializer {self.kind} scale must be >= 0, got {self.scale!r}")
        _int("initializer seed", self.seed, 0, 2 ** 64 - 1)

    @classmethod
    def normal(cls, std: float, seed: int = 0) -> "Initializer":
        return cls("normal", std, seed)

    @classmethod
    def uniform(cls, a: float, seed: int = 0) -> "Initializer":
        return cls("uniform", a, seed)

    @classmethod
    def constant(cls, value: float) -> "Initializer":
        return cls("constant", value)

    def rows(self, ids: np.ndarray, dim: int) -> np.ndarray:
        """float32 [len(ids), dim] initial values of rows `ids` (uint64)."""
        if self.kind in ("zeros", "constant"):
            return np.full((len(ids), dim), self.scale, np.float32)
        return initial_values(self.kind, self.scale, self.seed, ids, dim)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- indexes: id -> slot

class HashIndex:
    """pandas' khash Int64HashTable over the ids' int64 view; -1 marks an evicted id."""

    def __init__(self, size_hint: int = 0):
        from pandas._libs import hashtable  # imported here: servers without tables skip pandas

        self._table = hashtable.Int64HashTable(max(size_hint, 16))
        self._vector = getattr(hashtable, "Int64Vector", None)
        # whether get_or_add is offered: private pandas API too, so checked, not assumed
        self.adds = self._vector is not None and hasattr(self._table, "get_labels")
        self.tombstones = 0

    def get(self, ids: np.ndarray) -> np.ndarray:
        return self._table.lookup(ids.view(np.int64))

    def get_or_add(self, ids: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
        """(the slot of each id, the ids that had none, in order of first appearance): those
        are given slots first, first + 1, ..., in that order. One pass over the ids, which a
        get, then a put of the missing, then their dedupe would take three. An evicted id
        (a tombstone, -1) would read as present: only for an index without tombstones."""
        new = self._vector()
        slots = self._table.get_labels(ids.view(np.int64), new, count_prior=first)
        return slots, new.to_array().view(U64)

    def put(self, ids: np.ndarray, slots: np.ndarray) -> None:
        self._table.map_keys_to_values(ids.view(np.int64), slots.astype(np.int64, copy=False))

    def remove(self, ids: np.ndarray) -> None:
        self._table.map_keys_to_values(ids.view(np.int64), np.full(len(ids), -1, np.int64))
        self.tombstones += len(ids)

    def nbytes(self) -> int:
        return int(self._table.sizeof())


class SortedIndex:
    """Sorted keys + np.searchsorted, pure numpy: a large sorted main array and a small sorted
    delta that new ids go to, merged into main when it passes 1/8 of it (so a put costs
    O(delta), amortized O(1) merges per row). Removal marks the slot -1 until the next merge."""

    def __init__(self, size_hint: int = 0):
        self._keys, self._slots = np.empty(0, U64), np.empty(0, np.int64)
        self._dkeys, self._dslots = np.empty(0, U64), np.empty(0, np.int64)
        self.tombstones = 0

    @staticmethod
    def _find(keys, ids):
        pos = np.searchsorted(keys, ids)
        pos[pos == len(keys)] = 0
        hit = keys[pos] == ids if len(keys) else np.zeros(len(ids), bool)
        return pos, hit

    def get(self, ids):
        out = np.full(len(ids), -1, np.int64)
        for keys, slots in ((self._keys, self._slots), (self._dkeys, self._dslots)):
            if len(keys):
                pos, hit = self._find(keys, ids)
                out[hit] = slots[pos[hit]]
        return out

    def put(self, ids, slots):
        slots = slots.astype(np.int64, copy=False)
        rest = np.ones(len(ids), bool)
        for keys, table in ((self._keys, self._slots), (self._dkeys, self._dslots)):
            if len(keys):  # a key evicted earlier is still present, marked -1: reuse its entry
                pos, hit = self._find(keys, ids)
                table[pos[hit]] = slots[hit]
                rest &= ~hit
        self._dkeys, self._dslots = self._merge(self._dkeys, self._dslots, ids[rest], slots[rest])
        if len(self._dkeys) > max(1024, len(self._keys) >> 3):
            self._keys, self._slots = self._merge(self._keys, self._slots, self._dkeys, self._dslots)
            self._dkeys, self._dslots = np.empty(0, U64), np.empty(0, np.int64)

    def _merge(self, keys, slots, new_keys, new_slots):
        live = slots >= 0
        keys = np.concatenate([keys[live], new_keys])
        slots = np.concatenate([slots[live], new_slots])
        order = np.argsort(keys, kind="stable")
        self.tombstones -= int((~live).sum())
        return keys[order], slots[order]

    def remove(self, ids):
        for keys, slots in ((self._keys, self._slots), (self._dkeys, self._dslots)):
            if len(keys):
                pos, hit = self._find(keys, ids)
                slots[pos[hit]] = -1
        self.tombstones += len(ids)

    def nbytes(self):
        return sum(a.nbytes for a in (self._keys, self._slots, self._dkeys, self._dslots))


def hash_index_available() -> bool:
    try:
        from pandas._libs.hashtable import Int64HashTable
    except ImportError:
        return False
    return all(hasattr(Int64HashTable, m) for m in ("lookup", "map_keys_to_values", "sizeof"))


def _adds(index) -> bool:
    return isinstance(index, HashIndex) and index.adds


def make_index(kind: str, size_hint: int = 0):
    if kind == "auto":
        kind = "hash" if hash_index_available() else "sorted"
    if kind == "hash":
        return HashIndex(size_hint)
    if kind == "sorted":
        return SortedIndex(size_hint)
    raise InvalidArgument(f"index must be auto, hash or sorted, got {kind!r}")


# ---------------------------------------------------------------- admission

class AdmissionSketch:
    """Count-min sketch (depth 4, conservative update) of touches of ids that have no row,
    halved every `width` touches (see the module docstring)."""

    DEPTH = 4

    def __init__(self, width: int):
        self.width = width
        self.table = np.zeros((self.DEPTH, width), np.int32)
        self.since_decay = 0
        self._keys = [_key(r, 0x5EED) for r in range(self.DEPTH)]

    def _cells(self, ids):
        return [(mix64(ids ^ k) & U64(self.width - 1)).astype(np.intp) for k in self._keys]

    def estimate(self, ids: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """(the cells of `ids`, their estimated touch counts), changing nothing."""
        cells = self._cells(ids)
        return cells, np.min([self.table[r, c] for r, c in enumerate(cells)], axis=0)

    def record(self, cells: list[np.ndarray], counts: np.ndarray) -> None:
        """Count one more touch of the (unique) ids `estimate` gave `cells` and `counts` for."""
        new = np.minimum(counts.astype(np.int64) + 1, np.iinfo(np.int32).max).astype(np.int32)
        for r, c in enumerate(cells):
            np.maximum.at(self.table[r], c, new)  # conservative update: only cells below the new count
        self.since_decay += len(counts)
        if self.since_decay >= self.width:
            self.table >>= 1
            self.since_decay = 0


# ---------------------------------------------------------------- slabs: growable per-slot arrays

def _mapping(nbytes: int) -> mmap.mmap:
    # private: a shared anonymous mapping cannot grow past its first size (SIGBUS on the new pages)
    try:
        return mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        raise ResourceExhausted(f"cannot map {nbytes} bytes for a table's rows: {e}") from None


class Slabs:
    """A store's per-slot arrays, each on an anonymous mapping of its own.

    Why not numpy arrays grown by copying: a copy holds the old and the new array at once (the
    slabs' peak RSS was 2x their rows at each doubling, bench/emb_rss.py), and psctl raises
    malloc's mmap threshold to 1 GiB (pscommon/lifecycle.py), so a freed slab below it stays
    in the heap. Growing a mapping is mremap: the pages move, nothing is copied, and the pages
    past the rows written so far are never touched, so they cost address space, not memory
    (capacity doubles, RSS follows the rows). Where a mapping cannot be resized in place
    (someone still views it, or no mremap), the slab is copied to a new mapping, as before."""

    def __init__(self):
        self._maps: dict[str, mmap.mmap] = {}

    def new(self, name: str, n: int, row: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A zeroed array of n rows of shape `row`."""
        self._maps[name] = _mapping(n * _row_bytes(row, dtype))
        return self.view(name, n, row, dtype)

    def view(self, name: str, n: int, row: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(self._maps[name], dtype, n * math.prod(row)).reshape((n, *row))

    def grow(self, name: str, n: int, new: int, row: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Slab `name` (n rows) with `new` rows, the first n kept and the rest zero; the caller
        holds no view of it."""
        nbytes = new * _row_bytes(row, dtype)
        old = self._maps[name]
        try:
            old.resize(nbytes)
        except (BufferError, OSError, SystemError, ValueError):  # viewed elsewhere, or no mremap here
            self._maps[name] = _mapping(nbytes)
            np.frombuffer(self._maps[name], np.uint8, n * _row_bytes(row, dtype))[:] = \
                np.frombuffer(old, np.uint8, n * _row_bytes(row, dtype))
        return self.view(name, new, row, dtype)


def _row_bytes(row: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(row) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------- the store

@dataclasses.dataclass(frozen=True)
class RowStoreConfig:
    """One table's row store. `evict_idle` is the default age for `evict_idle()`, in the
    owner's clock units; `max_rows` caps the rows (least recently used evicted first)."""

    dim: int
    initializer: Initializer = Initializer()
    admit_after: int = 1
    evict_idle: float | None = None
    max_rows: int | None = None
    lru_slack: float = 0.01
    admission_width: int = 1 << 18
    initial_capacity: int = 1024
    index: str = "auto"

    def __post_init__(self):
        _int("dim", self.dim, 1, MAX_DIM)
        if not isinstance(self.initializer, Initializer):
            raise InvalidArgument(f"initializer must be an Initializer, got {self.initializer!r}")
        _int("admit_after", self.admit_after, 1)
        if self.evict_idle is not None and (isinstance(self.evict_idle, bool) or not isinstance(
                self.evict_idle, numbers.Real) or not self.evict_idle > 0):
            raise InvalidArgument(f"evict_idle must be a number > 0 or None, got {self.evict_idle!r}")
        if self.max_rows is not None:
            _int("max_rows", self.max_rows, 1)
        if isinstance(self.lru_slack, bool) or not isinstance(self.lru_slack, numbers.Real) \
                or not 0 <= self.lru_slack < 1:
            raise InvalidArgument(f"lru_slack must be in [0, 1), got {self.lru_slack!r}")
        width = _int("admission_width", self.admission_width, 16, 1 << 30)
        if width & (width - 1):
            raise InvalidArgument(f"admission_width must be a power of two, got {width}")
        _int("initial_capacity", self.initial_capacity, 1, 1 << 40)
        if self.index not in ("auto", "hash", "sorted"):
            raise InvalidArgument(f"index must be auto, hash or sorted, got {self.index!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["initializer"] = self.initializer.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RowStoreConfig":
        if not isinstance(d, dict):
            raise InvalidArgument(f"row store config must be a dict, got {type(d).__name__}")
        d = dict(d)
        init = d.pop("initializer", {})
        if not isinstance(init, dict):
            raise InvalidArgument(f"initializer must be a dict, got {type(init).__name__}")
        try:
            return cls(initializer=Initializer(**init), **d)
        except TypeError as e:
            raise InvalidArgument(f"row store config: {e}") from None


@dataclasses.dataclass(frozen=True)
class RowStoreStats:
    rows: int
    capacity: int
    bytes: int  # held: slabs at capacity, index, admission sketch
    admitted: int  # rows created (first touch, or N-th with admission)
    evicted_idle: int
    evicted_lru: int
    dropped_gradients: int  # gradient rows dropped: their id had no row and was not admitted
    unadmitted_lookups: int  # lookups answered with the initializer's value, nothing stored
    step: int
    clock: float


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Plain arrays (safetensors-ready: ids uint64, values and state float32/int64, touch
    bookkeeping, the admission sketch) and JSON-ready metadata."""

    arrays: dict[str, np.ndarray]
    meta: dict


_RECENT = 16  # lookups remembered per store: a few steps of a few workers

_COUNTERS = ("admitted", "evicted_idle", "evicted_lru", "dropped_gradients", "unadmitted_lookups")


class RowStore:
    """Rows of one table on one shard. Not thread-safe: the owner serializes calls."""

    def __init__(self, config: RowStoreConfig, optimizer: sparse_optim.SparseOptimizer):
        if not isinstance(optimizer, sparse_optim.SparseOptimizer):
            raise InvalidArgument(f"optimizer must be a SparseOptimizer, got {optimizer!r}")
        self.config, self.optimizer = config, optimizer
        self.dim = config.dim
        self._spec = optimizer.state_spec(config.dim)
        self._index = make_index(config.index)
        self._sketch = AdmissionSketch(config.admission_width) if config.admit_after > 1 else None
        self._step, self._clock = 0, 0.0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._allocate(config.initial_capacity)

    # ---- slabs and slots

    def _allocate(self, capacity: int) -> None:
        # recent lookups whose ids all have rows: ids' bytes -> (their slots, the clock they
        # were stamped at), so the push that follows a pull of the same ids skips the index
        # and, at the same clock, the stamp (a row's slot changes only when rows are evicted
        # or the store is restored, which clear it; a stamp only ever writes the clock)
        self._recent: dict[bytes, tuple[np.ndarray, float]] = {}
        self._slabs = Slabs()
        self._set_slabs({name: self._slabs.new(name, capacity, row, dtype)
                         for name, (row, dtype) in self._slab_layout().items()})
        self._high = 0  # slots [0, high) have been used
        self._free = np.empty(0, np.int64)  # freed slots below high, reused first
        self._rows = 0

    def _slab_layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each per-slot array's row shape and dtype, by slab name."""
        layout = {"values": ((self.dim,), np.dtype(np.float32)), "ids": ((), np.dtype(U64)),
                  "last": ((), np.dtype(np.float64)), "touches": ((), np.dtype(np.int64)),
                  "live": ((), np.dtype(bool))}
        layout.update({f"state.{s.name}": ((s.width,), np.dtype(s.dtype)) for s in self._spec})
        return layout

    def _set_slabs(self, arrays: dict[str, np.ndarray]) -> None:
        self._values, self._ids, self._last = arrays["values"], arrays["ids"], arrays["last"]
        self._touches, self._live = arrays["touches"], arrays["live"]
        self._state = {s.name: arrays[f"state.{s.name}"] for s in self._spec}

    def _grow(self, need: int) -> None:
        capacity = len(self._ids)
        if need <= capacity:
            return
        new = max(need, 2 * capacity)
        # this store's own arrays go first: a mapping is resized in place only while nothing views it
        self._values = self._ids = self._last = self._touches = self._live = None
        self._state = {}
        layout = self._slab_layout()
        grown = {}
        try:
            for name, (row, dtype) in layout.items():
                grown[name] = self._slabs.grow(name, capacity, new, row, dtype)
        finally:
            if len(grown) < len(layout):   # refused part way: every slab back at the old capacity
                grown = {name: self._slabs.view(name, capacity, row, dtype) for name, (row, dtype) in layout.items()}
            self._set_slabs(grown)

    def _take_slots(self, k: int) -> np.ndarray:
        if not len(self._free):   # nothing evicted to reuse: the next k slots
            self._grow(self._high + k)
            self._high += k
            return np.arange(self._high - k, self._high, dtype=np.int64)
        reused = self._free[-k:] if k else self._free[:0]
        fresh = k - len(reused)
        self._grow(self._high + fresh)   # first: a growth refused (ResourceExhausted) leaves the free slots as they were
        self._free = self._free[:len(self._free) - len(reused)]
        slots = np.concatenate([reused, np.arange(self._high, self._high + fresh, dtype=np.int64)])
        self._high += fresh
        return slots

    def _insert(self, ids: np.ndarray) -> np.ndarray:
        fresh = not len(self._free)   # no evicted slot to reuse: the new rows are slots [high, high + k)
        slots = self._take_slots(len(ids))
        at = slice(int(slots[0]), int(slots[0]) + len(slots)) if fresh and len(slots) else slots
        self._init_rows(ids, slots, at, fresh)
        self._index.put(ids, slots)
        return slots

    def _init_rows(self, ids: np.ndarray, slots, at, fresh: bool) -> None:
        """The new rows of `ids` at `slots` (`at`: the same as a slice when they are fresh)."""
        # slots never used (fresh) are zero in every slab (new or grown mappings are zero
        # pages, and nothing writes past high), so zero writes to them are skipped
        init = self.config.initializer
        if init.kind in ("zeros", "constant") and fresh:
            if init.scale:
                self._values[at] = init.scale   # the initializer's value, without the rows
        elif fresh:
            self._values[at] = init.rows(ids, self.dim)
        else:
            sparse_optim.put_rows(self._values, slots, init.rows(ids, self.dim))
        for spec in self._spec:
            if spec.fill or not fresh:
                self._state[spec.name][at] = spec.fill
        self._ids[at] = ids   # no clock: every caller of _resolve stamps the rows it resolved
        if not fresh:
            self._touches[at] = 0
        self._live[at] = True
        self._rows += len(ids)
        self._counts["admitted"] += len(ids)

    def _evict(self, slots: np.ndarray, reason: str) -> None:
        self._recent.clear()
        self._index.remove(self._ids[slots])
        self._live[slots] = False
        self._free = np.concatenate([self._free, slots])
        self._rows -= len(slots)
        self._counts[reason] += len(slots)
        if self._index.tombstones > max(self._rows, 1 << 16):
            self._rebuild_index()

    def _rebuild_index(self) -> None:
        live = np.flatnonzero(self._live[:self._high])
        self._index = make_index(self.config.index, len(live))
        self._index.put(self._ids[live], live)

    # ---- creation, admission, LRU cap

    def _resolve(self, ids: np.ndarray, touch: bool) -> tuple[np.ndarray, bool]:
        """(slots of `ids`, whether all have one), creating the rows of missing ids that are
        admitted; -1 for the rest."""
        if self._sketch is None and self.config.max_rows is None and self._fresh_only():
            return self._resolve_fresh(ids), True
        slots = self._index.get(ids)
        missing = slots < 0
        if not missing.any():
            return slots, True
        new_ids, inverse = ids[missing], None
        if not is_sorted_unique(new_ids):  # sorted unique already (a worker's ids): np.unique's answer
            new_ids, inverse = np.unique(new_ids, return_inverse=True)
        if self._sketch is None:   # no admission: every new id gets its row now
            if self.config.max_rows is not None:
                self._make_room(len(new_ids), slots[~missing])
            new_slots = self._insert(new_ids)
            slots[missing] = new_slots if inverse is None else new_slots[inverse]
            return slots, True
        admit, touched = self._admit(new_ids, touch)
        everyone = bool(admit.all())
        if everyone or admit.any():
            self._make_room(len(new_ids) if everyone else int(admit.sum()), slots[~missing])
        touched()  # after the last check that may refuse the call: a refused call counts nothing
        if everyone:
            new_slots = self._insert(new_ids)
        else:
            new_slots = np.full(len(new_ids), -1, np.int64)
            new_slots[admit] = self._insert(new_ids[admit])
        slots[missing] = new_slots if inverse is None else new_slots[inverse]
        return slots, everyone

    def _fresh_only(self) -> bool:
        """Whether every new row goes to a fresh slot and the index can say which ids are new
        as it adds them: nothing was evicted (no free slot, no tombstone), a hash index."""
        return not len(self._free) and not self._index.tombstones and _adds(self._index)

    def _resolve_fresh(self, ids: np.ndarray) -> np.ndarray:
        """_resolve without admission or a cap, in one pass of the index: the missing ids get
        slots [high, high + k) as the index adds them. Room for every id is made first (a
        refused growth then leaves the index as it was), so the slabs may double one call
        before their slots run out: address space, not memory, until rows are written."""
        self._grow(self._high + len(ids))
        slots, new_ids = self._index.get_or_add(ids, self._high)
        if len(new_ids):
            start, self._high = self._high, self._high + len(new_ids)
            self._init_rows(new_ids, None, slice(start, self._high), fresh=True)
        return slots

    def _admit(self, new_ids: np.ndarray, touch: bool):
        """(which of `new_ids` get a row now, a callable that records this call's touches)."""
        if self._sketch is None:
            return np.ones(len(new_ids), bool), _nothing
        cells, counts = self._sketch.estimate(new_ids)
        if not touch:
            return counts >= self.config.admit_after, _nothing
        return counts + 1 >= self.config.admit_after, lambda: self._sketch.record(cells, counts)

    def _make_room(self, k: int, keep: np.ndarray) -> None:
        cap = self.config.max_rows
        if cap is None or self._rows + k <= cap:
            return
        keep = np.unique(keep)
        if len(keep) + k > cap:
            raise ResourceExhausted(f"one call names {len(keep) + k} rows, above the table's max_rows {cap}")
        need = min(self._rows + k - cap + int(cap * self.config.lru_slack), self._rows - len(keep))
        saved = self._last[keep]
        self._last[keep] = np.inf  # the rows this call reads are the most recent of all
        live = np.flatnonzero(self._live[:self._high])
        oldest = live[np.argpartition(self._last[live], need - 1)[:need]] if need < len(live) else live
        self._last[keep] = saved
        self._evict(oldest, "evicted_lru")

    # ---- the API

    def lookup(self, ids, create: bool = True) -> np.ndarray:
        """float32 [len(ids), dim]: the rows of `ids`. With `create` (a training pull) missing
        rows are created (or, under admission, counted and answered with the initializer's
        value) and the touched rows stamped; without it nothing changes and missing ids read
        as the initializer's value."""
        ids = as_ids(ids)
        if create:
            slots, complete = self._resolve(ids, touch=True)
        else:
            slots = self._index.get(ids)
            complete = bool((slots >= 0).all())
        if complete:
            if create:
                self._stamp(slots)
                self._remember(ids, slots)
            return self._values.take(slots, axis=0)
        found = slots >= 0
        if create:
            self._stamp(slots[found])
        out = np.take(self._values, np.where(found, slots, 0), axis=0)
        out[~found] = self.config.initializer.rows(ids[~found], self.dim)
        if create:
            self._counts["unadmitted_lookups"] += int((~found).sum())
        return out

    def _remember(self, ids: np.ndarray, slots: np.ndarray) -> None:
        if len(self._recent) >= _RECENT:
            del self._recent[next(iter(self._recent))]   # the oldest
        self._recent[ids.tobytes()] = (slots, self._clock)

    def _stamp(self, slots):
        self._last[slots] = self._clock
        self._touches[slots] += 1  # fancy-index +=: an id named twice in one call counts once

    def apply(self, ids, grads) -> int:
        """Sum the gradients of duplicate ids, then update exactly the named rows with the
        optimizer. Missing rows are created when admitted (always, without admission); the
        gradients of the others are dropped and counted. Every call counts as one optimizer
        step, even an empty one (torch counts a step whose sparse gradient names no row).
        Returns the number of rows updated."""
        ids = as_ids(ids)
        grads = as_grads(grads, len(ids), self.dim)
        ids, grads = sum_duplicates(ids, grads)
        return self.apply_unique(ids, grads)

    def apply_unique(self, ids: np.ndarray, grads: np.ndarray) -> int:
        """`apply` for gradients already checked and summed: `ids` unique uint64, `grads`
        finite float32 [len(ids), dim] (a push's RowGrad: the servicer checked and summed
        them, so the store does not do it again)."""
        recent = self._recent.get(ids.tobytes()) if len(ids) else None
        if recent is not None:
            slots, stamped = recent[0], recent[1] == self._clock
        else:
            slots, complete = self._resolve(ids, touch=False)  # may refuse the call (max_rows)
            stamped = False
            if not complete:
                kept = slots >= 0
                self._counts["dropped_gradients"] += int((~kept).sum())
                slots, grads = slots[kept], grads[kept]
        self._step += 1
        if len(slots):
            self.optimizer.apply(self._values, self._state, slots, grads, self._step)
            if not stamped:
                self._last[slots] = self._clock
        return len(slots)

    @property
    def clock(self) -> float:
        return self._clock

    def advance(self, now: float | None = None) -> None:
        """Move the clock to `now` (steps or seconds, never backwards), or by 1."""
        now = self._clock + 1 if now is None else now
        if isinstance(now, bool) or not isinstance(now, numbers.Real) or not math.isfinite(now):
            raise InvalidArgument(f"clock must be a finite number, got {now!r}")
        if now < self._clock:
            raise InvalidArgument(f"clock cannot go back: {now!r} < {self._clock!r}")
        self._clock = float(now)

    def evict_idle(self, idle: float | None = None) -> int:
        """Drop rows whose last touch is at least `idle` clock units old (default: the config's
        evict_idle); returns how many."""
        idle = self.config.evict_idle if idle is None else idle
        if idle is None:
            return 0
        if isinstance(idle, bool) or not isinstance(idle, numbers.Real) or not idle > 0:
            raise InvalidArgument(f"idle must be a number > 0, got {idle!r}")
        live = np.flatnonzero(self._live[:self._high])
        old = live[self._clock - self._last[live] >= idle]
        if len(old):
            self._evict(old, "evicted_idle")
        return len(old)

    def contains(self, ids) -> np.ndarray:
        return self._index.get(as_ids(ids)) >= 0

    def __len__(self) -> int:
        return self._rows

    def hottest(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids uint64, touch counts) of the k most looked-up stored rows, most first."""
        _int("k", k, 0)
        live = np.flatnonzero(self._live[:self._high])
        if k < len(live):
            live = live[np.argpartition(-self._touches[live], k - 1)[:k]] if k else live[:0]
        order = np.argsort(-self._touches[live], kind="stable")
        return self._ids[live[order]], self._touches[live[order]]

    def stats(self) -> RowStoreStats:
        slabs = [self._values, self._ids, self._last, self._touches, self._live, *self._state.values()]
        held = sum(a.nbytes for a in slabs) + self._index.nbytes() + self._free.nbytes
        held += self._sketch.table.nbytes if self._sketch else 0
        return RowStoreStats(rows=self._rows, capacity=len(self._ids), bytes=held, step=self._step,
                             clock=self._clock, **self._counts)

    # ---- snapshots

    def snapshot(self) -> Snapshot:
        if self._rows == self._high:   # nothing evicted: copies of slices, no index array of every slot
            def take(a):
                return a[:self._high].copy()
        else:
            live = np.flatnonzero(self._live[:self._high])

            def take(a):
                return a[live]   # a copy already
        arrays = {"ids": take(self._ids), "values": take(self._values),
                  "last_touch": take(self._last), "touches": take(self._touches)}
        arrays.update({f"state.{k}": take(v) for k, v in self._state.items()})
        if self._sketch is not None:
            arrays["admission.sketch"] = self._sketch.table.copy()
        meta = {"format": SNAPSHOT_FORMAT, "config": self.config.to_dict(),
                "optimizer": self.optimizer.cfg.to_dict(), "step": self._step, "clock": self._clock,
                "counters": dict(self._counts),
                "admission_since_decay": self._sketch.since_decay if self._sketch else 0}
        return Snapshot(arrays, meta)

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> "RowStore":
        meta = _meta(snap)
        store = cls(RowStoreConfig.from_dict(meta["config"]), sparse_optim.from_dict(meta["optimizer"]))
        store.restore(snap)
        return store

    def restore(self, snap: Snapshot) -> None:
        """Replace this store's rows and counters with a snapshot of a store configured alike
        (FailedPrecondition otherwise); malformed arrays are refused before anything changes."""
        meta = _meta(snap)
        self._check_same_table(meta)
        arrays = self._checked_arrays(snap.arrays)
        n = len(arrays["ids"])
        self._index = make_index(self.config.index, n)
        self._allocate(max(n, self.config.initial_capacity))
        slots = self._take_slots(n)
        self._values[slots] = arrays["values"]
        for spec in self._spec:
            self._state[spec.name][slots] = arrays[f"state.{spec.name}"]
        self._ids[slots], self._last[slots], self._touches[slots] = arrays["ids"], arrays["last_touch"], arrays["touches"]
        self._live[slots] = True
        self._index.put(arrays["ids"], slots)
        self._rows = n
        if "admission.sketch" in arrays:
            self._sketch.table[...] = arrays["admission.sketch"]
            self._sketch.since_decay = int(meta.get("admission_since_decay", 0))
        self._step, self._clock = int(meta["step"]), float(meta["clock"])
        self._counts = {k: int(meta["counters"].get(k, 0)) for k in _COUNTERS}

    def _check_same_table(self, meta: dict) -> None:
        """dim, initializer and optimizer define the rows; the rest (cap, admission, eviction,
        index) may change between a snapshot and its restore."""
        mine = self.config.to_dict()
        theirs = meta["config"]
        for field in ("dim", "initializer"):
            if theirs.get(field) != mine[field]:
                raise FailedPrecondition(f"snapshot of another table: {field} {theirs.get(field)!r}, "
                                         f"this store has {mine[field]!r}")
        if meta["optimizer"] != self.optimizer.cfg.to_dict():
            raise FailedPrecondition(f"snapshot of another table: optimizer {meta['optimizer']!r}, "
                                     f"this store has {self.optimizer.cfg.to_dict()!r}")

    def _checked_arrays(self, arrays: dict) -> dict:
        expected = {"ids": (U64, ()), "values": (np.float32, (self.dim,)), "last_touch": (np.float64, ()),
                    "touches": (np.int64, ())}
        expected.update({f"state.{s.name}": (np.dtype(s.dtype), (s.width,)) for s in self._spec})
        arrays = dict(arrays)
        sketch = arrays.pop("admission.sketch", None)
        if self._sketch is not None and sketch is not None:  # admission turned on or off since: start afresh
            arrays["admission.sketch"] = sketch
            expected["admission.sketch"] = (np.int32, None)
        unknown = sorted(set(arrays) - set(expected))
        if unknown:
            raise InvalidArgument(f"snapshot has unexpected arrays {unknown}")
        out = {}
        for name, (dtype, row_shape) in expected.items():
            out[name] = _checked_array(arrays, name, dtype, row_shape)
        n = len(out["ids"])
        for name, a in out.items():
            if name != "admission.sketch" and len(a) != n:
                raise InvalidArgument(f"snapshot array {name} has {len(a)} rows, ids has {n}")
        if len(np.unique(out["ids"])) != n:
            raise InvalidArgument("snapshot ids are not unique")
        if "admission.sketch" in out and out["admission.sketch"].shape != self._sketch.table.shape:
            raise InvalidArgument(f"snapshot admission.sketch has shape {out['admission.sketch'].shape}, "
                                  f"expected {self._sketch.table.shape}")
        return out


def _checked_array(arrays, name, dtype, row_shape):
    if name not in arrays:
        raise InvalidArgument(f"snapshot lacks array {name}")
    a = np.asarray(arrays[name])
    if a.dtype != dtype:
        raise InvalidArgument(f"snapshot array {name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if row_shape is not None and a.shape[1:] != row_shape:
        raise InvalidArgument(f"snapshot array {name} has shape {a.shape}, expected (n, {', '.join(map(str, row_shape))})")
    return a


def _meta(snap) -> dict:
    meta = getattr(snap, "meta", None)
    if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
        raise InvalidArgument(f"not a row store snapshot (format {SNAPSHOT_FORMAT!r} expected)")
    missing = [k for k in ("config", "optimizer", "step", "clock", "counters") if k not in meta]
    if missing:
        raise InvalidArgument(f"row store snapshot metadata lacks {', '.join(missing)}")
    for k in ("config", "optimizer", "counters"):
        if not isinstance(meta[k], dict):
            raise InvalidArgument(f"row store snapshot metadata {k} must be a dict, got {type(meta[k]).__name__}")
    return meta


def _nothing():
    pass
