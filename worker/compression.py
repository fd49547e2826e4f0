"""Push-side compression on the worker: error feedback and per-tensor compression stats.

Error feedback keeps, per tensor, what lossy compression dropped (residual = what should
have been sent - what was sent) and adds it to the next gradient of that tensor. Over any
number of steps, sum(sent) + residual == sum(true gradients), so nothing is lost, only
delayed; that is what lets top-k at 1% density train at all.

One ErrorFeedback lives for the life of a worker. Call `compress` exactly once per tensor per
step and resend the same bytes on a retry: compressing again would apply the residual twice.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from shardps.pscommon import codecs
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tensors import numel, numpy_dtype
from shardps.pscommon.wire.v1 import tensor_pb2


@dataclasses.dataclass
class TensorStats:
    """Compression of one tensor: the last push, and totals since the worker started."""

    codec: str = ""            # the codec actually used (e.g. CODEC_RAW for a small tensor)
    lossless: str = ""         # LOSSLESS_ZSTD / LOSSLESS_LZ4 when the layer applied, else ""
    logical_bytes: int = 0     # numel x wire dtype size: what an uncompressed push would send
    wire_bytes: int = 0        # len(payload) after the lossless layer
    header_bytes: int = 0      # serialized TensorMeta
    encode_s: float = 0.0      # error feedback + codec + lossless layer
    total_logical_bytes: int = 0
    total_wire_bytes: int = 0
    total_header_bytes: int = 0
    total_encode_s: float = 0.0
    pushes: int = 0

    @property
    def ratio(self) -> float:
        """Logical / wire bytes over all pushes (headers included); 0 before the first push."""
        wire = self.total_wire_bytes + self.total_header_bytes
        return self.total_logical_bytes / wire if wire else 0.0


class ErrorFeedback:
    """Compresses pushes tensor by tensor, carrying each lossy codec's error to the next step.

    Thread-safe across tensors (the client pushes shards from a pool); a single tensor must
    not be compressed from two threads at once, which the one-push-per-step client never does.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._residual: dict[str, np.ndarray] = {}
        self._stats: dict[str, TensorStats] = {}
        # per tensor, whether the lossless layer pays (pscommon/codecs/lossless.py, Decisions)
        self.lossless = codecs.Decisions()

    def compress(self, name: str, grad: np.ndarray, cfg: CodecConfig, *,
                 wire_dtype: int = tensor_pb2.DTYPE_FLOAT32, small_tensor_bytes: int = 0,
                 lossless: str = "off", rng: np.random.Generator | None = None):
        """(meta, payload) for one gradient, as codecs.encode, with error feedback applied
        when the codec is lossy and cfg.error_feedback is set."""
        start = time.perf_counter()
        feedback = cfg.error_feedback and codecs.get(cfg.codec, name).lossy
        if feedback:
            meta, payload = self._encode_with_feedback(name, grad, cfg, wire_dtype,
                                                       small_tensor_bytes, rng)
        else:
            meta, payload = codecs.encode_codec(name, grad, wire_dtype, cfg, small_tensor_bytes, rng)
        payload = codecs.apply_lossless(meta, payload, lossless, self.lossless)
        logical = grad.size * numpy_dtype(wire_dtype).itemsize
        self._record(name, meta, logical, len(payload), time.perf_counter() - start)
        return meta, payload

    def encoded(self, meta: tensor_pb2.TensorMeta, payload, *, lossless: str = "off"):
        """(meta, payload) for a gradient already encoded by its codec (on the device, error
        feedback applied there: worker/device_codec.py): the lossless layer and the stats
        are what is left."""
        expected = codecs.get(meta.codec, meta.name).payload_size(meta)
        if len(payload) != expected:
            raise InvalidArgument(f"tensor {meta.name!r}: encoded payload of {len(payload)} bytes, "
                                  f"its codec needs {expected}")
        start = time.perf_counter()
        payload = codecs.apply_lossless(meta, payload, lossless, self.lossless)
        logical = numel(meta.shape) * 4
        self._record(meta.name, meta, logical, len(payload), time.perf_counter() - start)
        return meta, payload

    def _encode_with_feedback(self, name, grad, cfg, wire_dtype, small_tensor_bytes, rng):
        with self._lock:
            residual = self._residual.get(name)
        if residual is not None and residual.shape != grad.shape:
            raise InvalidArgument(
                f"tensor {name!r}: gradient of shape {list(grad.shape)} but its error-feedback "
                f"residual has shape {list(residual.shape)}; call reset() after re-sharding")
        # a new array either way: the caller's gradient stays as is
        corrected = (np.array(grad, dtype=np.float32) if residual is None else
                     np.add(grad, residual, dtype=np.float32))
        meta, payload = codecs.encode_codec(name, corrected, wire_dtype, cfg, small_tensor_bytes, rng)
        codec = codecs.get(meta.codec)
        if not codec.lossy:
            # Went raw (a small tensor): everything was sent, nothing is left over.
            with self._lock:
                self._residual.pop(name, None)
            return meta, payload
        # Decode the codec payload itself (before any lossless layer) to learn what the server
        # will see; the residual is exactly what it will not.
        with np.errstate(invalid="ignore", over="ignore"):  # handled just below
            if meta.codec == tensor_pb2.CODEC_TOPK:
                # only the k sent elements change (x - 0 is x, bit for bit): no dense decode
                values, idx = codec.sparse(meta, payload)
                corrected.reshape(-1)[idx] -= values
            else:
                corrected -= codec.decode(meta, payload).reshape(corrected.shape)
            finite = np.isfinite(corrected.sum())
        # fp16 overflow sends inf (and top-k may send an inf gradient): inf - inf is NaN, and a
        # non-finite residual would poison every later push of this tensor. Those elements were
        # sent as well as the codec can; drop their remainder. The sum is a cheap finiteness test
        # (it is non-finite if any element is, or on overflow) and only then does a mask run.
        if not finite:
            corrected[~np.isfinite(corrected)] = 0.0
        with self._lock:
            self._residual[name] = corrected
        return meta, payload

    def _record(self, name, meta, logical, wire, seconds):
        header = meta.ByteSize()
        with self._lock:
            s = self._stats.setdefault(name, TensorStats())
            s.codec = tensor_pb2.Codec.Name(meta.codec)
            s.lossless = (tensor_pb2.Lossless.Name(meta.lossless.algorithm)
                          if meta.HasField("lossless") else "")
            s.logical_bytes, s.wire_bytes, s.header_bytes, s.encode_s = logical, wire, header, seconds
            s.total_logical_bytes += logical
            s.total_wire_bytes += wire
            s.total_header_bytes += header
            s.total_encode_s += seconds
            s.pushes += 1

    def residual(self, name: str) -> np.ndarray | None:
        """A copy of the carried error of one tensor (None if nothing is carried)."""
        with self._lock:
            r = self._residual.get(name)
            return None if r is None else r.copy()

    def reset(self, name: str | None = None) -> None:
        """Forget carried error: of one tensor, or of all (e.g. when the shard map changes the
        key ranges, or the model is re-declared)."""
        with self._lock:
            if name is None:
                self._residual.clear()
            else:
                self._residual.pop(name, None)

    def stats(self) -> dict[str, TensorStats]:
        """A snapshot of per-tensor stats, for metrics and status."""
        with self._lock:
            return {k: dataclasses.replace(v) for k, v in self._stats.items()}

    def totals(self) -> TensorStats:
        """All tensors summed (last-push fields summed over each tensor's last push)."""
        out = TensorStats(codec="*")
        for s in self.stats().values():
            out.logical_bytes += s.logical_bytes
            out.wire_bytes += s.wire_bytes
            out.header_bytes += s.header_bytes
            out.encode_s += s.encode_s
            out.total_logical_bytes += s.total_logical_bytes
            out.total_wire_bytes += s.total_wire_bytes
            out.total_header_bytes += s.total_header_bytes
            out.total_encode_s += s.total_encode_s
            out.pushes += s.pushes
        return out
