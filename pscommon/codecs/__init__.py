"""Tensor codecs, registered by the proto Codec enum, and the encode/decode entry points.

encode: lossy codec (or raw for small tensors) -> optional lossless layer -> (meta, payload).
decode: validate meta, undo the lossless layer within bounds, check the payload length against
the codec's parameters, then decode to a dense array.
"""
from __future__ import annotations

import numpy as np

from shardps.pscommon.codecs import lossless as _lossless
from shardps.pscommon.codecs.base import Codec
from shardps.pscommon.codecs.bf16 import Bf16Codec
from shardps.pscommon.codecs.fp16 import Fp16Codec
from shardps.pscommon.codecs.int8 import Int8Codec
from shardps.pscommon.codecs.raw import RawCodec
from shardps.pscommon.codecs.topk import TopKCodec
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tensors import check_shape, numel, numpy_dtype
from shardps.pscommon.wire.v1 import tensor_pb2

REGISTRY: dict[int, Codec] = {c.wire: c for c in (RawCodec(), Fp16Codec(), Bf16Codec(), Int8Codec(),
                                                  TopKCodec())}

RAW = CodecConfig("fp32")
LOSSLESS_POLICIES = _lossless.POLICIES
# Largest bytes per element any payload needs (float64/int64 raw; int8 at block size 1 is 5,
# top-k at most 6 per kept element): bounds a lossless frame's raw size before decompressing.
MAX_BYTES_PER_ELEMENT = 8


def get(wire: int, name: str | None = None) -> Codec:
    try:
        return REGISTRY[wire]
    except KeyError:
        where = f"tensor {name!r}: " if name is not None else ""
        raise InvalidArgument(f"{where}unknown codec {wire}") from None


def encode_codec(name: str, array: np.ndarray, wire_dtype: int, cfg: CodecConfig = RAW,
                 small_tensor_bytes: int = 0, rng: np.random.Generator | None = None):
    """(meta, payload) from the codec alone, before any lossless layer.

    Tensors of at most `small_tensor_bytes` skip lossy codecs and go raw: their headers would
    outweigh the savings, and biases/norms are the parameters most hurt by quantization.
    """
    codec = get(cfg.codec, name)
    if codec.lossy and array.nbytes <= small_tensor_bytes:
        codec = REGISTRY[tensor_pb2.CODEC_RAW]
    meta = tensor_pb2.TensorMeta(name=name, dtype=wire_dtype, shape=array.shape, codec=codec.wire)
    # A flat byte view whatever the codec returned: len() is then the byte count, and a view
    # shaped like a (3, 0) array cannot be cast to bytes by memoryview.cast.
    payload = np.frombuffer(codec.encode(array, cfg, meta, rng), dtype=np.uint8).data
    return meta, payload


Decisions = _lossless.Decisions


def apply_lossless(meta: tensor_pb2.TensorMeta, payload, lossless: str = "off",
                   decisions: Decisions | None = None):
    """The payload to send after the lossless policy; fills meta.lossless when it applies.
    `decisions` (one per sender) lets a tensor the layer does not pay for skip compressing."""
    width = REGISTRY[meta.codec].shuffle_width(meta)  # meta.codec: top-k may have gone bf16
    return _lossless.apply(meta, payload, lossless, width, decisions)


def encode(name: str, array: np.ndarray, wire_dtype: int, cfg: CodecConfig = RAW,
           small_tensor_bytes: int = 0, lossless: str = "off",
           rng: np.random.Generator | None = None, decisions: Decisions | None = None):
    """(meta, payload) for one tensor; wire bytes are len(payload).

    `lossless` is 'off', 'auto' (zstd where it saves >= 10%), 'zstd' or 'lz4' (each also only
    where it saves >= 10%). `rng` drives int8 stochastic rounding and top-k sampling.
    """
    _lossless.check_policy(lossless)
    meta, payload = encode_codec(name, array, wire_dtype, cfg, small_tensor_bytes, rng)
    return meta, apply_lossless(meta, payload, lossless, decisions)


def decode(meta: tensor_pb2.TensorMeta, payload, max_elements: int) -> np.ndarray:
    """The dense array a payload encodes, after checking it against its metadata."""
    codec, payload = _checked(meta, payload, max_elements)
    return codec.decode(meta, payload)


def decode_into(meta: tensor_pb2.TensorMeta, payload, max_elements: int, out: np.ndarray) -> None:
    """Decode into `out` (float32, C-contiguous, meta's element count), checked as decode is.
    A pull's receiver fills its parameter buffer without a decoded temporary in between."""
    codec, payload = _checked(meta, payload, max_elements)
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.size != numel(meta.shape):
        raise InvalidArgument(f"tensor {meta.name!r}: cannot decode {numel(meta.shape)} elements into a "
                              f"{out.dtype} buffer of {out.size}")
    codec.decode_into(meta, payload, out.reshape(-1))


def _checked(meta: tensor_pb2.TensorMeta, payload, max_elements: int):
    """(codec, payload under any lossless layer) once meta and the payload's size agree."""
    try:
        numpy_dtype(meta.dtype)
    except InvalidArgument:
        raise InvalidArgument(f"tensor {meta.name!r}: unsupported dtype {meta.dtype}") from None
    shape = check_shape(meta.name, meta.shape)
    # zero dimensions count as 1: an empty tensor shaped [0, 2**62] is no less absurd
    if numel(max(d, 1) for d in shape) > max_elements:
        raise InvalidArgument(f"tensor {meta.name!r}: shape {list(shape)} ({numel(shape)} elements) "
                              f"exceeds the cap of {max_elements} elements")
    codec = get(meta.codec, meta.name)
    expected = codec.payload_size(meta)
    payload = _lossless.undo(meta, payload, expected, max_elements * MAX_BYTES_PER_ELEMENT)
    size = memoryview(payload).nbytes
    if size != expected:
        raise InvalidArgument(
            f"tensor {meta.name!r}: payload of {size} bytes, expected {expected} for "
            f"{tensor_pb2.Codec.Name(meta.codec)} shape {list(shape)} dtype "
            f"{tensor_pb2.DType.Name(meta.dtype)}")
    return codec, payload
