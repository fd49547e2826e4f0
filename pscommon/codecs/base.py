"""The codec interface: one module per codec, each registered under its proto enum."""
from __future__ import annotations

import abc

import numpy as np

from pscommon.config import CodecConfig
from pscommon.errors import InvalidArgument
from pscommon.tensors import numel
from pscommon.wire.v1 import tensor_pb2


class Codec(abc.ABC):
    """Turns a dense array into a payload and back.

    `encode` fills the codec's typed parameters in `meta` (never hand-packed headers) and
    returns the payload; `payload_size` says how many bytes a well-formed payload for `meta`
    has, so a mismatch is refused before any decoding; `decode` returns a dense array of
    meta.shape (float32 for lossy codecs, the tensor's own dtype for raw).
    """

    wire: int = tensor_pb2.CODEC_UNSPECIFIED
    lossy: bool = True

    @abc.abstractmethod
    def encode(self, array: np.ndarray, cfg: CodecConfig, meta: tensor_pb2.TensorMeta):
        ...

    @abc.abstractmethod
    def payload_size(self, meta: tensor_pb2.TensorMeta) -> int:
        ...

    @abc.abstractmethod
    def decode(self, meta: tensor_pb2.TensorMeta, payload) -> np.ndarray:
        ...


def float32_input(array: np.ndarray, name: str) -> np.ndarray:
    """Lossy codecs take floating tensors; compute in float32, C order."""
    if array.dtype.kind != "f":
        raise InvalidArgument(f"tensor {name!r}: a lossy codec needs a floating dtype, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def meta_numel(meta: tensor_pb2.TensorMeta) -> int:
    return numel(meta.shape)
