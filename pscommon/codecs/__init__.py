"""Tensor codecs, registered by the proto Codec enum, and the encode/decode entry points."""
from __future__ import annotations

import numpy as np

from pscommon.codecs.base import Codec
from pscommon.codecs.bf16 import Bf16Codec
from pscommon.codecs.fp16 import Fp16Codec
from pscommon.codecs.raw import RawCodec
from pscommon.config import CodecConfig
from pscommon.errors import InvalidArgument
from pscommon.tensors import check_shape, numel, numpy_dtype
from pscommon.wire.v1 import tensor_pb2

REGISTRY: dict[int, Codec] = {c.wire: c for c in (RawCodec(), Fp16Codec(), Bf16Codec())}

RAW = CodecConfig("fp32")


def get(wire: int) -> Codec:
    try:
        return REGISTRY[wire]
    except KeyError:
        raise InvalidArgument(f"unknown codec {wire}") from None


def encode(name: str, array: np.ndarray, wire_dtype: int, cfg: CodecConfig = RAW,
           small_tensor_bytes: int = 0):
    """(meta, payload) for one tensor. Tensors of at most `small_tensor_bytes` go raw."""
    codec = REGISTRY[cfg.codec]
    if codec.lossy and array.nbytes <= small_tensor_bytes:
        codec = REGISTRY[tensor_pb2.CODEC_RAW]
    meta = tensor_pb2.TensorMeta(name=name, dtype=wire_dtype, shape=array.shape, codec=codec.wire)
    payload = codec.encode(array, cfg, meta)
    return meta, payload


def decode(meta: tensor_pb2.TensorMeta, payload, max_elements: int) -> np.ndarray:
    """The dense array a payload encodes, after checking it against its metadata."""
    numpy_dtype(meta.dtype)  # unknown dtype -> InvalidArgument
    shape = check_shape(meta.name, meta.shape)
    if numel(shape) > max_elements:
        raise InvalidArgument(f"tensor {meta.name!r}: {numel(shape)} elements exceed the cap of {max_elements}")
    codec = get(meta.codec)
    expected = codec.payload_size(meta)
    if len(payload) != expected:
        raise InvalidArgument(
            f"tensor {meta.name!r}: payload of {len(payload)} bytes, expected {expected} for "
            f"{tensor_pb2.Codec.Name(meta.codec)} shape {list(shape)} dtype "
            f"{tensor_pb2.DType.Name(meta.dtype)}")
    return codec.decode(meta, payload)
