"""Helpers for the RPC tier: build real requests with the generated stubs and read replies.

Everything here talks to a real ParameterServer over a real gRPC channel; nothing is mocked.
"""
from __future__ import annotations

import threading
import time
from typing import Iterable

import grpc
import numpy as np
import pytest

from shardps.pscommon import codecs, framing, grpcutil, sharding
from shardps.pscommon.config import JobSpec
from shardps.pscommon.tensors import ChunkAssembler, chunk_payload
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, tensor_pb2
from shardps.psserver.servicer import Limits, ParameterServerServicer
from shardps.psserver.shard import Shard, WorkerView

F32 = tensor_pb2.DTYPE_FLOAT32
TIMEOUT_S = 30.0  # generous: the machine is small and shared


def poll(predicate, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Poll until `predicate()` is truthy (returns it); fail at the deadline. (The same contract as
    conftest.poll, which a test package cannot import by a relative name.)"""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


# -- the model -----------------------------------------------------------------------------
def shard_map(shapes: dict[str, tuple[int, ...]], num_shards: int = 1,
              slice_bytes: int = 1 << 30) -> sharding.ShardMap:
    """A real shard map (keys, fingerprint) for float32 parameters of these shapes."""
    params = [sharding.Param(name, F32, tuple(shape)) for name, shape in shapes.items()]
    return sharding.build(params, num_shards, slice_bytes)


def initial_values(smap: sharding.ShardMap, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic flat float32 initial values, one per key."""
    rng = np.random.default_rng(seed)
    return {k.key: rng.standard_normal(k.length).astype(np.float32) for k in smap.keys}


# -- requests ------------------------------------------------------------------------------
def tensor_chunks(name: str, value: np.ndarray, chunk_bytes: int | None = None
                  ) -> list[tensor_pb2.TensorChunk]:
    """The real chunks of one float32 tensor (raw codec)."""
    meta, payload = codecs.encode(name, np.ascontiguousarray(value, dtype=np.float32), F32)
    if chunk_bytes is None:
        return list(chunk_payload(meta, payload))
    return list(chunk_payload(meta, payload, chunk_bytes))


def declare_requests(fingerprint: str, keys: Iterable[sharding.Key], values: dict[str, np.ndarray],
                     shard: int = 0, job: JobSpec | None = None, chunk_bytes: int | None = None):
    keys = list(keys)
    yield ps_pb2.DeclareRequest(header=ps_pb2.DeclareHeader(
        model_fingerprint=fingerprint, shard=shard, keys=[k.to_proto() for k in keys],
        job=(job or JobSpec()).to_proto()))
    for k in keys:
        if k.key in values:
            for chunk in tensor_chunks(k.key, values[k.key], chunk_bytes):
                yield ps_pb2.DeclareRequest(chunk=chunk)


def declare(stub, smap: sharding.ShardMap, values: dict[str, np.ndarray], shard: int = 0,
            keys: Iterable[sharding.Key] | None = None, timeout: float = TIMEOUT_S
            ) -> ps_pb2.DeclareReply:
    keys = list(smap.keys_of(shard) if keys is None else keys)
    return stub.Declare(declare_requests(smap.fingerprint, keys, values, shard), timeout=timeout)


def caller(worker: int = 0, incarnation: int = 1, observer: bool = False, credential: bytes = b"") -> ps_pb2.Caller:
    return ps_pb2.Caller(worker_id=worker, incarnation=incarnation, observer=observer, credential=credential)


def push_header(fingerprint: str, worker: int = 0, incarnation: int = 1, step: int = 0,
                base_version: int = 0, shard: int = 0, credential: bytes = b"") -> ps_pb2.PushRequest:
    return ps_pb2.PushRequest(header=ps_pb2.PushHeader(
        caller=caller(worker, incarnation, credential=credential), shard=shard, step=step,
        base_version=base_version, model_fingerprint=fingerprint))


def push_requests(fingerprint: str, grads: dict[str, np.ndarray], worker: int = 0,
                  incarnation: int = 1, step: int = 0, base_version: int = 0, shard: int = 0,
                  chunk_bytes: int | None = None):
    yield push_header(fingerprint, worker, incarnation, step, base_version, shard)
    for name, g in grads.items():
        for chunk in tensor_chunks(name, g, chunk_bytes):
            yield ps_pb2.PushRequest(chunk=chunk)


def push(stub, fingerprint: str, grads: dict[str, np.ndarray], worker: int = 0,
         incarnation: int = 1, step: int = 0, base_version: int = 0, shard: int = 0,
         timeout: float = TIMEOUT_S) -> ps_pb2.PushReply:
    return stub.Push(push_requests(fingerprint, grads, worker, incarnation, step, base_version, shard),
                     timeout=timeout)


def raw_stream(stub_method, messages: list, timeout: float = TIMEOUT_S):
    """Send a hand-built list of messages on a client-streaming RPC."""
    return stub_method(iter(messages), timeout=timeout)


def pull(stub, fingerprint: str, worker: int = 0, incarnation: int = 1, step: int = 0,
         keys: Iterable[str] = (), shard: int = 0, observer: bool = False,
         timeout: float = TIMEOUT_S, codec: int = tensor_pb2.CODEC_UNSPECIFIED
         ) -> tuple[ps_pb2.PullHeader, dict[str, np.ndarray], int]:
    """(header, {key: flat float32 copy}, number of chunk messages) of one Pull."""
    req = ps_pb2.PullRequest(caller=caller(worker, incarnation, observer), shard=shard, step=step,
                             keys=list(keys), model_fingerprint=fingerprint)
    if codec:
        req.codec.codec = codec
    asm = ChunkAssembler(1 << 31, 1 << 62)
    header, out, chunks = None, {}, 0
    for resp in stub.Pull(req, timeout=timeout):
        if resp.WhichOneof("body") == "header":
            assert header is None, "two pull headers"
            header = resp.header
            continue
        assert header is not None, "pull chunk before the header"
        chunks += 1
        done = asm.add(resp.chunk)
        if done is not None:
            meta, payload = done
            assert meta.name not in out, f"tensor {meta.name} pulled twice"
            out[meta.name] = np.array(codecs.decode(meta, payload, 1 << 30), dtype=np.float32).reshape(-1)
    asm.finish()
    assert header is not None, "pull without a header"
    return header, out, chunks


def values(stub, fingerprint: str, shard: int = 0) -> dict[str, np.ndarray]:
    """Current values, read as an observer (no gate, no clock)."""
    return pull(stub, fingerprint, observer=True, shard=shard)[1]


def inspect(stub, sample: int = 0) -> dict[str, ps_pb2.KeyInfo]:
    reply = stub.Inspect(ps_pb2.InspectRequest(sample=sample), timeout=TIMEOUT_S)
    return {k.spec.key: k for k in reply.keys}


def status(stub) -> ps_pb2.ShardStatusReply:
    return stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=TIMEOUT_S)


def snapshot(stub, fingerprint: str) -> dict:
    """Everything observable about a shard's model state, for before/after comparisons."""
    st = status(stub)
    return {
        "inspect": {k: v.SerializeToString(deterministic=True) for k, v in inspect(stub, 64).items()},
        "values": {k: v.tobytes() for k, v in values(stub, fingerprint).items()},
        "counters": (st.keys, st.bytes, st.shard_version, st.pushes, st.pulls, st.duplicates,
                     dict(st.clocks), st.completed_step),
    }


# -- a shard server that hypothesis examples can start and stop themselves ------------------
class LocalShard:
    """One ParameterServer shard on 127.0.0.1:0 (the same wiring as conftest's shard_server),
    usable inside one hypothesis example, where function-scoped fixtures are not re-run."""

    def __init__(self, job: JobSpec, shard_id: int = 0, limits: Limits = Limits()):
        self.shard = Shard(shard_id, job)
        self.server = grpcutil.make_server()
        framing.add_parameter_server(ParameterServerServicer(self.shard, limits), self.server)
        self.address = grpcutil.bind(self.server, "127.0.0.1:0")
        self.server.start()
        self.channel = grpcutil.channel(self.address)
        self.stub = ps_pb2_grpc.ParameterServerStub(self.channel)

    def close(self):
        self.channel.close()
        self.server.stop(0).wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def members(workers: Iterable[int], incarnation: int = 1, clock: int = 0) -> list[WorkerView]:
    return [WorkerView(w, incarnation, True, clock) for w in workers]


# -- calls in a thread ----------------------------------------------------------------------
class Background:
    """Run one call in a thread; `done` is set when it returned or raised."""

    def __init__(self, fn, *args, **kwargs):
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        finally:
            self.done.set()

    def code(self) -> grpc.StatusCode | None:
        return self.error.code() if isinstance(self.error, grpc.RpcError) else None

    def join(self, timeout: float = TIMEOUT_S):
        assert self.done.wait(timeout), "background call did not finish"
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


KEY_W = sharding.Key("w", "w", tensor_pb2.DTYPE_FLOAT32, (2,), 0, 2, 0)   # one 2-float key on shard 0


def bare_shard(job: JobSpec, workers: Iterable[int], now=None) -> Shard:
    """A Shard driven directly (no server) whose membership view holds `workers` alive."""
    shard = Shard(0, job) if now is None else Shard(0, job, now=now)
    shard.set_view(1, [WorkerView(w, 1, True, 0) for w in workers])
    return shard
