"""The ParameterServer gRPC servicer: parse and validate, call the shard, build replies.

No decisions live here; errors raised below become status codes through pscommon.errors.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from shardps.pscommon import codecs, credentials, tables
from shardps.pscommon.bounds import check_clock
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import (FailedPrecondition, InvalidArgument, PSError, ResourceExhausted, ShardEmpty,
                                     servicer_errors)
from shardps.pscommon.grpcutil import DATA_TIMEOUT_S
from shardps.pscommon.sharding import Key
from shardps.pscommon.codecs.bf16 import from_bf16_bits
from shardps.pscommon.framing import BATCH_BYTES, batch, body_of, chunk_frames, chunk_of
from shardps.pscommon.tensors import FLOAT_DTYPES, ChunkAssembler, check_shape, numel
from shardps.pscommon.wire.v1 import job_pb2, ps_pb2, ps_pb2_grpc, tensor_pb2
from shardps.psserver import consistency, pull_cache
from shardps.psserver.embeddings import RowGrad, TableKey
from shardps.psserver.shard import Shard


MAX_HOLD_S = 60.0   # the longest a consistent cut may hold a shard's pushes
NONFINITE = ("refuse", "skip")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_tensor_bytes: int = 64 << 20          # one key's payload
    max_transfer_bytes: int = 4 << 30         # one Declare/Push stream
    max_elements: int = 1 << 28
    max_keys_per_call: int = 100_000
    # a push carrying NaN or Inf: "refuse" it (INVALID_ARGUMENT, nothing applied) or "skip"
    # those gradients (the push counts, its finite gradients apply); counted either way
    nonfinite: str = "refuse"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.type == "int" and getattr(self, f.name) < 1:
                raise InvalidArgument(f"limit {f.name}={getattr(self, f.name)} must be >= 1")
        if self.nonfinite not in NONFINITE:
            raise InvalidArgument(f"nonfinite={self.nonfinite!r} must be one of {', '.join(NONFINITE)}")


def _as_float32(meta: tensor_pb2.TensorMeta, value: np.ndarray) -> np.ndarray:
    """Values and gradients are floating: bf16 arrives as bit patterns, integers are refused."""
    if meta.dtype not in FLOAT_DTYPES:
        raise InvalidArgument(f"tensor {meta.name!r}: dtype {tensor_pb2.DType.Name(meta.dtype)} is not "
                              "floating; parameters and gradients are float tensors")
    if meta.dtype == tensor_pb2.DTYPE_BFLOAT16 and value.dtype == np.uint16:
        return from_bf16_bits(value)
    if value.dtype.kind != "f":
        raise InvalidArgument(f"tensor {meta.name!r}: dtype {tensor_pb2.DType.Name(meta.dtype)} is not "
                              "floating; parameters and gradients are float tensors")
    return value if value.dtype == np.float32 else value.astype(np.float32)


def _check_no_gradient(meta: tensor_pb2.TensorMeta, payload, kind: str) -> None:
    """A key a push names without a gradient: no bytes may come with it."""
    if kind != "Push":
        raise InvalidArgument(f"tensor {meta.name!r} is marked no_gradient in a {kind}: only pushes may skip a key")
    if len(payload):
        raise InvalidArgument(f"tensor {meta.name!r} is marked no_gradient but carries {len(payload)} payload bytes")


def _check_key_spec(k: Key) -> None:
    if k.dtype != tensor_pb2.DTYPE_FLOAT32:
        raise InvalidArgument(f"key {k.key!r}: dtype {k.dtype} is not DTYPE_FLOAT32 (servers keep float32)")
    check_shape(k.key, k.param_shape)
    if k.length == 0 and numel(k.param_shape) != 0 or k.offset + k.length > numel(k.param_shape):
        raise InvalidArgument(f"key {k.key!r}: slice [{k.offset}, {k.offset + k.length}) does not fit "
                              f"parameter shape {list(k.param_shape)}")


def _table_status(shard, name: str) -> ps_pb2.TableStatus:
    """A table's counters on `shard` (under its lock)."""
    st = shard.tables.stores[name].stats()
    return ps_pb2.TableStatus(name=name, dim=shard.tables.specs[name].dim, rows=st.rows, bytes=st.bytes,
                              admitted=st.admitted, evicted_idle=st.evicted_idle, evicted_lru=st.evicted_lru,
                              dropped_gradients=st.dropped_gradients, unadmitted_lookups=st.unadmitted_lookups,
                              rows_served=shard.tables.rows_served[name], rows_updated=shard.tables.rows_updated[name])


def _all_finite(a: np.ndarray) -> bool:
    """One pass without a temporary: NaN and Inf survive a sum, and a float32 sum runs at
    about 10 GiB/s here against 8 for isfinite().all() (64 MiB: 6.2 against 7.8 ms); a sum that
    overflows from finite values is looked at element by element."""
    return bool(np.isfinite(np.add.reduce(a, axis=None))) or bool(np.isfinite(a).all())


def _first_header(requests, kind: str):
    try:
        first = next(requests)
    except StopIteration:
        raise InvalidArgument(f"empty {kind} stream: the first message must be a header") from None
    if body_of(first) != "header":
        raise InvalidArgument(f"{kind} stream must start with a header, got {body_of(first)}")
    return first.header


# pulls of at most this many parameter bytes are copied under one lock acquisition
SNAPSHOT_BYTES = 8 << 20
# a bound on one key's meta and framing in a PullBatchReply, besides its name (shapes have
# at most 8 dimensions)
BATCH_KEY_OVERHEAD = 160


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, shard: Shard, limits: Limits = Limits(), checkpointer=None, member_key: bytes = b""):
        self.shard = shard
        self.limits = limits
        self.checkpointer = checkpointer
        # the job key the scheduler handed over at registration; without one (a shard used
        # alone, the tests' bare servers) callers' credentials are not checked
        self.member_key = member_key
        # a version's encoded pull, for every worker that pulls that version (pull_cache.py)
        self.pull_cache = pull_cache.PullCache()

    def _check_member_call(self, caller: ps_pb2.Caller, what: str) -> None:
        """A call only a member makes (a push, a re-seed offer, SettleStep): never as an
        observer, whose calls skip the credential check."""
        if caller.observer:
            raise InvalidArgument(f"{what} is a worker's call: an observer has none to make")
        self._check_credential(caller)

    def _check_credential(self, caller: ps_pb2.Caller) -> None:
        """A push or gated pull made as a worker must carry that worker's credential; an
        observer's read needs none (it has no gate, no clock and changes nothing)."""
        if self.member_key and not caller.observer:
            credentials.check(self.member_key, "worker", caller.worker_id, caller.incarnation, caller.credential)

    # -- helpers -------------------------------------------------------------------------
    def _tensors(self, chunks, kind: str, own: bool = False):
        """Decode chunks (Frames or TensorChunks) into {name: array}, all validated; a key a
        push marks `no_gradient` maps to None.

        own=True copies each array as it arrives, so its received bytes are freed at once
        rather than held beside the copies until the stream ends (a Declare's values become
        the shard's storage; a Push's gradients are only read).
        """
        asm = ChunkAssembler(self.limits.max_tensor_bytes, self.limits.max_transfer_bytes)
        out: dict[str, np.ndarray] = {}
        received: dict[str, tuple[int, float]] = {}   # name -> (payload bytes, decode seconds)
        for chunk in chunks:
            done = asm.add(chunk)
            if done is None:
                continue
            meta, payload = done
            if meta.name in out:
                raise InvalidArgument(f"tensor {meta.name!r} sent twice in one {kind}")
            if len(out) >= self.limits.max_keys_per_call:
                raise InvalidArgument(f"more than {self.limits.max_keys_per_call} tensors in one {kind}")
            if meta.no_gradient:
                _check_no_gradient(meta, payload, kind)
                out[meta.name] = None
                continue
            start = time.perf_counter()
            value = _as_float32(meta, codecs.decode(meta, payload, self.limits.max_elements))
            out[meta.name] = np.array(value, dtype=np.float32) if own else value
            received[meta.name] = (len(payload), time.perf_counter() - start)
        asm.finish()
        return out, received

    def _stream_chunks(self, requests, kind: str, rows: list | None = None):
        """The chunks of a Declare or Push stream after its header; a push's row blocks go
        to `rows`, their bytes counted against the same cap as the tensors'."""
        row_bytes = 0
        for req in requests:
            chunk = chunk_of(req)
            if chunk is not None:
                yield chunk
                continue
            if rows is None or body_of(req) != "rows":
                raise InvalidArgument(f"{kind} stream: a {body_of(req) or 'message without a body'} after the header")
            row_bytes += len(req.rows.ids) + len(req.rows.values)
            if row_bytes > self.limits.max_transfer_bytes:
                raise ResourceExhausted(f"{kind} stream: more than {self.limits.max_transfer_bytes} bytes of rows")
            rows.append(req.rows)

    def _row_grads(self, blocks) -> dict[TableKey, RowGrad]:
        """A push's row blocks as one RowGrad per table (duplicate ids summed), all checked
        before any is applied."""
        def parse(block):
            what = f"push rows of table {block.table!r}"
            dtype = tables.row_dtype(block.dtype, what)
            ids = tables.ids_from_bytes(block.ids, what)
            dim = self.shard.row_dim(block.table)
            return ids, dim, lambda: tables.decode_rows(block.values, dtype, len(ids), dim, what)

        parts: dict[str, list] = {}
        for table, ids, _, grads in self._row_blocks(blocks, parse):
            parts.setdefault(table, []).append((ids, grads))
        return {TableKey(t): RowGrad.of(*p[0]) if len(p) == 1 else
                RowGrad.of(np.concatenate([i for i, _ in p]), np.concatenate([g for _, g in p]))
                for t, p in parts.items()}

    def _row_blocks(self, blocks, parse) -> list[list]:
        """[table, ids, dim, then()] of each block, every block checked: parse(block) gives
        (ids, dim, then), raising for a malformed block, and `then` (None: nothing) runs the
        checks that follow the ids' ownership (decoding a push's values). The ownership of
        every block's ids is checked with one hash over all of them, yet a malformed request
        is refused with the error a block-by-block check meets first (block i's parse, its
        ids' ownership, its then(), then block i + 1's)."""
        out, error = [], None
        for block in blocks:
            try:
                ids, dim, then = parse(block)
            except PSError as exc:
                error = exc
                break
            out.append([block.table, ids, dim, then])
        foreign = self.shard.first_foreign_rows([(table, ids) for table, ids, _, _ in out])
        for entry in out[:foreign]:   # every block when all ids live here
            entry[3] = entry[3]() if entry[3] is not None else None
        if foreign is not None:
            self.shard.check_rows(out[foreign][0], out[foreign][1])   # raises, naming the table and id
        if error is not None:
            raise error
        return out

    def _check_shard(self, shard: int):
        if shard != self.shard.shard_id:
            raise FailedPrecondition(f"request for shard {shard} reached shard {self.shard.shard_id}; "
                                     "refresh the shard map")

    def _check_model(self, fingerprint: str):
        if not self.shard.fingerprint:
            if fingerprint:  # the caller holds a shard map: the job's model is declared
                raise ShardEmpty(f"shard {self.shard.shard_id} holds no model (it restarted empty, or the model "
                                 "was never declared here): offer your copy to re-seed it, or declare first",
                                 shard=self.shard.shard_id)
            raise FailedPrecondition("no model declared on this shard yet; declare first")
        if fingerprint != self.shard.fingerprint:
            raise FailedPrecondition(
                f"model {fingerprint!r} differs from the model {self.shard.fingerprint!r} on this shard")

    # -- RPCs ----------------------------------------------------------------------------
    @servicer_errors
    def Declare(self, request_iterator, context):
        header = _first_header(request_iterator, "Declare")
        if not header.model_fingerprint:
            raise InvalidArgument("Declare header without a model fingerprint")
        self._check_shard(header.shard)
        keys = [Key.from_proto(k) for k in header.keys]
        for k in keys:
            _check_key_spec(k)
        if len({k.key for k in keys}) != len(keys):
            raise InvalidArgument("Declare header lists a key twice")
        specs = [tables.TableSpec.from_proto(t) for t in header.tables]
        values, _ = self._tensors(self._stream_chunks(request_iterator, "Declare"), "Declare", own=True)
        no_value = [name for name, v in values.items() if v is None]
        if no_value:
            raise InvalidArgument(f"Declare marks keys {no_value[:5]} no_gradient: a declaration carries values")
        if header.HasField("seed"):
            return self._offer_seed(header, keys, values, specs, context)
        created, existing = self.shard.declare(header.model_fingerprint, keys, values, specs)
        return ps_pb2.DeclareReply(created=created, existing=existing)

    def _offer_seed(self, header, keys, values, specs, context) -> ps_pb2.DeclareReply:
        caller = header.seed.caller
        self._check_member_call(caller, "a re-seed offer")
        left = context.time_remaining() if context is not None else None
        taken = self.shard.offer_seed(caller.worker_id, caller.incarnation, header.seed.version,
                                      header.model_fingerprint, keys, values,
                                      timeout_s=DATA_TIMEOUT_S if left is None else left, tables=specs)
        return ps_pb2.DeclareReply(reseeded=_reseed_proto(taken))

    @servicer_errors
    def Pull(self, request, context):
        header, frames = self._pull(request, context)
        yield ps_pb2.PullResponse(header=header)
        yield from frames

    @servicer_errors
    def PullBatch(self, request, context):
        header, frames = self._pull(request, context, max_bytes=BATCH_BYTES)
        return batch(ps_pb2.PullBatchReply(header=header), list(frames))

    def _pull(self, request, context, max_bytes: int | None = None):
        """Admit a pull through the gate; returns its header and a generator of its frames.

        With max_bytes, a pull whose reply could exceed it is refused before anything else."""
        self._check_shard(request.shard)
        self._check_credential(request.caller)
        self._check_model(request.model_fingerprint)
        cfg, keys = self._pull_keys(list(request.keys), request.codec, max_bytes)
        check_clock(request.step, "pull")
        remaining = context.time_remaining()
        wait_budget = (remaining if remaining is not None else DATA_TIMEOUT_S) * 0.8
        version, next_step, waited = self.shard.wait_pull(
            request.caller.worker_id, request.caller.incarnation, request.step, wait_budget,
            observer=request.caller.observer, settled=_settled_of(request.caller))
        encode = self._encoder(cfg)
        if self.shard.nbytes_of(keys) <= SNAPSHOT_BYTES:
            # small reads are one consistent snapshot: every key and the header's version
            # from the same moment (so staleness is measured exactly)
            version, encoded = self.shard.read_many(keys, encode)
        else:
            # large reads go key by key, bounding memory to one key's copy; async readers of a
            # busy shard may see keys from neighbouring versions (as in any Hogwild-style PS)
            encoded = ((key, self.shard.read(key, lambda value, key=key: encode(key, value))) for key in keys)
        return (ps_pb2.PullHeader(shard_version=version, wait_s=waited, next_step=next_step),
                self._pull_frames(encoded))

    def _pull_keys(self, names: list[str], codec: tensor_pb2.CodecSpec, max_bytes: int | None
                   ) -> tuple[CodecConfig, list[str]]:
        """A pull's codec and keys, checked; with max_bytes, a pull whose reply could exceed
        it is refused."""
        if len(names) > self.limits.max_keys_per_call:
            raise InvalidArgument(f"more than {self.limits.max_keys_per_call} keys in one Pull")
        cfg = CodecConfig.from_proto(codec)
        if cfg.name not in ("fp32", "raw", "fp16", "bf16"):
            raise InvalidArgument(f"pull codec {cfg} is not one of fp32, fp16, bf16")
        keys = self.shard.keys_for_pull(names)
        if max_bytes is not None:
            # every pull codec is at most raw size; each key adds its meta and framing
            size = self.shard.nbytes_of(keys) + sum(BATCH_KEY_OVERHEAD + 2 * len(k) for k in keys)
            if size > max_bytes:
                raise ResourceExhausted(f"a one-message pull of {len(keys)} keys may need {size} bytes, "
                                        f"more than {max_bytes}; use Pull")
        return cfg, keys

    def _encoder(self, cfg: CodecConfig):
        """encode(key, value) -> (meta, frames, seconds encoding took): a pull's key as sent,
        from the pull cache where its variant is worth keeping (a hit took no time)."""
        small, lossless = self.shard.job.small_tensor_bytes, self.shard.job.lossless

        def fresh(key, value):
            # the frames copy the value: taken under the shard's lock, they are a consistent read
            start = time.perf_counter()
            meta, payload = codecs.encode(key, value, tensor_pb2.DTYPE_FLOAT32, cfg, small, lossless)
            return meta, list(chunk_frames(meta, payload)), time.perf_counter() - start

        if not pull_cache.worth_caching(cfg.name, lossless):
            return fresh
        variant = (cfg, small, lossless)

        def cached(key, value):
            # under the shard's lock: the entry's version and identity are the value's
            entry = self.shard.entries[key]
            got, hit = self.pull_cache.get(key, variant, entry.version, entry,
                                           lambda: pull_cache.Encoded(*fresh(key, value)))
            return got.meta, list(got.frames), 0.0 if hit else got.encode_s
        return cached

    def _pull_frames(self, encoded):
        for key, (meta, key_frames, encode_s) in encoded:
            self.shard.count_traffic(self.shard.pull_traffic, key,
                                     self.shard.entries[key].value.nbytes, meta.payload_size, encode_s)
            yield from key_frames

    @servicer_errors
    def Push(self, request_iterator, context):
        header = _first_header(request_iterator, "Push")
        rows: list = []
        return self._push(header, self._stream_chunks(request_iterator, "Push", rows), rows)

    @servicer_errors
    def PushBatch(self, request, context):
        if not request.HasField("header"):
            raise InvalidArgument("PushBatch without a header")
        return self._push(request.header, request.chunks, request.rows)

    @servicer_errors
    def PushPullBatch(self, request, context):
        """PushBatch, then the pull of the next step in the same reply when the gate admits it
        at once (see Shard.push_pull): the dense keys asked and the rows of `pull_rows` (a
        training lookup, as PullRowsBatch's), read under the lock right after the push. Every
        check of both halves runs before the push applies."""
        if not request.HasField("header"):
            raise InvalidArgument("PushPullBatch without a header")
        header = request.header
        grads, tensors, received = self._push_input(header, request.chunks, request.rows)
        check_clock(header.step + 1, "pull")
        cfg, keys = self._pull_keys(list(request.pull_keys), request.pull_codec, BATCH_BYTES)
        row_dtype = tables.row_dtype(request.pull_rows_dtype, "PushPullBatch rows")
        row_asks = self._row_asks(request.pull_rows, "PushPullBatch pull_rows", row_dtype, BATCH_BYTES)
        encode = self._encoder(cfg)

        def read():   # under the shard's lock, right after the push: its entries now (a restore replaces them)
            return [(k, encode(k, self.shard.entries[k].value)) for k in keys], self._fused_rows(row_asks)
        (version, duplicate, staleness), pulled = self.shard.push_pull(
            header.caller.worker_id, header.caller.incarnation, header.step, header.base_version, grads,
            read=read, settled=_settled_of(header.caller))
        self._count_push(tensors, received, duplicate)
        reply = ps_pb2.PushPullReply(push=ps_pb2.PushReply(shard_version=version, duplicate=duplicate,
                                                           staleness=staleness))
        if pulled is None:
            return reply
        pulled_version, next_step, (encoded, row_values) = pulled
        reply.header.CopyFrom(ps_pb2.PullHeader(shard_version=pulled_version, next_step=next_step))
        if row_values is not None:   # encoded out of the lock: the lookup copied the rows
            reply.rows.extend(block for (table, ids, data), values in zip(row_asks, row_values)
                              for block in tables.row_blocks(table, ids, values, row_dtype, ids_bytes=data))
        return batch(reply, list(self._pull_frames(encoded)))

    def _fused_rows(self, asks: list[tuple]) -> list[np.ndarray] | None:
        """The rows of a fused call's next step (under the shard's lock, after the push), or
        None when the lookup is refused: the push applied all the same and must be
        acknowledged, so the reply goes without rows and the worker pulls them (the same
        refusal then reaches it)."""
        if not asks:
            return []
        try:
            return self.shard.read_rows([(table, ids) for table, ids, _ in asks], observer=False)
        except PSError:
            return None

    def _push(self, header, chunks, rows=()):
        grads, tensors, received = self._push_input(header, chunks, rows)
        version, duplicate, staleness = self.shard.push(
            header.caller.worker_id, header.caller.incarnation, header.step, header.base_version, grads,
            settled=_settled_of(header.caller))
        self._count_push(tensors, received, duplicate)
        return ps_pb2.PushReply(shard_version=version, duplicate=duplicate, staleness=staleness)

    def _push_input(self, header, chunks, rows):
        """A push's gradients, every check made: (grads to apply, {name: decoded or None},
        {name: (payload bytes, decode seconds)})."""
        self._check_shard(header.shard)
        self._check_member_call(header.caller, "a push")
        check_clock(header.step, "push")
        self._check_model(header.model_fingerprint)
        tensors, received = self._tensors(chunks, "Push")
        grads = {name: g for name, g in tensors.items() if g is not None}
        grads.update(self._row_grads(rows))
        grads = self._finite(header, grads)
        # keys without a gradient this step must still be this shard's: a typo is not a skip
        self.shard.check_keys_exist([name for name, g in tensors.items() if g is None])
        return grads, tensors, received

    def _count_push(self, tensors: dict, received: dict, duplicate: bool) -> None:
        if duplicate:
            return
        for name, g in tensors.items():
            if g is not None:
                self.shard.count_traffic(self.shard.push_traffic, name, g.size * 4, *received[name])

    def _finite(self, header, grads: dict) -> dict:
        """The push's gradients without NaN or Inf: one diverged worker must not poison the
        model. Refused whole (the default) or those gradients dropped, as the limits say."""
        bad = [key for key, g in grads.items() if not _all_finite(g.grads if isinstance(key, TableKey) else g)]
        if not bad:
            return grads
        self.shard.count_nonfinite()
        names = [f"table {k.table}" if isinstance(k, TableKey) else k for k in bad]
        if self.limits.nonfinite == "refuse":
            raise InvalidArgument(f"push of worker {header.caller.worker_id} step {header.step}: NaN or Inf in the "
                                  f"gradients of {names[:5]}; refused, nothing applied (--nonfinite refuse)")
        return {k: g for k, g in grads.items() if k not in bad}

    @servicer_errors
    def PullRows(self, request, context):
        """Rows by id through the pull gate; the reply's blocks follow the request's order."""
        header, blocks = self._pull_rows(request, context)
        yield ps_pb2.PullRowsReply(header=header)
        yield from (ps_pb2.PullRowsReply(rows=b) for b in blocks)

    @servicer_errors
    def PullRowsBatch(self, request, context):
        """PullRows in one message; refused before the gate when its reply could pass
        framing.BATCH_BYTES."""
        header, blocks = self._pull_rows(request, context, max_bytes=BATCH_BYTES)
        return ps_pb2.PullRowsBatchReply(header=header, rows=list(blocks))

    def _pull_rows(self, request, context, max_bytes: int | None = None):
        self._check_shard(request.shard)
        self._check_credential(request.caller)
        self._check_model(request.model_fingerprint)
        check_clock(request.step, "row pull")
        dtype = tables.row_dtype(request.dtype, "PullRows")
        asks = self._row_asks(request.rows, "PullRows", dtype, max_bytes)
        remaining = context.time_remaining()
        version, next_step, waited = self.shard.wait_pull(
            request.caller.worker_id, request.caller.incarnation, request.step,
            (remaining if remaining is not None else DATA_TIMEOUT_S) * 0.8, observer=request.caller.observer,
            settled=_settled_of(request.caller))
        values = self.shard.read_rows([(table, ids) for table, ids, _ in asks], observer=request.caller.observer)
        blocks = (block for (table, ids, data), rows in zip(asks, values)
                  for block in tables.row_blocks(table, ids, rows, dtype, ids_bytes=data))
        return ps_pb2.PullHeader(shard_version=version, wait_s=waited, next_step=next_step), blocks

    def _row_asks(self, blocks, kind: str, dtype: int, max_bytes: int | None) -> list[tuple[str, np.ndarray, bytes]]:
        """A row pull's (table, ids, the ids' bytes as they came: the reply carries them back),
        every block checked; with max_bytes, one whose reply could exceed it is refused."""
        wire_ids = []

        def parse(block):
            what = f"{kind} of table {block.table!r}"
            if block.values:
                raise InvalidArgument(f"{what}: a pull names ids only, it carries no values")
            wire_ids.append(block.ids)
            return tables.ids_from_bytes(wire_ids[-1], what), self.shard.row_dim(block.table), None

        checked = self._row_blocks(blocks, parse)
        itemsize = tables.ROW_ITEMSIZE[dtype]
        size = sum(len(ids) * (8 + dim * itemsize) + BATCH_KEY_OVERHEAD for _, ids, dim, _ in checked)
        if max_bytes is not None and size > max_bytes:
            raise ResourceExhausted(f"a one-message row pull may need {size} bytes, more than {max_bytes}; "
                                    "use PullRows")
        return [(table, ids, data) for (table, ids, _, _), data in zip(checked, wire_ids)]

    @servicer_errors
    def SettleStep(self, request, context):
        """sync: the caller's pushes before `step` reached every shard (see consistency/sync.py)."""
        self._check_shard(request.shard)
        self._check_member_call(request.caller, "SettleStep")
        self._check_model(request.model_fingerprint)
        check_clock(request.step, "settle")
        remaining = context.time_remaining()
        settled, next_step, waited = self.shard.settle(
            request.caller.worker_id, request.caller.incarnation, request.step,
            (remaining if remaining is not None else DATA_TIMEOUT_S) * 0.8, wait=request.wait,
            settled=_settled_of(request.caller))
        reply = ps_pb2.SettleReply(next_step=next_step, wait_s=waited)
        if settled is not None:
            reply.settled.step, contributors = settled
            reply.settled.contributors.extend(sorted(contributors))
        return reply

    @servicer_errors
    def Inspect(self, request, context):
        shard = self.shard
        sample = min(request.sample, 64)
        names = shard.keys_for_pull(list(request.keys))
        out = []
        for name in names:
            def info(value, name=name):
                e = shard.entries[name]
                return ps_pb2.KeyInfo(spec=e.spec.to_proto(), version=e.version,
                                      norm=float(np.linalg.norm(value.astype(np.float64))),
                                      sample=value[:sample].tolist())
            out.append(shard.read(name, info))
        return ps_pb2.InspectReply(shard=shard.shard_id, keys=out, tables=self._table_infos(sample))

    def _table_infos(self, sample: int) -> list[ps_pb2.TableInfo]:
        s = self.shard
        with s.cond:
            infos = []
            for name, store in sorted(s.tables.stores.items()):
                ids, touches = store.hottest(sample)
                infos.append(ps_pb2.TableInfo(status=_table_status(s, name), hottest_ids=ids.tolist(),
                                              hottest_touches=touches.tolist()))
            return infos

    @servicer_errors
    def ScanRows(self, request, context):
        """A table's rows on this shard as one copy, streamed in blocks (float32)."""
        self._check_model(request.model_fingerprint)
        version, ids, values = self.shard.scan_rows(request.table)
        yield ps_pb2.PullRowsReply(header=ps_pb2.PullHeader(shard_version=version))
        if len(ids):
            yield from (ps_pb2.PullRowsReply(rows=b)
                        for b in tables.row_blocks(request.table, ids, values, tensor_pb2.DTYPE_FLOAT32))

    @servicer_errors
    def ShardStatus(self, request, context):
        s = self.shard
        with s.cond:
            return ps_pb2.ShardStatusReply(
                shard=s.shard_id, keys=len(s.entries), bytes=s.param_bytes(),
                optimizer_bytes=s.optimizer_bytes(), shard_version=s.version, pushes=s.pushes,
                pulls=s.pulls, duplicates=s.duplicates, uptime_s=s.now() - s.started,
                staleness=s.staleness.to_proto(), pull_wait_s=s.pull_wait.to_proto(),
                push_traffic=[ps_pb2.TensorTraffic(key=k, logical_bytes=t.logical, wire_bytes=t.wire,
                                                   codec_seconds=t.codec_s)
                              for k, t in sorted(s.push_traffic.items())],
                pull_traffic=[ps_pb2.TensorTraffic(key=k, logical_bytes=t.logical, wire_bytes=t.wire,
                                                   codec_seconds=t.codec_s)
                              for k, t in sorted(s.pull_traffic.items())],
                clocks=dict(s.gate.clocks), completed_step=s.gate.completed_step,
                membership_view=s.view, mode=consistency.mode_of(s.job),
                checkpoint_age_s=self.checkpointer.age_s() if self.checkpointer else -1.0,
                checkpoint_version=(self.checkpointer.last_version or 0) if self.checkpointer else 0,
                reseeded=_reseed_proto(s.reseeded), rebases=s.rebases, nonfinite_pushes=s.nonfinite_pushes,
                dropped_pushes=s.dropped_pushes,
                tables=[_table_status(s, name) for name in sorted(s.tables.stores)])

    @servicer_errors
    def Checkpoint(self, request, context):
        if self.checkpointer is None:
            raise FailedPrecondition(f"shard {self.shard.shard_id} has no --checkpoint-dir")
        cut = request.WhichOneof("cut")
        if cut == "hold_s":
            if not 0 < request.hold_s <= MAX_HOLD_S:
                raise InvalidArgument(f"hold_s {request.hold_s} is not in (0, {MAX_HOLD_S}]")
            self.shard.hold(request.hold_s)
            return ps_pb2.CheckpointReply(shard=self.shard.shard_id, shard_version=self.shard.version)
        snapshot = None
        if cut == "at_step":
            if consistency.mode_of(self.shard.job) != job_pb2.MODE_SYNC:
                raise FailedPrecondition(f"a cut at a step needs sync mode; this job is {self.shard.job.mode}")
            left = context.time_remaining() if context is not None else None
            snapshot = self.shard.cut_at(request.at_step, self.checkpointer.job_json,
                                         DATA_TIMEOUT_S if left is None else max(0.0, left - 1.0))
        try:
            path = self.checkpointer.write(snapshot=snapshot)
        finally:
            if request.release:
                self.shard.release()
        last = self.checkpointer.last_snapshot_gate
        return ps_pb2.CheckpointReply(shard=self.shard.shard_id, path=str(path),
                                      shard_version=self.checkpointer.last_version,
                                      completed_step=last.get("completed_step", 0))


def _reseed_proto(r) -> ps_pb2.Reseed | None:
    if r is None:
        return None
    return ps_pb2.Reseed(worker_id=r.worker, version=r.version, offers=r.offers, uptime_s=r.uptime_s)


def _settled_of(caller: ps_pb2.Caller) -> tuple[int, frozenset[int]] | None:
    """The settling shard's outcome a caller carries (sync), if any."""
    if not caller.HasField("settled"):
        return None
    return check_clock(caller.settled.step, "settled step"), frozenset(caller.settled.contributors)
