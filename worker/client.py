"""ShardClient: a worker's connection to the cluster, in numpy terms.

It composes three parts, each the one owner of its state:
- `Session` (worker/session.py): membership, heartbeats, rejoin, partition assignments; the worker's
  identity (id, incarnation, view, clock) as an immutable snapshot;
- `Transport` (worker/transport.py): a stub per shard, retries, address refresh, fan-out;
- `StreamingPush` (worker/push.py): one step's push, fed gradient by gradient.
The client itself holds the model's shard map and does what needs all three: declare, pull,
and encoding pushes. Torch lives one level up (shardps.worker.api); this module moves flat
float32 arrays keyed by parameter name.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, TypeVar

import grpc
import numpy as np

from shardps.pscommon import codecs, grpcutil, tables
from shardps.pscommon.config import SETTLING_SHARD, CodecConfig, JobSpec
from shardps.pscommon.errors import (FailedPrecondition, Internal, InvalidArgument, PSError, ShardEmpty, Unavailable,
                                     from_rpc_error)
from shardps.pscommon.framing import BATCH_BYTES, chunk_frames, chunk_of
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.sharding import Key, Param, ShardMap
from shardps.pscommon.tables import TableSpec
from shardps.pscommon.tensors import ChunkAssembler
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, scheduler_pb2, tensor_pb2
from shardps.worker import rows
from shardps.worker.compression import ErrorFeedback
from shardps.worker.push import StreamingPush, encoded_frames, may_fuse, push_call, push_pull_call, row_bytes
from shardps.worker.session import Identity, Session, SessionConfig, Stopped
from shardps.worker.transport import Transport

log = logging.getLogger("shardps.worker")
T = TypeVar("T")
STOP_GRACE_S = 1.0   # once told to stop, a call in flight gets this long before it is cancelled


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    scheduler: str
    name: str = ""
    push_codec: CodecConfig | None = None     # None: the job's
    pull_codec: CodecConfig | None = None     # None: the job's (export reads fp32 whatever it is)
    control_timeout_s: float = grpcutil.CONTROL_TIMEOUT_S
    data_timeout_s: float = grpcutil.DATA_TIMEOUT_S
    connect_timeout_s: float = 120.0          # waiting for the scheduler and all servers
    retry_deadline_s: float = 120.0           # retrying one pull/push on a retryable error
    max_tensor_bytes: int = 64 << 20
    pull_streams: int = 2                     # concurrent Pull streams per shard
    # a push carries the next step's pull where push.may_fuse allows (one round trip a
    # step), and the next pull() returns those values: the shard's right after our push, not
    # at the pull's call. Off here, so a bare client's pull reads at its call; PSClient and
    # the built-in loop turn it on (psctl worker --no-fuse turns it off)
    fuse: bool = False
    security: Security = NO_SECURITY
    # set when the worker must stop (psctl worker: SIGTERM, SIGINT): every wait ends (Stopped)
    stop: threading.Event | None = None

    def session(self) -> SessionConfig:
        return SessionConfig(scheduler=self.scheduler, name=self.name, control_timeout_s=self.control_timeout_s,
                             connect_timeout_s=self.connect_timeout_s, retry_deadline_s=self.retry_deadline_s,
                             security=self.security)


@dataclasses.dataclass
class TransferCounts:
    """Tensor bytes this worker moved: logical (fp32) and as sent or received on the wire."""

    logical_sent: int = 0
    wire_sent: int = 0
    logical_received: int = 0
    wire_received: int = 0
    decode_s: float = 0.0      # decoding pulled tensors into the caller's arrays


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the shard map fixes for the data path, computed once per map."""

    shard_map: ShardMap
    batched: frozenset[int]               # shards whose keys go in one PullBatch/PushBatch
    pull_groups: dict[int, list[list[Key]]]
    dense_bytes: dict[int, int]           # each shard's keys, fp32

    @classmethod
    def of(cls, smap: ShardMap, num_shards: int, pull_streams: int) -> "_Plan":
        nbytes = {s: sum(k.nbytes for k in smap.keys_of(s)) for s in range(num_shards)}
        batched = frozenset(s for s, n in nbytes.items() if n <= BATCH_BYTES)
        groups = {s: _balanced(smap.keys_of(s), 1 if s in batched else pull_streams) for s in range(num_shards)}
        return cls(smap, batched, groups, nbytes)


@dataclasses.dataclass(frozen=True)
class _Fused:
    """The pull half of a PushPullBatch reply, kept for the pull of `step` (our next)."""

    step: int
    incarnation: int
    plan: _Plan
    reply: ps_pb2.PushPullReply


@dataclasses.dataclass(frozen=True)
class _NextRows:
    """The rows a push asks for with it, for our next step's pull_rows: `asks` as the caller
    gave them (copied: the next pull_rows must name exactly these), `plan` their placement."""

    asks: dict[str, np.ndarray]
    plan: rows.RowPlan

    @classmethod
    def of(cls, asks: dict[str, np.ndarray], num_shards: int) -> "_NextRows":
        mine = {table: np.array(ids, copy=True) for table, ids in asks.items()}
        return cls(mine, rows.plan_rows(mine, num_shards))

    def same(self, asks: dict[str, np.ndarray]) -> bool:
        """Whether `asks` names exactly our ids, table by table in the same order."""
        if list(asks) != list(self.asks):
            return False
        return all(np.array_equal(rows.as_ids(asks[t], t), rows.as_ids(ids, t)) for t, ids in self.asks.items())


@dataclasses.dataclass(frozen=True)
class _FusedRows:
    """One shard's rows of `asked.plan` (its parts, in order) that a fused push brought for the
    row pull of `step` (our next)."""

    step: int
    incarnation: int
    asked: _NextRows
    values: list[np.ndarray]


def _balanced(keys: list[Key], n: int) -> list[list[Key]]:
    """`keys` in at most `n` groups of about equal bytes, largest first."""
    keys = sorted(keys, key=lambda k: (-k.nbytes, k.key))
    n = max(1, min(n, len(keys)))
    groups, loads = [[] for _ in range(n)], [0] * n
    for k in keys:
        i = loads.index(min(loads))
        groups[i].append(k)
        loads[i] += k.nbytes
    return groups


class ShardClient:
    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.session = Session(cfg.session())
        self.transport = Transport(self._live_servers, cfg.retry_deadline_s, cfg.security,
                                   view=lambda: self.session.identity.view, wait_view=self.session.wait_view)
        # a new view may name a shard's new server: move there now, not at the next failure
        self.session.on_view_change(self._refresh_servers)
        self._closed = threading.Event()
        if cfg.stop is not None:
            threading.Thread(target=self._watch_stop, args=(cfg.stop,), daemon=True, name="stop-watch").start()
        self.traffic = TransferCounts()
        self._lock = threading.Lock()         # traffic, shard_versions
        self._plan: _Plan | None = None
        self._shard_versions: dict[int, int] = {}
        self._compressor = ErrorFeedback()    # residuals per key: owned by the push side
        self._copy: dict[str, np.ndarray] | None = None   # the arrays our pulls fill
        self._tables: dict[str, TableSpec] = {}  # the model's embedding tables, by name
        self._row_plans: tuple[rows.RowPlan, ...] = ()  # the last pull_rows plans, newest first
        # sync: the settling shard's last outcome (carried to every shard on our calls) and
        # the clock we last told it our pushes had reached (see psserver/consistency/sync.py)
        self._settled: ps_pb2.StepOutcome | None = None
        self._settled_clock = 0
        self._settling = None   # the SettleStep started when our last push was acknowledged
        self._fused: dict[int, _Fused] = {}   # shard -> the next step's values a fused push brought
        self._fused_rows: dict[int, _FusedRows] = {}   # shard -> the next step's rows a fused push brought
        self.row_pulls_fused = 0   # pull_rows answered by fused replies alone, without a call

    # -- identity, job and model, read-only ----------------------------------------------
    @property
    def identity(self) -> Identity:
        return self.session.identity

    @property
    def worker_id(self) -> int:
        return self.session.identity.worker_id

    @property
    def incarnation(self) -> int:
        return self.session.identity.incarnation

    @property
    def clock(self) -> int:
        return self.session.identity.clock

    @property
    def view(self) -> int:
        return self.session.identity.view

    @property
    def job(self) -> JobSpec:
        return self.session.job

    @property
    def shard_map(self) -> ShardMap | None:
        return self._plan.shard_map if self._plan else None

    @property
    def tables(self) -> dict[str, TableSpec]:
        return dict(self._tables)

    @property
    def data_timeout_s(self) -> float:
        return self.cfg.data_timeout_s

    def shard_versions(self) -> dict[int, int]:
        """shard -> the version of the values last pulled from it."""
        with self._lock:
            return dict(self._shard_versions)

    def encode_seconds(self) -> float:
        return self._compressor.totals().total_encode_s

    def compression_stats(self) -> dict:
        return self._compressor.stats()

    # -- membership (the session's) -------------------------------------------------------
    def join(self) -> None:
        self.session.join()

    def rejoin(self, stale_incarnation: int | None = None) -> None:
        self.session.rejoin(stale_incarnation)

    @property
    def refused_incarnation(self) -> int | None:
        return self.session.refused_incarnation

    def leave(self) -> None:
        try:
            self._settle_last()
        except Stopped:
            pass  # stopping: no call goes out; in sync our last push may not count, as a dead worker's
        self.session.leave()
        self.transport.close()
        self._closed.set()

    # -- stopping, and following the servers ----------------------------------------------
    def interrupt(self, grace_s: float = 0.0) -> None:
        """The worker must stop: every wait (a retry's pause, the scheduler, the servers) ends
        with Stopped at once; after `grace_s` (or at leave()) the calls still in flight (a
        pull held at a gate, a server that never answers) are cancelled too."""
        self.session.interrupt()
        if grace_s:
            self._closed.wait(grace_s)
        self.transport.interrupt()

    def _watch_stop(self, stop: threading.Event) -> None:
        while not stop.wait(0.2):
            if self._closed.is_set():
                return
        log.info("stopping: ending every wait")
        self.interrupt(STOP_GRACE_S)

    def _refresh_servers(self, view: int) -> None:
        """On a new membership view (the heartbeat thread): where every shard lives now, asked
        on the fan-out pool so that the heartbeats never wait for it."""
        try:
            self.transport.submit(self.transport.refresh)
        except RuntimeError:  # the pool is shut down: we left
            pass

    # -- sync steps settle on every shard alike (psserver/consistency/sync.py) -------------
    @property
    def _settles(self) -> bool:
        """sync with several shards: a step counts our push only once we say it reached every
        shard, and the other shards complete it with the settling shard's outcome."""
        return self.job.mode == "sync" and self.job.num_servers > 1 and not self.session.identity.observer

    def _settle_request(self, step: int) -> ps_pb2.SettleRequest:
        return ps_pb2.SettleRequest(caller=self._caller(), shard=SETTLING_SHARD, step=step, wait=True,
                                    model_fingerprint=self._plan.shard_map.fingerprint)

    def _settled_by(self, reply: ps_pb2.SettleReply, step: int) -> None:
        if reply.HasField("settled"):
            self._settled = reply.settled
        self._settled_clock = max(self._settled_clock, step)

    def _settle(self, step: int) -> None:
        """Tell the settling shard our pushes before `step` reached every shard; returns once
        those steps are complete, with the last one's outcome (carried on our next calls)."""
        req = self._settle_request(step)
        self._settled_by(self._on_shard(SETTLING_SHARD, lambda stub: stub.SettleStep(
            req, timeout=self.cfg.data_timeout_s)), step)

    def _start_settle(self, step: int) -> None:
        """_settle without waiting: a gRPC future, no thread; _await_settled takes its reply."""
        try:
            call = self.transport.stub(SETTLING_SHARD).SettleStep.future(self._settle_request(step),
                                                                         timeout=self.cfg.data_timeout_s)
        except (KeyError, grpc.RpcError, PSError) as exc:   # no channel now: the next read settles
            log.debug("settling step %d later: %s", step - 1, exc)
            return
        self._settling = (step, call)

    def _await_settled(self) -> None:
        """Before reading a step's values: the previous step is settled, and we know how."""
        settling, self._settling = self._settling, None
        if settling is not None:
            step, call = settling
            try:
                self._settled_by(call.result(), step)
            except (grpc.RpcError, grpc.FutureCancelledError) as exc:   # settled below, with any call's retries
                log.debug("settling step %d: %s; again", step - 1, exc)
        step = self.session.identity.clock
        if self._settles and self._settled_clock < step:
            self._settle(step)   # a joiner's first read, or a step whose settle never started

    def _settle_last(self) -> None:
        """Leaving: our last step must count, and the other shards complete it only with its
        outcome, which we bring them, as our next read would have."""
        if self._plan is None or not self._settles:   # never attached: no job, no step
            return
        try:
            self._await_settled()
            for shard in range(self.job.num_servers):
                if shard == SETTLING_SHARD:
                    continue
                req = ps_pb2.SettleRequest(caller=self._caller(), shard=shard, step=self.session.identity.clock,
                                           model_fingerprint=self._plan.shard_map.fingerprint)
                self._on_shard(shard, lambda stub, req=req: stub.SettleStep(req, timeout=self.cfg.data_timeout_s))
        except (grpc.RpcError, PSError) as exc:
            log.warning("could not settle our last step on every shard: %s", exc)

    def acquire_partition(self, num_partitions: int, max_epochs: int) -> tuple[int, int, int]:
        return self.session.acquire_partition(num_partitions, max_epochs)

    def complete_partition(self, epoch: int, partition: int) -> None:
        self.session.complete_partition(epoch, partition)

    def wait_for_servers(self) -> None:
        self.transport.set_servers(self.session.wait_for_servers())

    def wait_for_workers(self, n: int) -> None:
        self.session.wait_for_workers(n)

    def _live_servers(self) -> dict[int, str]:
        return self.session.live_servers()

    def attach(self, embedding_tables: tuple[TableSpec, ...] = ()) -> ShardMap:
        """Read-only access (operators, evaluation, export): learn the job, its servers and
        shard map without joining; pulls skip the consistency gate. The model's embedding
        tables come with the shard map (`embedding_tables`: the caller's, for a map without
        any: a state file written before the scheduler kept them)."""
        info = self.session.attach()
        if not info.shard_map.fingerprint:
            raise FailedPrecondition("no model has been declared in this job yet")
        self._adopt_map(ShardMap.from_proto(info.shard_map))
        self._tables = {t.name: t for t in self.shard_map.tables or embedding_tables}
        self.transport.set_servers(self.session.live_servers(info))
        return self.shard_map

    def _adopt_map(self, smap: ShardMap) -> None:
        self._plan = _Plan.of(smap, self.job.num_servers, self.cfg.pull_streams)

    # -- model ---------------------------------------------------------------------------
    def declare(self, initial: dict[str, np.ndarray], embedding_tables: tuple[TableSpec, ...] = ()) -> ShardMap:
        """Fix the parameter set at the scheduler and create the keys, and the embedding
        tables, on every shard (each shard holds some rows of every table).

        Idempotent: a second worker (or a restart) with the same model keeps trained values.
        """
        self._tables = {t.name: t for t in embedding_tables}
        params = [Param(name, tensor_pb2.DTYPE_FLOAT32, tuple(a.shape)) for name, a in initial.items()]
        req = scheduler_pb2.DeclareModelRequest(
            params=[scheduler_pb2.ParamSpec(name=p.name, dtype=p.dtype, shape=p.shape) for p in params],
            tables=[t.to_proto() for t in embedding_tables])
        info = self.session.declare_model(req)
        self._adopt_map(ShardMap.from_proto(info.shard_map))
        self._compressor.reset()  # residuals are per key; keys come from this map
        flat = {name: np.ascontiguousarray(a, dtype=np.float32).reshape(-1) for name, a in initial.items()}
        self.transport.fan_out(range(self.job.num_servers), lambda shard: self._declare_shard(shard, flat))
        return self.shard_map

    def _declare_shard(self, shard: int, flat: dict[str, np.ndarray]) -> None:
        requests = self._declare_requests(shard, flat)
        self.transport.call(shard, lambda stub: stub.Declare(requests(), timeout=self.cfg.data_timeout_s))

    def _declare_requests(self, shard: int, flat: dict[str, np.ndarray], seed: ps_pb2.SeedOffer | None = None):
        """A Declare stream's messages for one shard's keys, values sliced from `flat`."""
        keys = self.shard_map.keys_of(shard)
        header = ps_pb2.DeclareHeader(model_fingerprint=self.shard_map.fingerprint, shard=shard,
                                      keys=[k.to_proto() for k in keys], job=self.job.to_proto(), seed=seed,
                                      tables=[t.to_proto() for t in self._tables.values()])

        def requests():
            yield ps_pb2.DeclareRequest(header=header)
            for k in keys:
                value = flat[k.param][k.offset:k.offset + k.length]
                meta, payload = codecs.encode(k.key, value, tensor_pb2.DTYPE_FLOAT32)
                yield from chunk_frames(meta, payload)
        return requests

    # -- a shard that restarted empty ----------------------------------------------------
    def _on_shard(self, shard: int, fn: Callable[[ps_pb2_grpc.ParameterServerStub], T]) -> T:
        """transport.call, and when the shard answers that it restarted empty, offer it our
        copy (the values of our last pull) and call again once it is re-seeded."""
        def attempt(stub):
            try:
                return fn(stub)
            except grpc.RpcError as err:
                if not isinstance(from_rpc_error(err), ShardEmpty):
                    raise
            self._offer_copy(shard, stub)
            return fn(stub)
        return self.transport.call(shard, attempt)

    def _offer_copy(self, shard: int, stub) -> None:
        copy = self._copy
        if copy is None:   # nothing pulled yet: another worker's copy will do
            raise Unavailable(f"shard {shard} restarted empty and this worker holds no copy of it yet; "
                              "waiting for another worker to re-seed it")
        version = self.shard_versions().get(shard, 0)
        seed = ps_pb2.SeedOffer(caller=self._caller(), version=version)
        reply = stub.Declare(self._declare_requests(shard, copy, seed)(), timeout=self.cfg.data_timeout_s)
        taken = reply.reseeded
        if reply.HasField("reseeded"):
            log.warning("shard %d restarted empty; re-seeded from worker %d's copy at version %d "
                        "(we offered version %d)", shard, taken.worker_id, taken.version, version)

    def _caller(self) -> ps_pb2.Caller:
        me = self.session.identity
        return ps_pb2.Caller(worker_id=max(me.worker_id, 0), incarnation=me.incarnation, observer=me.observer,
                             credential=me.credential, settled=self._settled)

    # -- pull ----------------------------------------------------------------------------
    def pull(self, into: dict[str, np.ndarray]) -> None:
        """Fill `into` (flat float32 arrays by parameter name) with current values.

        Each shard's keys are read over up to `pull_streams` concurrent streams: reads are
        idempotent, and several streams keep the server's threads and the TCP connection busy
        where one stream would serialize encode, send and decode. A shard's keys of at most
        BATCH_BYTES come in one PullBatch call instead.
        """
        plan = self._plan
        self._await_settled()
        step = self.session.identity.clock
        fused = self._take_fused(plan, step)
        tasks = [(shard, group) for shard in range(self.job.num_servers) if shard not in fused
                 for group in plan.pull_groups[shard]]
        results: dict[int, list[tuple[int, int]]] = {
            shard: [self._receive_fused(plan, shard, reply, into)] for shard, reply in fused.items()}
        if len(tasks) == 1:  # one call: no hand-off to a pool thread and back
            shard, group = tasks[0]
            results[shard] = [self._pull_keys(plan, shard, group, step, into)]
        else:
            futs = [self.transport.submit(self._pull_keys, plan, shard, group, step, into) for shard, group in tasks]
            for (shard, _), fut in zip(tasks, futs):
                results.setdefault(shard, []).append(fut.result())
        # the smallest step any shard is on: shards learn of a joiner at slightly different
        # times, and one may still wait for our push of a step the others finished
        # without us (they answer that push with ABORTED, and we pull again)
        self.session.advance_clock(min(next_step for rs in results.values() for _, next_step in rs))
        with self._lock:
            for shard, rs in results.items():
                self._shard_versions[shard] = min(version for version, _ in rs)
        self._copy = into   # our freshest copy of every shard, should one restart empty

    def _take_fused(self, plan: _Plan, step: int) -> dict[int, ps_pb2.PushPullReply]:
        """The values our last push brought for this pull (each is used once): only those for
        this very step, incarnation and shard map; anything else (a step sat out, a rejoin, a
        push that failed on another shard) is dropped and pulled again."""
        with self._lock:
            kept, self._fused = self._fused, {}
        incarnation = self.session.identity.incarnation
        return {shard: f.reply for shard, f in kept.items()
                if f.step == step and f.incarnation == incarnation and f.plan is plan}

    def _receive_fused(self, plan: _Plan, shard: int, reply: ps_pb2.PushPullReply,
                       into: dict[str, np.ndarray]) -> tuple[int, int]:
        self._receive(shard, {k.key: k for k in plan.pull_groups[shard][0]}, reply.chunks, into)
        return reply.header.shard_version, reply.header.next_step

    def _pull_keys(self, plan: _Plan, shard: int, group: list[Key], step: int,
                   into: dict[str, np.ndarray]) -> tuple[int, int]:
        keys = {k.key: k for k in group}
        req = ps_pb2.PullRequest(caller=self._caller(), shard=shard, step=step, keys=list(keys),
                                 codec=(self.cfg.pull_codec or self.job.pull_codec).to_proto(),
                                 model_fingerprint=plan.shard_map.fingerprint)
        batched = shard in plan.batched

        def read(stub):
            """(header, chunks) of one pull call."""
            if batched:
                reply = stub.PullBatch(req, timeout=self.cfg.data_timeout_s)
                return (reply.header if reply.HasField("header") else None), reply.chunks
            responses = stub.Pull(req, timeout=self.cfg.data_timeout_s)
            first = next(responses, None)
            return (None if first is None or chunk_of(first) is not None else first.header,
                    (chunk_of(r) for r in responses))

        def once(stub):
            header, chunks = read(stub)
            if header is None:
                raise Internal(f"shard {shard} answered a pull without a header first")
            self._receive(shard, keys, chunks, into)
            return header.shard_version, header.next_step
        return self._on_shard(shard, once)

    def _receive(self, shard: int, keys: dict[str, Key], chunks, into: dict[str, np.ndarray]) -> None:
        """Decode a pull's chunks into `into`; every asked key exactly once."""
        asm = ChunkAssembler(self.cfg.max_tensor_bytes, 1 << 62)
        logical, wire, decode_s, seen = 0, 0, 0.0, set()
        for chunk in chunks:
            if chunk is None:
                raise Internal(f"shard {shard} sent a second pull header")
            done = asm.add(chunk)
            if done is None:
                continue
            meta, payload = done
            k = keys.get(meta.name)
            if k is None or meta.name in seen:
                raise Internal(f"shard {shard} sent key {meta.name!r} unasked or twice")
            start = time.perf_counter()
            target = into[k.param]
            # a buffer that is not an array (export's, which records the writes) takes an assignment
            dst = target[k.offset:k.offset + k.length] if isinstance(target, np.ndarray) else None
            if dst is not None and dst.dtype == np.float32 and dst.flags.c_contiguous:
                codecs.decode_into(meta, payload, k.length, dst)   # no dense temporary
            else:
                target[k.offset:k.offset + k.length] = codecs.decode(meta, payload, k.length).reshape(-1)
            decode_s += time.perf_counter() - start
            seen.add(meta.name)
            logical += k.length * 4
            wire += len(payload)
        asm.finish()
        if len(seen) != len(keys):
            raise Internal(f"shard {shard} answered a pull with {len(seen)} of {len(keys)} keys")
        with self._lock:
            self.traffic.logical_received += logical
            self.traffic.wire_received += wire
            self.traffic.decode_s += decode_s

    # -- push ----------------------------------------------------------------------------
    def push(self, grads: dict[str, np.ndarray], no_gradient: tuple[str, ...] = (),
             row_grads: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
             next_rows: dict[str, np.ndarray] | None = None) -> list[ps_pb2.PushReply]:
        """Push flat float32 gradients (by parameter name) for the current clock, then advance it.
        Parameters in `no_gradient` had none this step: the servers leave them untouched.
        `row_grads` maps a table to (ids, float32 [len(ids), dim] gradients); a declared
        table it leaves out had no rows this step.

        `next_rows` ({table: ids}, as pull_rows takes them): the next step's ids, asked for
        with this push where the push is fused (ClientConfig.fuse, push.may_fuse): a shard's
        reply then brings its rows, read right after our push applied, and the next
        pull_rows of exactly these ids answers from them without a call to that shard.

        Raises Aborted in sync mode when the step completed without this worker: pull again.
        """
        stream = self.start_push(eager=False, next_rows=self.plan_next_rows(next_rows))
        for name, g in grads.items():
            stream.add(name, g)
        for name in no_gradient:
            stream.skip(name)
        if self._tables:   # every table, in one hand-over: a shard's rows of all of them go as one item
            given = row_grads or {}
            stream.add_row_grads({table: given.get(table, (np.zeros(0, np.int64), np.zeros((0, spec.dim), np.float32)))
                                  for table, spec in self._tables.items()})
        return stream.finish()

    def plan_next_rows(self, next_rows: dict[str, np.ndarray] | None) -> _NextRows | None:
        """The next step's row ids ({table: ids}) as a push carries them (see push()); None
        when there are none or this client does not fuse."""
        if not next_rows or not self.cfg.fuse:
            return None
        self._check_tables(next_rows)
        return _NextRows.of(next_rows, self.job.num_servers)

    def start_push(self, eager: bool = True, next_rows: _NextRows | None = None) -> StreamingPush:
        """A push for the current clock whose gradients arrive one parameter at a time. eager:
        each shard's call starts with its first gradient (for autograd hooks: sending overlaps
        the rest of backward); otherwise every call starts in finish(). `next_rows`: see push()."""
        return StreamingPush(self, self.session.identity.clock, self.shard_versions(), eager, next_rows=next_rows)

    def fits_batch(self, shard: int) -> bool:
        """Whether a push of every key of `shard` goes as one PushBatch message (a shard whose
        dense keys fit; with tables, send_push still streams a step whose rows do not)."""
        return shard in self._plan.batched

    # -- embedding rows ------------------------------------------------------------------
    def row_dtype(self, codec: CodecConfig) -> int:
        """Rows travel in fp16 or bf16 when the job's codec says so, else in float32 (the
        other codecs, int8 and top-k, compress whole tensors, not rows)."""
        return {"fp16": tensor_pb2.DTYPE_FLOAT16, "bf16": tensor_pb2.DTYPE_BFLOAT16}.get(
            codec.name, tensor_pb2.DTYPE_FLOAT32)

    def pull_rows(self, asks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows of each table for its ids (any 64-bit ids, repeats allowed), float32
        [len(ids), dim], in the asked order, read at the current clock through each shard's
        gate. Each shard is asked once per unique id it holds, every table in one call.

        The step's plan (unique ids, their shards) is kept: a push of the same ids' gradients
        reuses it (`split_row_grads`) instead of deduplicating and hashing them again."""
        self._check_tables(asks)
        self._await_settled()
        step = self.session.identity.clock
        fused = self._take_fused_rows(asks, step)
        plan = next(iter(fused.values())).asked.plan if fused else rows.plan_rows(asks, self.job.num_servers)
        with self._lock:   # the current step's plan and a prefetch's: newest first
            self._row_plans = (plan, *self._row_plans[:1])
        answers = {s: f.values for s, f in fused.items()}
        calls = [s for s in plan.shards() if s not in fused]
        answers.update(self._each_shard(calls, lambda s: self._pull_rows_shard(s, plan, step)))
        if fused and not calls:
            self.row_pulls_fused += 1
        return plan.assemble(answers, {t: self._tables[t].dim for t in asks})

    def _check_tables(self, asks: dict) -> None:
        for table in asks:
            if table not in self._tables:
                raise InvalidArgument(f"table {table!r} is not one of the declared tables {sorted(self._tables)}")

    def _take_fused_rows(self, asks: dict[str, np.ndarray], step: int) -> dict[int, _FusedRows]:
        """The rows our last push brought for this row pull (each used once): only for this
        very step and incarnation, and only when `asks` are exactly the ids that push named;
        otherwise they are dropped and every shard is asked."""
        with self._lock:
            kept, self._fused_rows = self._fused_rows, {}
        incarnation = self.session.identity.incarnation
        kept = {s: f for s, f in kept.items() if f.step == step and f.incarnation == incarnation}
        if not kept or not next(iter(kept.values())).asked.same(asks):
            return {}
        return kept

    def split_row_grads(self, table: str, ids, grads: np.ndarray) -> dict[int, tuple]:
        """Each shard's (unique ids, summed float32 gradients, ids' wire bytes or None) of a
        table's row gradients, every shard named (empty where none of its rows). Gradients of
        exactly the ids a recent pull_rows asked for reuse its plan."""
        dim, num_shards = self._tables[table].dim, self.job.num_servers
        for plan in self._row_plans:
            parts = plan.split(table, ids, grads, dim) if plan.num_shards == num_shards else None
            if parts is not None:
                return parts
        return rows.split_grads(table, ids, grads, dim, num_shards)

    def _each_shard(self, shards: list[int], fn: Callable[[int], T]) -> dict[int, T]:
        """fn(shard) for every shard at once, one of them on this thread (a hand-off to a pool
        thread and back costs more than a small call); the first error raises."""
        if not shards:
            return {}
        futs = {s: self.transport.submit(fn, s) for s in shards[1:]}
        out = {shards[0]: fn(shards[0])}
        out.update((s, f.result()) for s, f in futs.items())
        return out

    def table_dims(self) -> dict[str, int]:
        """The embedding tables the shards hold (name -> dim), as shard 0 reports them: an
        observer (export) learns them there, since the scheduler keeps no table specs."""
        reply = self.transport.call(0, lambda stub: stub.ShardStatus(ps_pb2.ShardStatusRequest(),
                                                                     timeout=self.cfg.control_timeout_s))
        return {t.name: t.dim for t in reply.tables}

    def scan_rows(self, table: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Every stored row of `table` on every shard: (ids uint64, float32 [n, dim]), each
        shard's part read at one moment (shards at slightly different ones)."""
        req = ps_pb2.ScanRowsRequest(table=table, model_fingerprint=self.shard_map.fingerprint)

        def once(stub):
            blocks = [r.rows for r in stub.ScanRows(req, timeout=self.cfg.data_timeout_s) if r.WhichOneof("body") == "rows"]
            ids = [tables.ids_from_bytes(b.ids, f"scan of table {table!r}") for b in blocks]
            values = [tables.decode_rows(b.values, b.dtype, len(i), dim, f"scan of table {table!r}")
                      for b, i in zip(blocks, ids)]
            return (np.concatenate(ids) if ids else np.zeros(0, np.uint64),
                    np.concatenate(values) if values else np.zeros((0, dim), np.float32))
        parts = self.transport.fan_out(range(self.job.num_servers), lambda s: self.transport.call(s, once))
        return (np.concatenate([parts[s][0] for s in sorted(parts)]),
                np.concatenate([parts[s][1] for s in sorted(parts)]))

    def _pull_rows_shard(self, shard: int, plan: "rows.RowPlan", step: int) -> list[np.ndarray]:
        """One shard's rows of every table of `plan` (its parts, in order): every table in one
        call (a call per table would pay a round trip each), calls of at most ROW_BLOCK_BYTES
        of ids."""
        dtype = self.row_dtype(self.cfg.pull_codec or self.job.pull_codec)
        per_call = tables.ROW_BLOCK_BYTES // 8
        calls, current, size = [], [], 0
        for part in plan.parts[shard]:
            if len(part.ids) > per_call:   # a long list: pieces of its own (rare; bytes re-encoded)
                pieces = [(part.table, part.ids[i:i + per_call], None) for i in range(0, len(part.ids), per_call)]
            else:
                pieces = [(part.table, part.ids, part.ids_bytes)]
            for piece in pieces:
                if size + len(piece[1]) > per_call and current:
                    calls.append(current)
                    current, size = [], 0
                current.append(piece)
                size += len(piece[1])
        if current:
            calls.append(current)
        if len(calls) == 1:
            return self._pull_rows_call(shard, calls[0], step, dtype)
        got: dict[str, list[np.ndarray]] = {}
        for call in calls:
            for (table, _, _), values in zip(call, self._pull_rows_call(shard, call, step, dtype)):
                got.setdefault(table, []).append(values)
        return [np.concatenate(got[part.table]) for part in plan.parts[shard]]

    def _pull_rows_call(self, shard: int, asks: list[tuple], step: int, dtype: int) -> list[np.ndarray]:
        """One PullRows call: each (table, ids, ids' wire bytes or None) answered with its rows,
        in the order asked."""
        req = ps_pb2.PullRowsRequest(caller=self._caller(), shard=shard, step=step, dtype=dtype,
                                     model_fingerprint=self.shard_map.fingerprint,
                                     rows=[ps_pb2.RowBlock(table=t, ids=tables.ids_to_bytes(i) if b is None else b)
                                           for t, i, b in asks])

        itemsize = tables.ROW_ITEMSIZE[dtype]
        reply_bytes = sum(len(i) * (8 + self._tables[t].dim * itemsize) + 160 for t, i, _ in asks)

        def read(stub):
            """The reply's blocks: one message when it fits (no stream, no thread per call)."""
            if reply_bytes <= BATCH_BYTES:
                return stub.PullRowsBatch(req, timeout=self.cfg.data_timeout_s).rows
            replies = stub.PullRows(req, timeout=self.cfg.data_timeout_s)
            first = next(replies, None)
            if first is None or first.WhichOneof("body") != "header":
                raise Internal(f"shard {shard} answered a row pull without a header first")
            return [r.rows for r in replies]

        return self._on_shard(shard, lambda stub: self._decode_rows(shard, asks, read(stub)))

    def _decode_rows(self, shard: int, asks: list[tuple], blocks) -> list[np.ndarray]:
        """The rows of each (table, ids, ...) of `asks` from a reply's blocks, counted as received."""
        wire = 0
        if len(blocks) == len(asks):   # the usual answer: a block per table asked, in order
            out = []
            for b, (table, ids, _) in zip(blocks, asks):
                values = b.values
                wire += len(b.ids) + len(values)
                if b.table != table or len(b.ids) != 8 * len(ids):
                    out = None
                    break
                out.append(tables.decode_rows(values, b.dtype, len(ids), self._tables[table].dim,
                                              f"shard {shard} rows"))
            if out is not None:
                self._count_received(out, wire)
                return out
        out = self._rows_in_order(shard, asks, blocks)
        self._count_received(out, sum(len(b.ids) + len(b.values) for b in blocks))
        return out

    def _rows_in_order(self, shard: int, asks: list[tuple], blocks) -> list[np.ndarray]:
        """The rows of each ask from a reply whose blocks split a table's rows over several."""
        by_table: dict[str, list[np.ndarray]] = {}
        for b in blocks:
            if b.table not in self._tables:
                raise Internal(f"shard {shard} answered rows of table {b.table!r}, which was not asked")
            by_table.setdefault(b.table, []).append(tables.decode_rows(
                b.values, b.dtype, len(b.ids) // 8, self._tables[b.table].dim, f"shard {shard} rows"))
        out = []
        for table, ids, _ in asks:   # a table asked twice in one call (a long list) is answered in order
            parts = by_table.get(table, [])
            values = np.concatenate(parts) if parts else np.zeros((0, self._tables[table].dim), np.float32)
            if len(values) < len(ids):
                raise Internal(f"shard {shard} answered {len(values)} rows of table {table!r} for {len(ids)} ids")
            out.append(values[:len(ids)])
            by_table[table] = [values[len(ids):]]
        return out

    def _count_received(self, values: list[np.ndarray], wire: int) -> None:
        with self._lock:
            self.traffic.logical_received += sum(v.size for v in values) * 4
            self.traffic.wire_received += wire

    def submit(self, fn, *args):
        return self.transport.submit(fn, *args)

    def step_done(self, step: int) -> None:
        """A push of `step` was acknowledged by every shard: the next step is ours to compute."""
        self.session.advance_clock(step + 1)
        if self._settles:
            # say so now, not at our next read: a step must not wait for a worker that is done
            # pushing (it may read the model, or sit idle, before it leaves)
            self._start_settle(step + 1)

    def skip_step(self) -> None:
        """Sit out the step we are on, having no data for it (sync; right after a pull of that
        step): our clock moves past it without a push, and our next pull, of the step after,
        has the shards count us in it without a gradient (psserver/consistency/sync.py: a
        worker excused from a step is not in its average)."""
        self.session.advance_clock(self.session.identity.clock + 1)

    @property
    def push_codec(self) -> CodecConfig:
        return self.cfg.push_codec or self.job.push_codec

    def send_push(self, shard: int, step: int, base_version: int, feed,
                  next_rows: _NextRows | None = None) -> ps_pb2.PushReply:
        codec = self.push_codec
        header = ps_pb2.PushHeader(caller=self._caller(), shard=shard, step=step, base_version=base_version,
                                   model_fingerprint=self.shard_map.fingerprint)
        sizes = {"logical": 0, "wire": 0}
        # each gradient is compressed once per step: a retry resends the same bytes, so the
        # error-feedback residual is never taken twice
        encoded: dict[str, tuple] = {}

        def encode(k: Key, grad, pre):
            if k.key not in encoded:
                encoded[k.key] = (
                    self._compressor.compress(k.key, grad, codec, small_tensor_bytes=self.job.small_tensor_bytes,
                                              lossless=self.job.lossless) if pre is None else
                    self._compressor.encoded(*pre, lossless=self.job.lossless))
            return encoded[k.key]

        # the dense keys fit one message; the step's rows must too (they are known by now: a
        # batched shard's call starts once every gradient was handed over)
        batched = self.fits_batch(shard) and (not self._tables or
                                              self._plan.dense_bytes[shard] + row_bytes(feed) <= BATCH_BYTES)
        plan = self._plan
        frames = lambda: encoded_frames(feed, encode, sizes)   # noqa: E731
        fused = may_fuse(self.cfg.fuse, self.job.mode, self.session.identity.observer, batched)
        row_asks, row_dtype = self._fused_row_asks(shard, next_rows) if fused else ([], 0)
        if fused:
            pull_keys = [k.key for k in plan.pull_groups[shard][0]]
            call = push_pull_call(header, frames, pull_keys, (self.cfg.pull_codec or self.job.pull_codec).to_proto(),
                                  self.cfg.data_timeout_s,
                                  pull_rows=[ps_pb2.RowBlock(table=t, ids=b) for t, _, b in row_asks],
                                  pull_rows_dtype=row_dtype)
        else:
            call = push_call(header, frames, batched, self.cfg.data_timeout_s)
        reply = self._on_shard(shard, call)
        served = fused and reply.HasField("header")   # ssp may answer without: the next pull calls
        row_values = self._fused_row_values(shard, row_asks, reply) if served and row_asks else None
        with self._lock:
            self.traffic.logical_sent += sizes["logical"]
            self.traffic.wire_sent += sizes["wire"]
            if served:
                self._fused[shard] = _Fused(step + 1, header.caller.incarnation, plan, reply)
            if row_values is not None:
                self._fused_rows[shard] = _FusedRows(step + 1, header.caller.incarnation, next_rows, row_values)
        return reply.push if fused else reply

    def _fused_row_asks(self, shard: int, next_rows: _NextRows | None) -> tuple[list[tuple], int]:
        """(table, ids, ids' bytes) of the next step's rows on `shard` that a fused push asks
        for, and their dtype: none when the shard holds none of them, or when their reply
        could pass a one-message reply's size (the next pull_rows asks the shard then)."""
        parts = next_rows.plan.parts.get(shard, []) if next_rows is not None else []
        if not parts:
            return [], 0
        dtype = self.row_dtype(self.cfg.pull_codec or self.job.pull_codec)
        itemsize = tables.ROW_ITEMSIZE[dtype]
        size = sum(len(p.ids) * (8 + self._tables[p.table].dim * itemsize) + 160 for p in parts)
        if size > BATCH_BYTES:
            return [], 0
        return [(p.table, p.ids, p.ids_bytes) for p in parts], dtype

    def _fused_row_values(self, shard: int, asks: list[tuple], reply: ps_pb2.PushPullReply) -> list[np.ndarray] | None:
        """The rows of `asks` in a served fused reply, or None when it brought none (the server
        refused the lookup after applying the push: the next pull_rows asks again, and hears why)."""
        if not reply.rows:
            return None
        try:
            return self._decode_rows(shard, asks, reply.rows)
        except PSError as exc:   # the push is acknowledged all the same; the rows are asked again
            log.debug("shard %d: rows of a fused reply not taken: %s", shard, exc)
            return None

