"""Torch embedding modules whose rows live on the shards (issue 13).

    emb = ShardedEmbeddingBag("item", 16, mode="mean")
    client.declare(initial, embedding_tables=(emb.spec,))
    rows = EmbeddingClient(client, [emb])
    for ids, offsets, y in batches:
        rows.fetch({emb: ids})                       # the batch's unique rows, one pull_rows
        loss = loss_fn(head(emb(ids, offsets)), y)
        loss.backward()
        client.push(dense_grads, row_grads=rows.row_grads())
        rows.prefetch(next_ids)                      # async/ssp: pulls while the loop goes on

A module holds no table and knows no vocabulary: ids are any 64-bit values (negative,
huge). Each step it holds only the rows of the batch's unique ids, as one leaf tensor; the
forward gathers from it with torch's own ops (`F.embedding`, `F.embedding_bag`), so the
output is bit for bit what nn.Embedding / nn.EmbeddingBag compute on the same rows, and
autograd leaves in the leaf's `.grad` the per-unique-id gradient, repeated ids already
summed: exactly what a push sends, with no gradient the size of a table anywhere.
"""
from __future__ import annotations

import logging
from concurrent import futures
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shardps.pscommon.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from shardps.pscommon.tables import TableSpec

if TYPE_CHECKING:
    from shardps.worker.client import ShardClient

log = logging.getLogger("shardps.worker")

_ID_DTYPES = (torch.int64, torch.int32)  # nn.Embedding's index dtypes


class _RowsOfStep(nn.Module):
    """What ShardedEmbedding and ShardedEmbeddingBag share: the spec, this step's unique ids
    (sorted int64, so a batch's ids find their row by binary search) and their rows."""

    def __init__(self, name: str, dim: int, initializer: str, scale: float, seed: int):
        super().__init__()
        self.spec = TableSpec(name, dim, initializer, scale, seed)  # validates every field
        # No parameters (PSClient declares named_parameters(); a table is not one), so an empty
        # buffer tells the rows where to live: model.to(device) moves it like any buffer.
        # Not persistent: a state_dict has no business with it.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self.ids: torch.Tensor | None = None    # this step's unique ids, sorted int64
        self.rows: torch.Tensor | None = None   # their rows: the leaf whose .grad is pushed
        self._used: torch.Tensor | None = None  # which of them a forward read

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """This step's rows: `ids` sorted unique int64 and their float32 rows [len(ids), dim]
        (EmbeddingClient.fetch calls it). A fresh leaf each step, so gradients never carry
        over from one step to the next and no zero_grad is needed."""
        device, dtype = self._anchor.device, self._anchor.dtype
        self.ids = torch.from_numpy(ids).to(device)
        self.rows = torch.from_numpy(rows).to(device=device, dtype=dtype).requires_grad_()
        self._used = torch.zeros(len(ids), dtype=torch.bool, device=device)

    def clear(self) -> None:
        """No rows this step: a forward now fails instead of reading a past step's rows."""
        self.ids = self.rows = self._used = None

    def used(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 gradient rows) of the ids a forward read; empty when none or when no
        backward reached the rows. Fetched ids that no forward read are left out, as
        nn.Embedding(sparse=True) leaves them out: a zero gradient still moves a row's
        optimizer state (adagrad's step count, lazy adam's moments)."""
        if self.rows is None or self.rows.grad is None:
            return np.zeros(0, np.int64), np.zeros((0, self.spec.dim), np.float32)
        used = self._used
        return (self.ids[used].cpu().numpy(),
                self.rows.grad[used].detach().to("cpu", torch.float32).numpy())

    def _check_ids(self, ids) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _ID_DTYPES:
            what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise InvalidArgument(f"{type(self).__name__} {self.name!r}: ids must be an int64 or int32 "
                                  f"tensor, not {what}")

    def _positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Where each id's row is among this step's rows, in the shape of `ids`."""
        self._check_ids(ids)
        if self.rows is None:
            raise FailedPrecondition(f"{type(self).__name__} {self.name!r} has no rows for this step: "
                                     f"call EmbeddingClient.fetch({{module: ids}}) before forward")
        # int32 ids widen by value: -1 names the same id in either dtype, as on the wire
        flat = ids.reshape(-1).to(device=self.ids.device, dtype=torch.int64)
        pos = torch.searchsorted(self.ids, flat).clamp_(max=max(len(self.ids) - 1, 0))
        found = self.ids[pos] == flat if len(self.ids) else torch.zeros_like(flat, dtype=torch.bool)
        if not bool(found.all()):
            missing = flat[~found][:5].tolist()
            raise FailedPrecondition(f"{type(self).__name__} {self.name!r}: ids {missing} were not fetched "
                                     "for this step: fetch() the ids the forward reads")
        self._used[pos] = True
        return pos.reshape(ids.shape)


class ShardedEmbedding(_RowsOfStep):
    """nn.Embedding over a sharded table: ids of shape (...) -> rows of shape (..., dim)."""

    def __init__(self, name: str, dim: int, initializer: str = "normal", scale: float = 0.01, seed: int = 0):
        super().__init__(name, dim, initializer, scale, seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self._positions(ids), self.rows)


class ShardedEmbeddingBag(_RowsOfStep):
    """nn.EmbeddingBag over a sharded table, sum or mean: forward(ids, offsets) with 1-D ids
    and offsets (bag i is ids[offsets[i]:offsets[i + 1]]), or 2-D ids (B, L) without offsets
    (B bags of L ids) -> (B, dim). An empty bag gives zeros, as in torch."""

    def __init__(self, name: str, dim: int, mode: str = "mean", initializer: str = "normal", scale: float = 0.01,
                 seed: int = 0):
        if mode not in ("sum", "mean"):
            raise InvalidArgument(f"ShardedEmbeddingBag {name!r}: mode={mode!r} must be 'sum' or 'mean'")
        super().__init__(name, dim, initializer, scale, seed)
        self.mode = mode

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        self._check_ids(ids)
        self._check_shape(ids, offsets)
        pos = self._positions(ids)
        if offsets is not None:
            offsets = offsets.to(device=pos.device, dtype=torch.int64)  # embedding_bag: the input's dtype
        return F.embedding_bag(pos, self.rows, offsets, mode=self.mode)

    def _check_shape(self, ids: torch.Tensor, offsets) -> None:
        """torch's own checks are asserts or C++ errors, some only on CUDA: name the bad value here."""
        what = f"ShardedEmbeddingBag {self.name!r}"
        if ids.dim() not in (1, 2):
            raise InvalidArgument(f"{what}: ids must be 1-D (with offsets) or 2-D, not of shape {tuple(ids.shape)}")
        if ids.dim() == 2:
            if offsets is not None:
                raise InvalidArgument(f"{what}: offsets must be None when ids are 2-D (each row is a bag)")
            return
        if not isinstance(offsets, torch.Tensor) or offsets.dtype not in _ID_DTYPES:
            got = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
            raise InvalidArgument(f"{what}: 1-D ids need offsets, an int64 or int32 tensor, not {got}")
        if offsets.dim() != 1:
            raise InvalidArgument(f"{what}: offsets must be 1-D, not of shape {tuple(offsets.shape)}")
        if len(offsets) == 0:
            return
        if int(offsets[0]) != 0:
            raise InvalidArgument(f"{what}: offsets must start at 0, not {int(offsets[0])}")
        steps = offsets[1:] - offsets[:-1]
        if bool((steps < 0).any()):
            at = int(torch.nonzero(steps < 0)[0]) + 1
            raise InvalidArgument(f"{what}: offsets must not decrease, but offsets[{at}]={int(offsets[at])} "
                                  f"< offsets[{at - 1}]={int(offsets[at - 1])}")
        if int(offsets[-1]) > len(ids):
            raise InvalidArgument(f"{what}: last offset {int(offsets[-1])} is past the {len(ids)} ids")


def sharded_embeddings(model: nn.Module) -> list[_RowsOfStep]:
    """The sharded embedding modules of `model`, in model.modules() order: for
    EmbeddingClient, and their `.spec`s for ShardClient.declare(embedding_tables=...)."""
    return [m for m in model.modules() if isinstance(m, _RowsOfStep)]


class EmbeddingClient:
    """Fetches each step's rows for a set of sharded embedding modules over a ShardClient
    (whose declare() named their tables), and collects their gradients for its push.

    Prefetch changes when bytes move, never what a step computes: it is taken only once the
    current step's push was acknowledged (the client's clock moved past the fetched step), so
    the rows it reads include that push, as a fetch at the same moment would; and a fetch
    uses it only for the same ids at the same clock. In sync mode it is off: a pull of step
    t + 1 waits at the shards until every worker pushed step t, and a step the others
    completed without us (Aborted) is pulled again anyway, so there is nothing to overlap.
    """

    def __init__(self, client: ShardClient, modules: list[_RowsOfStep]):
        self.client = client
        self.modules: dict[str, _RowsOfStep] = {}
        for m in modules:
            if not isinstance(m, _RowsOfStep):
                raise InvalidArgument(f"modules must be ShardedEmbedding or ShardedEmbeddingBag, "
                                      f"not {type(m).__name__}")
            if m.name in self.modules:
                raise InvalidArgument(f"two modules name table {m.name!r}: one module per table")
            declared = client.tables.get(m.name)
            if declared != m.spec:
                what = "is not declared" if declared is None else f"is declared as {declared}"
                raise FailedPrecondition(f"table {m.name!r} {what} at the client (module: {m.spec}): "
                                         "declare(..., embedding_tables=(module.spec, ...)) first")
            self.modules[m.name] = m
        mode = client.job.mode
        self.prefetch_disabled_reason = (
            None if mode in ("async", "ssp") else
            f"{mode} mode: the next step's pull waits until every worker pushed this one, so prefetch is off")
        self.pulls = 0             # pull_rows calls made (fetches and prefetches)
        self.prefetch_hits = 0     # fetches served by a prefetch
        self.fused_hits = 0        # fetches served by the rows the last push's replies brought
        self._fetch_clock: int | None = None  # the clock of the step whose rows the modules hold
        self._prefetch: tuple[int, dict[str, np.ndarray], futures.Future] | None = None
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rows-prefetch")

    @property
    def prefetch_enabled(self) -> bool:
        return self.prefetch_disabled_reason is None

    def fetch(self, ids_by_module: dict) -> None:
        """Pull the rows of the batch's ids, for every module named (by module or table name)
        in one pull_rows call, and hand each its unique ids and rows. Modules not named have
        no rows this step (their forward fails, their push is empty)."""
        asks = self._unique_ids(ids_by_module)
        got = self._take_prefetch(asks)
        if got is None:
            self.pulls += 1
            before = self.client.row_pulls_fused
            got = self._pull(asks)
            self.fused_hits += self.client.row_pulls_fused - before
        self._fetch_clock = self.client.clock
        for name, m in self.modules.items():
            if name in asks:
                m.load(asks[name], got[name])
            else:
                m.clear()

    def prefetch(self, ids_by_module: dict) -> bool:
        """Start pulling the next batch's rows in the background; the next fetch() with the
        same ids uses them. Call it after this step's push returned. False (nothing started)
        in sync mode: see `prefetch_disabled_reason`."""
        asks = self._unique_ids(ids_by_module)
        if not self.prefetch_enabled:
            log.debug("prefetch skipped: %s", self.prefetch_disabled_reason)
            return False
        clock = self.client.clock
        if self._fetch_clock is not None and clock <= self._fetch_clock:
            raise FailedPrecondition(f"prefetch before the push of step {self._fetch_clock} returned: rows pulled "
                                     "now would not include its gradients; push first, then prefetch")
        self._drop_prefetch()
        self.pulls += 1  # counted here, on the caller's thread, not on the pool's
        self._prefetch = (clock, asks, self._pool.submit(self._pull, asks))
        return True

    def asks(self, ids_by_module: dict) -> dict[str, np.ndarray]:
        """{table: unique ids}, what fetch() of these ids pulls: hand the next batch's to
        PSClient.push(next_rows=...) and, where the push is fused, its replies bring the rows
        the next fetch() then takes without a call."""
        return self._unique_ids(ids_by_module)

    def row_grads(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{table: (ids, float32 gradient rows)} for client.push(..., row_grads=...): the unique
        ids a forward read this step and their gradients (empty for a module not used)."""
        return {name: m.used() for name, m in self.modules.items()}

    def close(self) -> None:
        self._drop_prefetch()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "EmbeddingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _unique_ids(self, ids_by_module: dict) -> dict[str, np.ndarray]:
        """{table: sorted unique int64 ids} (uint64 ids by their bits: the same 64-bit ids)."""
        if not isinstance(ids_by_module, dict):
            raise InvalidArgument(f"ids must be a dict of module (or table name) to ids, not "
                                  f"{type(ids_by_module).__name__}")
        out = {}
        for key, ids in ids_by_module.items():
            name = key.name if isinstance(key, _RowsOfStep) else key
            if name not in self.modules or (isinstance(key, _RowsOfStep) and self.modules[name] is not key):
                raise InvalidArgument(f"{key!r} is not one of this client's modules {sorted(self.modules)}")
            out[name] = np.unique(_as_int64(ids, name))
        return out

    def _pull(self, asks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.client.pull_rows(asks) if asks else {}

    def _take_prefetch(self, asks: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The prefetched rows if they are what a pull now would ask for, else None."""
        if self._prefetch is None:
            return None
        clock, prefetched, fut = self._prefetch
        self._prefetch = None
        same = (clock == self.client.clock and prefetched.keys() == asks.keys()
                and all(np.array_equal(prefetched[t], asks[t]) for t in asks))
        if not same:  # another batch, or a push in between: its rows may be stale
            fut.cancel()
            return None
        # the pull's own calls have deadlines and retries; this bounds the wait on top of them
        limit = self.client.data_timeout_s + self.client.cfg.retry_deadline_s
        try:
            got = fut.result(timeout=limit)
        except futures.TimeoutError:
            raise DeadlineExceeded(f"prefetched rows did not arrive within {limit:.0f}s") from None
        self.prefetch_hits += 1
        return got

    def _drop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch[2].cancel()  # a pull already running finishes; its rows are dropped
            self._prefetch = None


def _as_int64(ids, table: str) -> np.ndarray:
    """Flat int64 ids from a torch tensor or numpy array of any shape."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype not in _ID_DTYPES:
            raise InvalidArgument(f"table {table!r}: ids must be an int64 or int32 tensor, not {ids.dtype}")
        return ids.detach().reshape(-1).to("cpu", torch.int64).numpy()
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        # unsigned ids keep their bits (2**64 - 1 is the id -1), signed ones widen by value
        wide = ids.reshape(-1).astype(np.uint64 if ids.dtype.kind == "u" else np.int64, copy=False)
        return wide.view(np.int64)
    what = ids.dtype if isinstance(ids, np.ndarray) else type(ids).__name__
    raise InvalidArgument(f"table {table!r}: ids must be an integer tensor or numpy array, not {what}")
