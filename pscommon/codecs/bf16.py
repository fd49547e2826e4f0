"""bf16: the upper half of float32, rounded to nearest even; keeps float32's range."""
from __future__ import annotations

import numpy as np

from shardps.pscommon.codecs.base import Codec, float32_input, meta_numel
from shardps.pscommon.wire.v1 import tensor_pb2


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # (bits + 0x7FFF + lsb) >> 16, in place on one temporary: fewer full-size passes and
    # allocations on large gradients than the one-expression form.
    t = bits >> 16
    t &= 1
    t += 0x7FFF
    t += bits
    t >>= 16
    rounded = t.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan.reshape(rounded.shape)] = 0x7FC0
    return rounded


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


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
