"""A batch's embedding rows, as the shards see them: which unique ids each shard is asked for,
and how the answers go back into the batch's order.

Pure numpy over ids (int64 or uint64: the same 64-bit ids), no network. A batch names an id
as often as its samples do; a pull asks each shard once per unique id it holds
(`pscommon.tables.shard_of`), and a push sends each unique id's summed gradient, so the
bytes on the wire follow the unique ids of the batch, not its length.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from shardps.pscommon import tables
from shardps.pscommon.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class TableAsk:
    """One table's part of a pull: its unique ids, where each asked id is among them, and
    which of them each shard holds (positions into `unique`)."""

    unique: np.ndarray                 # uint64
    inverse: np.ndarray                # asked id i is unique[inverse[i]]
    by_shard: dict[int, np.ndarray]    # shard -> positions into unique


def as_ids(ids, table: str) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise InvalidArgument(f"table {table!r}: ids must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
    return a.astype(np.int64 if a.dtype.kind == "i" else np.uint64, copy=False).view(np.uint64)


def plan_pull(asks: dict[str, np.ndarray], num_shards: int) -> dict[str, TableAsk]:
    out = {}
    for table, ids in asks.items():
        unique, inverse = np.unique(as_ids(ids, table), return_inverse=True)
        owner = tables.shard_of(unique, num_shards)
        out[table] = TableAsk(unique, inverse.reshape(-1),
                              {s: np.flatnonzero(owner == s) for s in range(num_shards)})
    return out


def assemble(ask: TableAsk, answers: dict[int, np.ndarray], dim: int) -> np.ndarray:
    """The asked ids' rows in the asked order (a repeated id's row repeated), float32
    [len(asked), dim], from each shard's rows of its positions."""
    rows = np.empty((len(ask.unique), dim), np.float32)
    for shard, positions in ask.by_shard.items():
        if len(positions):
            rows[positions] = answers[shard]
    return rows[ask.inverse]


def split_grads(table: str, ids, grads: np.ndarray, dim: int, num_shards: int
                ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each shard's (unique ids, summed gradients) of a batch's row gradients; every shard gets
    an entry, empty where the batch touched none of its rows (its push still counts the step)."""
    ids = as_ids(ids, table)
    grads = np.asarray(grads, dtype=np.float32)
    if grads.shape != (len(ids), dim):
        raise InvalidArgument(f"table {table!r}: gradients of shape {grads.shape} for {len(ids)} ids of dim {dim}")
    unique, summed = tables.sum_duplicates(ids, grads)
    owner = tables.shard_of(unique, num_shards)
    return {s: (unique[owner == s], summed[owner == s]) for s in range(num_shards)}

