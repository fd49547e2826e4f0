"""ShardClient: a worker's connection to the cluster, in numpy terms.

It joins the scheduler, fixes the model's parameter set, and fans pulls and pushes out to
every shard in parallel (one stream per shard), with deadlines and retries. Torch lives one
level up (worker.api); this module moves flat float32 arrays keyed by parameter name.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from shardps.pscommon import codecs, grpcutil
from shardps.pscommon.config import CodecConfig, JobSpec
from shardps.pscommon.errors import (Aborted, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument,
                             PSError, Unavailable, from_rpc_error)
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.sharding import Param, ShardMap
from shardps.pscommon.framing import BATCH_BYTES, batch, chunk_frames, chunk_of, parameter_server_stub
from shardps.pscommon.tensors import ChunkAssembler
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, tensor_pb2
from shardps.worker.compression import ErrorFeedback

log = logging.getLogger("shardps.worker")


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    scheduler: str
    name: str = ""
    push_codec: CodecConfig | None = None     # None: the job's
    control_timeout_s: float = grpcutil.CONTROL_TIMEOUT_S
    data_timeout_s: float = grpcutil.DATA_TIMEOUT_S
    connect_timeout_s: float = 120.0          # waiting for the scheduler and all servers
    retry_deadline_s: float = 120.0           # retrying one pull/push on a retryable error
    max_tensor_bytes: int = 64 << 20
    pull_streams: int = 2                     # concurrent Pull streams per shard
    security: Security = NO_SECURITY


@dataclasses.dataclass
class Traffic:
    logical_sent: int = 0
    wire_sent: int = 0
    logical_received: int = 0
    wire_received: int = 0
    decode_s: float = 0.0      # decoding pulled tensors into the caller's arrays


class ShardClient:
    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.sched = scheduler_pb2_grpc.SchedulerStub(grpcutil.channel(cfg.scheduler, cfg.security))
        self.lock = threading.Lock()
        self.job: JobSpec | None = None
        self.shard_map: ShardMap | None = None
        self.worker_id = -1
        self.incarnation = 0
        self.epoch = 0
        self.clock = 0
        self.shard_versions: dict[int, int] = {}
        self.traffic = Traffic()
        self._stubs: dict[int, tuple[str, ps_pb2_grpc.ParameterServerStub]] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="fanout")
        self._stop = threading.Event()
        self._expired = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self.expired_incarnation = 0
        self.observer = False
        self.compressor = ErrorFeedback()
        self._rejoin_lock = threading.Lock()

    # -- membership ----------------------------------------------------------------------
    def join(self) -> None:
        req = scheduler_pb2.JoinWorkerRequest(name=self.cfg.name, worker_id=-1)
        reply = grpcutil.retry(lambda: grpcutil.call(self.sched.JoinWorker, req, self.cfg.control_timeout_s),
                               self.cfg.connect_timeout_s)
        self._adopt_lease(reply)
        if self._hb_thread is None:
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat")
            self._hb_thread.start()

    def attach(self) -> ShardMap:
        """Read-only access (operators, evaluation, export): learn the job, its servers and
        shard map without joining; pulls skip the consistency gate."""
        info = self._job_info()
        if not info.shard_map.fingerprint:
            raise FailedPrecondition("no model has been declared in this job yet")
        self.job = JobSpec.from_proto(info.job)
        self.shard_map = ShardMap.from_proto(info.shard_map)
        self.observer = True
        self._set_servers({s.shard: s.address for s in info.servers
                           if s.state == scheduler_pb2.MEMBER_STATE_ALIVE})
        return self.shard_map

    def rejoin(self, stale_incarnation: int | None = None) -> None:
        """Join again under the same id and a new incarnation (after being declared dead).

        With `stale_incarnation`, only if that is still ours: the heartbeat thread and a
        refused push may both notice the same expiry, and one rejoin is enough.
        """
        with self._rejoin_lock:
            if stale_incarnation is not None and stale_incarnation != self.incarnation:
                return
            req = scheduler_pb2.JoinWorkerRequest(name=self.cfg.name, worker_id=self.worker_id)
            reply = grpcutil.retry(
                lambda: grpcutil.call(self.sched.JoinWorker, req, self.cfg.control_timeout_s),
                self.cfg.connect_timeout_s)
            self._adopt_lease(reply)
        log.warning("worker %d rejoined as incarnation %d at clock %d", self.worker_id,
                    self.incarnation, self.clock)

    def _adopt_lease(self, reply) -> None:
        with self.lock:
            self.job = JobSpec.from_proto(reply.job)
            self.worker_id = reply.lease.member_id
            self.incarnation = reply.lease.incarnation
            self.epoch = reply.epoch
            self.clock = max(self.clock, reply.start_clock)
            self._expired.clear()

    def _heartbeat_loop(self) -> None:
        # at least once a second: the scheduler's view of clocks (status, joiners) stays fresh
        while not self._stop.wait(min(1.0, self.job.heartbeat_timeout_s / 3)):
            req = scheduler_pb2.HeartbeatRequest(role=scheduler_pb2.ROLE_WORKER, member_id=self.worker_id,
                                                 incarnation=self.incarnation, clock=self.clock)
            try:
                self.epoch = grpcutil.call(self.sched.Heartbeat, req, self.cfg.control_timeout_s).epoch
            except FailedPrecondition as exc:
                log.warning("heartbeat refused: %s", exc)
                self._expired.set()
                self.expired_incarnation = req.incarnation
            except PSError as exc:  # the scheduler is away: keep training on the last view
                log.debug("heartbeat failed: %s", exc)

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def leave(self) -> None:
        self._stop.set()
        if self.worker_id >= 0:
            req = scheduler_pb2.LeaveRequest(role=scheduler_pb2.ROLE_WORKER, member_id=self.worker_id,
                                             incarnation=self.incarnation, clock=self.clock)
            try:
                grpcutil.call(self.sched.Leave, req, self.cfg.control_timeout_s)
            except PSError as exc:
                log.warning("leave failed: %s", exc)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- data leases ---------------------------------------------------------------------
    def acquire_partition(self, num_partitions: int, max_epochs: int) -> tuple[int, int, int]:
        """(LeaseStatus, data epoch, partition) from the scheduler."""
        req = scheduler_pb2.AcquirePartitionRequest(worker_id=self.worker_id, incarnation=self.incarnation,
                                                    num_partitions=num_partitions, max_epochs=max_epochs)
        reply = grpcutil.retry(lambda: grpcutil.call(self.sched.AcquirePartition, req, self.cfg.control_timeout_s),
                               self.cfg.retry_deadline_s)
        return reply.status, reply.epoch, reply.partition

    def complete_partition(self, epoch: int, partition: int) -> None:
        req = scheduler_pb2.CompletePartitionRequest(worker_id=self.worker_id, incarnation=self.incarnation,
                                                     epoch=epoch, partition=partition)
        grpcutil.retry(lambda: grpcutil.call(self.sched.CompletePartition, req, self.cfg.control_timeout_s),
                       self.cfg.retry_deadline_s)

    # -- model ---------------------------------------------------------------------------
    def _job_info(self) -> scheduler_pb2.JobInfo:
        return grpcutil.call(self.sched.GetJob, scheduler_pb2.GetJobRequest(), self.cfg.control_timeout_s)

    def wait_for_servers(self) -> None:
        """Block until every shard has a live server (deadline: connect_timeout_s)."""
        def ready():
            info = self._job_info()
            alive = {s.shard: s.address for s in info.servers if s.state == scheduler_pb2.MEMBER_STATE_ALIVE}
            if len(alive) < info.job.num_servers:
                raise Unavailable(f"{len(alive)} of {info.job.num_servers} servers registered")
            self._set_servers(alive)
        grpcutil.retry(ready, self.cfg.connect_timeout_s, backoff=grpcutil.Backoff(0.05, 0.5))

    def wait_for_workers(self, n: int) -> None:
        """Block until at least `n` workers are alive (a start gate, so a sync job's first
        steps are not taken by whoever connected first)."""
        def ready():
            st = grpcutil.call(self.sched.Status, scheduler_pb2.StatusRequest(), self.cfg.control_timeout_s)
            alive = sum(1 for w in st.workers if w.state == scheduler_pb2.MEMBER_STATE_ALIVE)
            if alive < n:
                raise Unavailable(f"{alive} of {n} workers alive")
        grpcutil.retry(ready, self.cfg.connect_timeout_s, backoff=grpcutil.Backoff(0.05, 0.5))

    def _set_servers(self, addresses: dict[int, str]) -> None:
        with self.lock:
            for shard, address in addresses.items():
                current = self._stubs.get(shard)
                if current is None or current[0] != address:
                    self._stubs[shard] = (address, parameter_server_stub(
                        grpcutil.channel(address, self.cfg.security)))

    def _refresh_servers(self) -> None:
        try:
            info = self._job_info()
        except PSError as exc:
            log.debug("cannot refresh servers: %s", exc)
            return
        self._set_servers({s.shard: s.address for s in info.servers
                           if s.state == scheduler_pb2.MEMBER_STATE_ALIVE})

    def declare(self, initial: dict[str, np.ndarray]) -> ShardMap:
        """Fix the parameter set at the scheduler and create the keys on every shard.

        Idempotent: a second worker (or a restart) with the same model keeps trained values.
        """
        params = [Param(name, tensor_pb2.DTYPE_FLOAT32, tuple(a.shape)) for name, a in initial.items()]
        req = scheduler_pb2.DeclareModelRequest(params=[
            scheduler_pb2.ParamSpec(name=p.name, dtype=p.dtype, shape=p.shape) for p in params])
        info = grpcutil.call(self.sched.DeclareModel, req, self.cfg.control_timeout_s)
        self.shard_map = ShardMap.from_proto(info.shard_map)
        self.compressor.reset()  # residuals are per key; keys come from this map
        flat = {name: np.ascontiguousarray(a, dtype=np.float32).reshape(-1) for name, a in initial.items()}
        self._fan_out(lambda shard: self._declare_shard(shard, flat))
        return self.shard_map

    def _declare_shard(self, shard: int, flat: dict[str, np.ndarray]) -> None:
        keys = self.shard_map.keys_of(shard)
        header = ps_pb2.DeclareHeader(model_fingerprint=self.shard_map.fingerprint, shard=shard,
                                      keys=[k.to_proto() for k in keys], job=self.job.to_proto())

        def requests():
            yield ps_pb2.DeclareRequest(header=header)
            for k in keys:
                value = flat[k.param][k.offset:k.offset + k.length]
                meta, payload = codecs.encode(k.key, value, tensor_pb2.DTYPE_FLOAT32)
                yield from chunk_frames(meta, payload)
        self._with_retry(shard, lambda stub: stub.Declare(requests(), timeout=self.cfg.data_timeout_s))

    # -- data path -------------------------------------------------------------------------
    def _stub(self, shard: int) -> ps_pb2_grpc.ParameterServerStub:
        with self.lock:
            return self._stubs[shard][1]

    def _with_retry(self, shard: int, fn):
        """Run fn(stub) with retries on retryable errors (not ABORTED: the caller re-pulls);
        after UNAVAILABLE, re-resolve the shard's address from the scheduler."""
        def attempt():
            try:
                return fn(self._stub(shard))
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                if isinstance(exc, Unavailable):
                    self._refresh_servers()
                raise exc from None
        return grpcutil.retry(attempt, self.cfg.retry_deadline_s,
                              retry_on=lambda e: e.retryable and not isinstance(e, Aborted))

    def _fan_out(self, fn) -> dict[int, object]:
        shards = range(self.job.num_servers)
        futs = {s: self._pool.submit(fn, s) for s in shards}
        return {s: f.result() for s, f in futs.items()}

    def pull(self, into: dict[str, np.ndarray]) -> None:
        """Fill `into` (flat float32 arrays by parameter name) with current values.

        Each shard's keys are read over up to `pull_streams` concurrent streams: reads are
        idempotent, and several streams keep the server's threads and the TCP connection busy
        where one stream would serialize encode, send and decode. A shard's keys of at most
        BATCH_BYTES come in one PullBatch call instead.
        """
        tasks = [(shard, group) for shard in range(self.job.num_servers)
                 for group in self._pull_groups(shard)]
        results: dict[int, list[tuple[int, int]]] = {}
        if len(tasks) == 1:  # one call: no hand-off to a pool thread and back
            results[tasks[0][0]] = [self._pull_keys(*tasks[0], into)]
        else:
            futs = [self._pool.submit(self._pull_keys, shard, group, into) for shard, group in tasks]
            for (shard, _), fut in zip(tasks, futs):
                results.setdefault(shard, []).append(fut.result())
        with self.lock:
            # the smallest step any shard is on: shards learn of a joiner at slightly different
            # times, and one may still wait for our push of a step the others finished
            # without us (they answer that push with ABORTED, and we pull again)
            self.clock = max(self.clock, min(step for rs in results.values() for _, step in rs))
            for shard, rs in results.items():
                self.shard_versions[shard] = min(version for version, _ in rs)

    def _pull_groups(self, shard: int) -> list[list]:
        """The shard's keys in at most `pull_streams` groups of about equal bytes (one group
        when they fit in one PullBatch)."""
        keys = sorted(self.shard_map.keys_of(shard), key=lambda k: (-k.nbytes, k.key))
        small = sum(k.nbytes for k in keys) <= BATCH_BYTES
        n = 1 if small else max(1, min(self.cfg.pull_streams, len(keys)))
        groups, loads = [[] for _ in range(n)], [0] * n
        for k in keys:
            i = loads.index(min(loads))
            groups[i].append(k)
            loads[i] += k.nbytes
        return groups

    def _pull_keys(self, shard: int, group: list, into: dict[str, np.ndarray]) -> tuple[int, int]:
        keys = {k.key: k for k in group}
        req = ps_pb2.PullRequest(caller=self._caller(), shard=shard, step=self.clock, keys=list(keys),
                                 codec=self.job.pull_codec.to_proto(),
                                 model_fingerprint=self.shard_map.fingerprint)

        batched = sum(k.nbytes for k in group) <= BATCH_BYTES

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
            asm = ChunkAssembler(self.cfg.max_tensor_bytes, 1 << 62)
            logical, wire, decode_s, seen = 0, 0, 0.0, set()
            header, chunks = read(stub)
            if header is None:
                raise Internal(f"shard {shard} answered a pull without a header first")
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
                value = codecs.decode(meta, payload, k.length)
                into[k.param][k.offset:k.offset + k.length] = value.reshape(-1)
                decode_s += time.perf_counter() - start
                seen.add(meta.name)
                logical += k.length * 4
                wire += len(payload)
            asm.finish()
            if len(seen) != len(keys):
                raise Internal(f"shard {shard} answered a pull with {len(seen)} of {len(keys)} keys")
            with self.lock:
                self.traffic.logical_received += logical
                self.traffic.wire_received += wire
                self.traffic.decode_s += decode_s
            return header.shard_version, header.next_step
        return self._with_retry(shard, once)

    def push(self, grads: dict[str, np.ndarray]) -> list[ps_pb2.PushReply]:
        """Push flat float32 gradients (by parameter name) for the current clock, then advance it.

        Raises Aborted in sync mode when the step completed without this worker: pull again.
        """
        stream = self.start_push(eager=False)
        for name, g in grads.items():
            stream.add(name, g)
        return stream.finish()

    def start_push(self, eager: bool = True) -> "StreamingPush":
        """A push for the current clock whose gradients arrive one parameter at a time. eager:
        each shard's call starts with its first gradient (for autograd hooks: sending overlaps
        the rest of backward); otherwise every call starts in finish()."""
        return StreamingPush(self, self.clock, eager)

    def _push_shard(self, shard: int, step: int, base_version: int, feed: "_Feed") -> ps_pb2.PushReply:
        codec = self.cfg.push_codec or self.job.push_codec
        header = ps_pb2.PushHeader(caller=self._caller(), shard=shard, step=step, base_version=base_version,
                                   model_fingerprint=self.shard_map.fingerprint)
        sizes = {"logical": 0, "wire": 0}
        # each gradient is compressed once per step: a retry resends the same bytes, so the
        # error-feedback residual is never taken twice
        encoded: dict[str, tuple] = {}

        def frames():
            sizes["logical"] = sizes["wire"] = 0  # a retry sends everything again
            for k, g, pre in feed:
                if k.key not in encoded:
                    encoded[k.key] = (
                        self.compressor.compress(k.key, g, codec, small_tensor_bytes=self.job.small_tensor_bytes,
                                                 lossless=self.job.lossless) if pre is None else
                        self.compressor.encoded(*pre, lossless=self.job.lossless))
                meta, payload = encoded[k.key]
                sizes["logical"] += k.nbytes
                sizes["wire"] += memoryview(payload).nbytes
                yield from chunk_frames(meta, payload)

        if self.fits_batch(shard):
            message = batch(ps_pb2.PushBatchRequest(header=header), list(frames()))
            call = lambda stub: stub.PushBatch(message, timeout=self.cfg.data_timeout_s)  # noqa: E731
        else:
            call = lambda stub: stub.Push(  # noqa: E731
                itertools.chain([ps_pb2.PushRequest(header=header)], frames()), timeout=self.cfg.data_timeout_s)
        reply = self._with_retry(shard, call)
        with self.lock:
            self.traffic.logical_sent += sizes["logical"]
            self.traffic.wire_sent += sizes["wire"]
        return reply

    def fits_batch(self, shard: int) -> bool:
        """Whether a push of every key of `shard` goes as one PushBatch message."""
        return sum(k.nbytes for k in self.shard_map.keys_of(shard)) <= BATCH_BYTES

    def _caller(self) -> ps_pb2.Caller:
        return ps_pb2.Caller(worker_id=max(self.worker_id, 0), incarnation=self.incarnation,
                             observer=self.observer)


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


class StreamingPush:
    """One step's push, fed parameter by parameter; each shard's Push stream starts as soon
    as its first gradient arrives, so sending overlaps the rest of the backward pass."""

    def __init__(self, client: ShardClient, step: int, eager: bool = True):
        self.client = client
        self.step = step
        self.eager = eager
        with client.lock:
            # the versions the gradients are computed on: a prefetched pull may move them on
            # before every shard's call has started
            self.base_versions = dict(client.shard_versions)
        smap = client.shard_map
        self.feeds = {s: _Feed(len(smap.keys_of(s)), client.cfg.data_timeout_s)
                      for s in range(client.job.num_servers)}
        self.futures: dict[int, futures.Future] = {}
        self.seen: set[str] = set()
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

    def _start(self, shard: int) -> None:
        self.futures[shard] = self.client._pool.submit(self.client._push_shard, shard, self.step,
                                                       self.base_versions.get(shard, 0), self.feeds[shard])

    def abandon(self) -> None:
        """Give up this step's push: streams already started end at once instead of waiting
        out the deadline for gradients that will not come (the server applies nothing)."""
        for feed in self.feeds.values():
            feed.abandon()

    def missing(self) -> list[str]:
        return [p.name for p in self.client.shard_map.params if p.name not in self.seen]

    def finish(self) -> list[ps_pb2.PushReply]:
        """Wait for every shard's stream; then the clock moves to the next step."""
        missing = self.missing()
        if missing:
            raise InvalidArgument(f"no gradient for parameters {missing[:5]} in step {self.step}")
        shards = [s for s, feed in self.feeds.items() if feed.expected]  # a shard may hold no keys
        if not self.eager and len(shards) == 1:  # one call: no hand-off to a pool thread
            replies = [self.client._push_shard(shards[0], self.step, self.base_versions.get(shards[0], 0),
                                               self.feeds[shards[0]])]
        else:
            for shard in shards:
                if shard not in self.futures:
                    self._start(shard)
            replies = [f.result() for _, f in sorted(self.futures.items())]
        with self.client.lock:
            self.client.clock = self.step + 1
        return replies


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `predicate` until true or the deadline passes."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
