"""One step's push, fed parameter by parameter, and what sends it to one shard.

A `StreamingPush` starts each shard's call as soon as that shard's first gradient arrives
(eager), so sending overlaps the rest of the backward pass; a `_Feed` is the queue between
the training thread handing gradients over and the call streaming them out.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
from concurrent import futures
from typing import Callable

import numpy as np

from shardps.pscommon import tables
from shardps.pscommon.errors import Aborted, DeadlineExceeded, InvalidArgument
from shardps.pscommon.framing import batch, chunk_frames
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2

# (shard, step, base_version, feed) -> the shard's reply: ShardClient.send_push
SendPush = Callable[[int, int, int, "_Feed"], ps_pb2.PushReply]


@dataclasses.dataclass(frozen=True)
class RowsKey:
    """A feed item's key for the row gradients of every table on one shard: one item per
    shard and step, whose `encoded` is a list of (table, unique ids, summed gradients, the
    ids' wire bytes or None), every declared table named (empty where none of its rows)."""

    dtype: int


def row_bytes(feed: "_Feed") -> int:
    """The bytes of the row gradients in a complete feed (ids and float32 values)."""
    return sum(ids.nbytes + grads.nbytes for k, _, pre in feed.items if isinstance(k, RowsKey)
               for _, ids, grads, _ in pre)


class _Feed:
    """One shard's gradients for one step, in arrival order. Iterating blocks until the next
    one arrives (or the deadline passes); each iteration starts over, so a retried stream
    sends everything again."""

    def __init__(self, expected: int, timeout_s: float):
        self.items: list = []
        self.expected = expected
        self.timeout_s = timeout_s
        self.abandoned = False
        self.cond = threading.Condition()

    def put(self, key, grad: np.ndarray | None, encoded: tuple | None = None) -> None:
        with self.cond:
            self.items.append((key, grad, encoded))
            self.cond.notify_all()

    def abandon(self) -> None:
        with self.cond:
            self.abandoned = True
            self.cond.notify_all()

    def __iter__(self):
        i = 0
        while i < self.expected:
            with self.cond:
                if not self.cond.wait_for(lambda: i < len(self.items) or self.abandoned,
                                          timeout=self.timeout_s):
                    raise DeadlineExceeded(f"gradients stopped arriving: {len(self.items)} of "
                                           f"{self.expected} after {self.timeout_s:.0f}s")
                if i >= len(self.items):
                    raise Aborted(f"push abandoned after {i} of {self.expected} gradients")
                item = self.items[i]
            i += 1
            yield item


FUSED_MODES = ("async", "ssp")


def may_fuse(enabled: bool, mode: str, observer: bool, batched: bool) -> bool:
    """May this step's push to a shard carry the pull of the next step (PushPullBatch)?
    Only where that changes nothing a step computes: the values come from the shard's lock
    right after this push applied, which is what a pull sent at the moment of the
    acknowledgement would read. So: async and ssp (their pull of step + 1 needs nothing but
    this push; ssp's gate is asked as a pull's would be, and a reply without values means
    "pull as usual"), never sync (its pull waits for the step to be settled: SettleStep);
    a member (an observer does not push); a shard whose push and pull each go as one message
    (the unary call; a streamed push keeps its stream); and not turned off (--no-fuse)."""
    return enabled and not observer and batched and mode in FUSED_MODES


def _batch_parts(frames: Callable[[], list | object]) -> tuple[list, list]:
    """(RowBlock messages, chunk frames) of one attempt: in a batch the row blocks go in its
    `rows`, the frames after the envelope."""
    items = list(frames())
    rows = [m for m in items if isinstance(m, ps_pb2.RowBlock)]
    return rows, ([f for f in items if not isinstance(f, ps_pb2.RowBlock)] if rows else items)


def push_pull_call(header: ps_pb2.PushHeader, frames: Callable[[], list | object], pull_keys: list[str],
                   pull_codec, timeout_s: float, pull_rows: list[ps_pb2.RowBlock] = (), pull_rows_dtype: int = 0):
    """fn(stub) for the transport: one PushPullBatch message, the push of `frames()` and the
    pull of the next step's `pull_keys` and `pull_rows` (ids only); retried whole (the ledger
    makes the push half a duplicate, and the pull half is a read)."""
    def fused(stub) -> ps_pb2.PushPullReply:
        rows, chunks = _batch_parts(frames)
        envelope = ps_pb2.PushPullRequest(header=header, rows=rows, pull_keys=pull_keys, pull_codec=pull_codec,
                                          pull_rows=pull_rows, pull_rows_dtype=pull_rows_dtype)
        return stub.PushPullBatch(batch(envelope, chunks), timeout=timeout_s)
    return fused


def push_call(header: ps_pb2.PushHeader, frames: Callable[[], list | object], batched: bool,
              timeout_s: float):
    """fn(stub) for the transport: one PushBatch message for a small shard, else a Push
    stream of the header and the frames. `frames()` is called per attempt: a retry sends
    everything again."""
    if batched:
        def one_message(stub):
            rows, chunks = _batch_parts(frames)
            return stub.PushBatch(batch(ps_pb2.PushBatchRequest(header=header, rows=rows), chunks), timeout=timeout_s)
        return one_message

    def streamed(stub):   # a stream carries each row block in a PushRequest of its own
        messages = (ps_pb2.PushRequest(rows=m) if isinstance(m, ps_pb2.RowBlock) else m for m in frames())
        return stub.Push(itertools.chain([ps_pb2.PushRequest(header=header)], messages), timeout=timeout_s)
    return streamed


def encoded_frames(feed: _Feed, encode, sizes: dict[str, int]):
    """The chunk frames of a feed's gradients, and RowBlock messages for its rows. `encode(key,
    grad, pre)` gives (meta, payload) and is called once per key per step (the caller caches),
    so a retry resends the same bytes and error feedback never takes a residual twice. A key
    without a gradient goes as a payload-free meta marked no_gradient (its residual stays for
    the next step)."""
    sizes["logical"] = sizes["wire"] = 0  # a retry sends everything again
    for k, g, pre in feed:
        if isinstance(k, RowsKey):
            for table, ids, grads, ids_bytes in pre:
                sizes["logical"] += grads.nbytes
                for block in tables.row_blocks(table, ids, grads, k.dtype, ids_bytes=ids_bytes):
                    sizes["wire"] += len(block.ids) + len(block.values)
                    yield block
            continue
        if g is None and pre is None:
            yield from chunk_frames(no_gradient_meta(k), b"")
            continue
        meta, payload = encode(k, g, pre)
        sizes["logical"] += k.nbytes
        sizes["wire"] += memoryview(payload).nbytes
        yield from chunk_frames(meta, payload)


def no_gradient_meta(k) -> tensor_pb2.TensorMeta:
    return tensor_pb2.TensorMeta(name=k.key, dtype=tensor_pb2.DTYPE_FLOAT32, shape=[k.length], no_gradient=True)


class StreamingPush:
    """One step's push for `client` (a ShardClient; only its public methods are used)."""

    def __init__(self, client, step: int, base_versions: dict[int, int], eager: bool = True, next_rows=None):
        self.client = client
        self.step = step
        self.eager = eager
        # the next step's row ids, asked for by each shard's call where it is fused
        self.next_rows = next_rows
        # the versions the gradients are computed on: a prefetched pull may move them on
        # before every shard's call has started
        self.base_versions = base_versions
        smap = client.shard_map
        # every shard holds rows of every table: with tables, each shard takes one item every
        # step carrying every table (empty where the batch touched none of its rows)
        self.feeds = {s: _Feed(len(smap.keys_of(s)) + (1 if client.tables else 0), client.data_timeout_s)
                      for s in range(client.job.num_servers)}
        self.futures: dict[int, futures.Future] = {}
        self.seen: set[str] = set()
        self.seen_tables: set[str] = set()
        self.row_parts: dict[str, dict[int, tuple]] = {}   # table -> shard -> (ids, grads, ids' bytes)
        self.lock = threading.Lock()

    def add(self, name: str, grad: np.ndarray) -> None:
        """Hand over parameter `name`'s flat float32 gradient (kept, not copied: don't reuse it
        before finish() returns)."""
        self._add(name, lambda k: (grad[k.offset:k.offset + k.length], None))

    def add_encoded(self, name: str, parts, payload: np.ndarray) -> None:
        """Hand over parameter `name`'s gradient already encoded key by key (on the device:
        worker/device_codec.py): `parts` say where each key's bytes lie in `payload`, which
        is kept, not copied, until finish() returns."""
        by_key = {p.key: p for p in parts}
        missing = [k.key for k in self.client.shard_map.keys_of_param(name) if k.key not in by_key]
        if missing:  # before anything is handed over: a refused gradient changes nothing
            raise InvalidArgument(f"encoded gradient for {name!r} has no part for its keys {missing[:5]}")
        view = memoryview(payload).cast("B")

        def part(k):
            p = by_key[k.key]
            return None, (p.meta(), view[p.start:p.start + p.size])
        self._add(name, part)

    def skip(self, name: str) -> None:
        """Parameter `name` has no gradient this step (torch's grad None): its keys go as
        no_gradient, so the servers leave its value and optimizer state untouched, and its
        error-feedback residual waits for the next step that has a gradient."""
        self._add(name, lambda k: (None, None))

    def add_rows(self, table: str, ids, grads: np.ndarray) -> None:
        """Hand over the row gradients of `table` for a batch's ids (repeats are summed; a
        float32 [len(ids), dim] array). Once per table per step; an empty id list when the
        batch touched none of its rows. Each shard's call takes the rows of every table at
        once: they go out when the last table's are handed over."""
        self.add_row_grads({table: (ids, grads)})

    def add_row_grads(self, row_grads: dict) -> None:
        """add_rows for several tables at once ({table: (ids, grads)}); all are checked
        before any is taken."""
        declared = self.client.tables
        for table in row_grads:
            if table not in declared:
                raise InvalidArgument(f"table {table!r} is not one of the declared tables {sorted(declared)}")
        with self.lock:
            twice = [t for t in row_grads if t in self.seen_tables]
        if twice:
            raise InvalidArgument(f"row gradients of table {twice[0]!r} added twice in step {self.step}")
        parts = {table: self.client.split_row_grads(table, ids, grads) for table, (ids, grads) in row_grads.items()}
        with self.lock:
            twice = [t for t in row_grads if t in self.seen_tables]
            if twice:
                raise InvalidArgument(f"row gradients of table {twice[0]!r} added twice in step {self.step}")
            self.seen_tables.update(row_grads)
            self.row_parts.update(parts)
            if len(self.seen_tables) < len(declared):
                return
            key = RowsKey(self.client.row_dtype(self.client.push_codec))
            for shard, feed in self.feeds.items():
                feed.put(key, None, [(table, *self.row_parts[table][shard]) for table in declared])
                if self.eager and shard not in self.futures:
                    self._start(shard)

    def _add(self, name: str, item) -> None:
        with self.lock:
            if name in self.seen:
                raise InvalidArgument(f"gradient for {name!r} added twice in step {self.step}")
            self.seen.add(name)
            for k in self.client.shard_map.keys_of_param(name):
                self.feeds[k.shard].put(k, *item(k))
                # a batched shard's call waits for all its gradients anyway: start it in finish()
                if self.eager and k.shard not in self.futures and not self.client.fits_batch(k.shard):
                    self._start(k.shard)

    def ask_next_rows(self, next_rows) -> None:
        """Ask for the next step's rows (ShardClient.plan_next_rows) with the calls not started
        yet: the one-message calls, which start in finish() and are the ones that fuse."""
        self.next_rows = next_rows

    def _start(self, shard: int) -> None:
        self.futures[shard] = self.client.submit(self._send, shard)

    def _send(self, shard: int) -> ps_pb2.PushReply:
        return self.client.send_push(shard, self.step, self.base_versions.get(shard, 0), self.feeds[shard],
                                     next_rows=self.next_rows)

    def abandon(self) -> None:
        """Give up this step's push: streams already started end at once instead of waiting
        out the deadline for gradients that will not come (the server applies nothing)."""
        for feed in self.feeds.values():
            feed.abandon()

    def missing(self) -> list[str]:
        """Parameters neither added nor skipped yet."""
        return [p.name for p in self.client.shard_map.params if p.name not in self.seen]

    def missing_tables(self) -> list[str]:
        """Tables whose row gradients were not added yet."""
        return [t for t in self.client.tables if t not in self.seen_tables]

    def finish(self) -> list[ps_pb2.PushReply]:
        """Wait for every shard's stream; then the clock moves to the next step. Every
        parameter must have been added or skipped: a forgotten one is a caller's bug."""
        missing = self.missing()
        if missing:
            raise InvalidArgument(f"no gradient for parameters {missing[:5]} in step {self.step}: "
                                  "add() it, or skip() it when it had none")
        if self.missing_tables():
            raise InvalidArgument(f"no row gradients for tables {self.missing_tables()[:5]} in step {self.step}: "
                                  "add_rows() them, with no ids when the batch touched none")
        shards = [s for s, feed in self.feeds.items() if feed.expected]  # a shard may hold no keys
        if not self.eager and shards and not self.futures:
            # one call on this thread (no hand-off to a pool thread and back), the others at once
            for shard in shards[1:]:
                self._start(shard)
            first = self._send(shards[0])
            replies = [first] + [f.result() for _, f in sorted(self.futures.items())]
        else:
            for shard in shards:
                if shard not in self.futures:
                    self._start(shard)
            replies = [f.result() for _, f in sorted(self.futures.items())]
        self.client.step_done(self.step)
        return replies
