"""The codec interface: one module per codec, each registered under its proto enum."""
from __future__ import annotations

import abc
import os

import numpy as np

from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tensors import numel
from shardps.pscommon.wire.v1 import tensor_pb2


# Stochastic rounding and top-k threshold sampling only need unpredictability across steps,
# not cryptographic strength. Seeded from os.urandom, and reseeded in a forked child, so that
# workers forked from one parent do not round identically (their errors would then add up
# instead of averaging out). Tests pass their own Generator for determinism.
RNG = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


def _reseed_after_fork() -> None:
    global RNG
    RNG = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_after_fork)


def default_rng() -> np.random.Generator:
    """The process's generator (looked up on each call: a fork replaces it)."""
    return RNG


class Codec(abc.ABC):
    """Turns a dense array into a payload and back.

    `encode` fills the codec's typed parameters in `meta` (never hand-packed headers) and
    returns the payload; it may switch `meta.codec` to another registered codec when that one
    is smaller (top-k at high density sends dense bf16). `payload_size` says how many bytes a
    well-formed payload for `meta` has, so a mismatch is refused before any decoding; it raises
    InvalidArgument when the codec parameters themselves are missing or out of range.
    `decode` returns a dense array of meta.shape (float32 for lossy codecs, the tensor's own
    dtype for raw). `shuffle_width` is the element size the lossless layer byte-shuffles by.
    `decode_into` writes the decoded values into a float32 buffer the caller owns.
    """

    wire: int = tensor_pb2.CODEC_UNSPECIFIED
    lossy: bool = True

    @abc.abstractmethod
    def encode(self, array: np.ndarray, cfg: CodecConfig, meta: tensor_pb2.TensorMeta,
               rng: np.random.Generator | None = None):
        ...

    @abc.abstractmethod
    def payload_size(self, meta: tensor_pb2.TensorMeta) -> int:
        ...

    @abc.abstractmethod
    def decode(self, meta: tensor_pb2.TensorMeta, payload) -> np.ndarray:
        ...

    def shuffle_width(self, meta: tensor_pb2.TensorMeta) -> int:
        return 1

    def decode_into(self, meta: tensor_pb2.TensorMeta, payload, out: np.ndarray) -> None:
        """decode, written into `out` (flat float32 of meta's element count). Codecs override
        it where they can write there directly instead of through a decoded temporary."""
        value = self.decode(meta, payload)
        if value.dtype.kind != "f":
            raise InvalidArgument(f"tensor {meta.name!r}: a {value.dtype} payload does not decode to "
                                  "floating values")
        out[:] = value.reshape(-1)


def float32_input(array: np.ndarray, name: str) -> np.ndarray:
    """Lossy codecs take floating tensors; compute in float32, C order."""
    if array.dtype.kind != "f":
        raise InvalidArgument(f"tensor {name!r}: a lossy codec needs a floating dtype, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def meta_numel(meta: tensor_pb2.TensorMeta) -> int:
    return numel(meta.shape)


def as_bytes_view(payload) -> np.ndarray:
    """A payload (bytes, bytearray, memoryview) as a flat uint8 array without copying."""
    return np.frombuffer(payload, dtype=np.uint8)
