"""bf16: the upper half of float32, rounded to nearest even; keeps float32's range."""
from __future__ import annotations

import numpy as np

from shardps.pscommon.codecs.base import Codec, float32_input, meta_numel
from shardps.pscommon.wire.v1 import tensor_pb2


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rounded = _rounded(values)
    # max is NaN exactly when an element is: one read, where isnan would write a mask first
    if values.size and np.isnan(values.max()):
        nan = np.isnan(values)
        rounded[nan.reshape(rounded.shape)] = 0x7FC0
    return rounded


def _rounded(values: np.ndarray) -> np.ndarray:
    """The RNE bit patterns of finite and infinite values (NaN left to the caller)."""
    bits = values.view(np.uint32)
    # (bits + 0x7FFF + lsb) >> 16, in place on one temporary, the last shift written straight
    # into the uint16 result: fewer full-size passes and allocations than the one-expression form.
    t = bits >> 16
    t &= 1
    t += 0x7FFF
    t += bits
    rounded = np.empty(bits.shape, np.uint16)
    np.right_shift(t, 16, out=rounded, casting="unsafe")
    return rounded


def from_bf16_bits(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact); into `out` (float32) when given."""
    words = None if out is None else out.view(np.uint32)
    return np.left_shift(bits, 16, out=words, dtype=np.uint32).view(np.float32)


class Bf16Codec(Codec):
    wire = tensor_pb2.CODEC_BF16

    def encode(self, array, cfg, meta, rng=None):
        return to_bf16_bits(float32_input(array, meta.name)).data

    def payload_size(self, meta):
        return meta_numel(meta) * 2

    def shuffle_width(self, meta):
        return 2

    def decode(self, meta, payload):
        return from_bf16_bits(np.frombuffer(payload, dtype="<u2")).reshape(tuple(meta.shape))

    def decode_into(self, meta, payload, out):
        from_bf16_bits(np.frombuffer(payload, dtype="<u2"), out)
