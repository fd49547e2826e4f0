"""A step's embedding rows, as the shards see them: which unique ids each shard is asked for,
how the answers go back into the asked order, and each shard's part of the push.

Pure numpy over ids (int64 or uint64: the same 64-bit ids), no network. A batch names an id
as often as its samples do; a pull asks each shard once per unique id it holds
(`pscommon.tables.shard_of`), and a push sends each unique id's summed gradient, so the
bytes on the wire follow the unique ids of the batch, not its length.

The work is done once per step for every table together, not table by table: a `RowPlan`
holds each table's unique ids (np.unique only when the asked ids are not already unique),
hashes the ids of every table to their shards in one `shard_of` call and groups them by
(shard, table) with one stable argsort, so a shard's request is slices of one array. The
push of the same step hands in the same ids with their gradients; `RowPlan.split` finds
them in the plan and reuses its grouping (no second dedup, no second hash), and
`split_grads` does the general case (a gradient for ids the plan does not know).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from shardps.pscommon import tables
from shardps.pscommon.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class RowPart:
    """One table's ids on one shard: `ids` (uint64) and their wire bytes, and where they are
    among the table's unique ids (`positions`; None when they are all of them, in order)."""

    table: str
    ids: np.ndarray
    ids_bytes: bytes
    positions: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """One step's ids of every table, deduplicated and placed on their shards once."""

    num_shards: int
    unique: dict[str, np.ndarray]           # table -> its unique ids (uint64)
    inverse: dict[str, np.ndarray | None]   # asked id i is unique[inverse[i]]; None: asked == unique
    parts: dict[int, list[RowPart]]         # shard -> its non-empty parts, tables in asked order

    def shards(self) -> list[int]:
        """The shards holding any of the ids."""
        return [s for s, parts in self.parts.items() if parts]

    def assemble(self, answers: dict[int, list[np.ndarray]], dims: dict[str, int]) -> dict[str, np.ndarray]:
        """Each table's rows in the asked order (a repeated id's row repeated), float32
        [len(asked), dim], fresh arrays, from each shard's rows of its parts (in order)."""
        out = {}
        for table, unique in self.unique.items():
            out[table] = np.empty((len(unique), dims[table]), np.float32)
        for shard, parts in self.parts.items():
            for part, values in zip(parts, answers.get(shard, ())):
                if part.positions is None:
                    out[part.table][...] = values
                else:
                    out[part.table][part.positions] = values
        for table, inverse in self.inverse.items():
            if inverse is not None:
                out[table] = out[table][inverse]
        return out

    def split(self, table: str, ids, grads: np.ndarray, dim: int) -> dict[int, tuple] | None:
        """`split_grads` for a table's gradients whose ids are exactly this plan's unique ids
        of the table (a push after the pull of the same ids): each shard's (ids, gradients,
        ids' wire bytes) from the plan's grouping. None when the ids are other ones."""
        unique = self.unique.get(table)
        if unique is None:
            return None
        mine = as_ids(ids, table)
        if len(mine) != len(unique) or not (mine is unique or np.array_equal(mine, unique)):
            return None
        grads = _as_grads(table, grads, len(mine), dim)
        out = {s: (mine[:0], grads[:0], b"") for s in range(self.num_shards)}
        for shard, parts in self.parts.items():
            for part in parts:
                if part.table == table:
                    out[shard] = (part.ids, grads if part.positions is None else grads[part.positions],
                                  part.ids_bytes)
        return out


def as_ids(ids, table: str) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise InvalidArgument(f"table {table!r}: ids must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
    return a.astype(np.int64 if a.dtype.kind == "i" else np.uint64, copy=False).view(np.uint64)


def plan_rows(asks: dict[str, np.ndarray], num_shards: int) -> RowPlan:
    """The plan of a pull of `asks` ({table: ids, repeats allowed}) over `num_shards` shards."""
    unique, inverse = {}, {}
    for table, ids in asks.items():
        a = as_ids(ids, table)
        if tables.is_sorted_unique(a):   # np.unique's output, as a caller that deduplicated passes it
            unique[table], inverse[table] = a, None
        else:
            u, inv = np.unique(a, return_inverse=True)
            unique[table], inverse[table] = u, inv.reshape(-1)
    names = list(unique)
    if num_shards == 1:
        parts = {0: [RowPart(t, unique[t], unique[t].astype("<u8", copy=False).tobytes(), None)
                     for t in names if len(unique[t])]}
        return RowPlan(1, unique, inverse, parts)
    lengths = np.array([len(unique[t]) for t in names], np.int64)
    every = np.concatenate([unique[t] for t in names]) if names else np.zeros(0, np.uint64)
    # one hash for every table's ids; group by (shard, table), each group keeping its order
    group = tables.shard_of(every, num_shards) * len(names) + np.repeat(np.arange(len(names)), lengths)
    order = np.argsort(group, kind="stable")
    sizes = np.bincount(group, minlength=num_shards * len(names)).tolist()
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).tolist() if names else []
    grouped = every[order]
    wire = grouped.astype("<u8", copy=False).tobytes()
    parts, at = {s: [] for s in range(num_shards)}, 0
    for s in range(num_shards):
        for i, table in enumerate(names):
            n = sizes[s * len(names) + i]
            if n:
                parts[s].append(RowPart(table, grouped[at:at + n], wire[8 * at:8 * (at + n)],
                                        order[at:at + n] - starts[i]))
                at += n
    return RowPlan(num_shards, unique, inverse, parts)


def split_grads(table: str, ids, grads: np.ndarray, dim: int, num_shards: int) -> dict[int, tuple]:
    """Each shard's (unique ids, summed gradients, ids' wire bytes or None) of a batch's row
    gradients; every shard gets an entry, empty where the batch touched none of its rows (its
    push still counts the step)."""
    ids = as_ids(ids, table)
    grads = _as_grads(table, grads, len(ids), dim)
    unique, summed = tables.sum_duplicates(ids, grads)
    if num_shards == 1:
        return {0: (unique, summed, None)}
    owner = tables.shard_of(unique, num_shards)
    order = np.argsort(owner, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=num_shards)))).tolist()
    unique, summed = unique[order], summed[order]
    return {s: (unique[bounds[s]:bounds[s + 1]], summed[bounds[s]:bounds[s + 1]], None) for s in range(num_shards)}


def _as_grads(table: str, grads, n: int, dim: int) -> np.ndarray:
    grads = np.asarray(grads, dtype=np.float32)
    if grads.shape != (n, dim):
        raise InvalidArgument(f"table {table!r}: gradients of shape {grads.shape} for {n} ids of dim {dim}")
    return grads
