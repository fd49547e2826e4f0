"""int8: blockwise absmax scaling with stochastic rounding.

The flat tensor is cut into blocks of `block_size` elements (the last one may be short).
Each block is sent as one float32 scale = absmax / 127 and its values as int8 in
[-127, 127]; x / scale is rounded down or up at random with the probability that makes the
expectation exact (E[q * scale] = x), so the quantization error is zero-mean noise of at most
one step (one scale) per element, which error feedback and averaging over workers wash out.

Payload: ceil(n / block_size) little-endian float32 scales, then n int8 values.
"""
from __future__ import annotations

import numpy as np

from shardps.pscommon.codecs.base import Codec, default_rng, as_bytes_view, float32_input, meta_numel
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import tensor_pb2

QMAX = 127  # symmetric: -128 is never produced, so negating a block is exact


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _blocks(flat: np.ndarray, block_size: int):
    """(full blocks as a 2-D view, the short tail or None) of a 1-D array, without copying."""
    full = len(flat) // block_size * block_size
    head = flat[:full].reshape(-1, block_size)
    tail = flat[full:] if full < len(flat) else None
    return head, tail


class Int8Codec(Codec):
    wire = tensor_pb2.CODEC_INT8

    def encode(self, array, cfg, meta, rng=None):
        rng = default_rng() if rng is None else rng
        flat = float32_input(array, meta.name).reshape(-1)
        n, block = flat.size, cfg.int8_block_size
        meta.int8.block_size = block
        nb = num_blocks(n, block)
        out = np.empty(4 * nb + n, dtype=np.uint8)
        if n == 0:
            return out.data
        mags = np.abs(flat)
        head, tail = _blocks(mags, block)
        absmax = np.empty(nb, dtype=np.float32)
        if head.size:
            np.max(head, axis=1, out=absmax[:len(head)])
        if tail is not None:
            absmax[-1] = tail.max()
        del mags, head, tail
        # max() propagates NaN, so one check of the per-block maxima finds any NaN or inf:
        # an inf scale would turn its whole block into NaN on the server.
        if not np.isfinite(absmax).all():
            raise InvalidArgument(f"tensor {meta.name!r}: int8 cannot encode NaN or infinite values")
        scales = absmax / np.float32(QMAX)
        # Zero blocks have scale 0; dividing by 1 instead keeps them exactly 0 without warnings.
        inv = np.float32(QMAX) / np.where(absmax > 0, absmax, np.float32(QMAX))
        y = np.empty(n, dtype=np.float32)
        y_head, y_tail = _blocks(y, block)
        x_head, x_tail = _blocks(flat, block)
        np.multiply(x_head, inv[:len(x_head), None], out=y_head)
        if y_tail is not None:
            np.multiply(x_tail, inv[-1], out=y_tail)
        # floor(y + u), u ~ U[0, 1): rounds up with probability frac(y), so E[q] = y exactly.
        y += rng.random(n, dtype=np.float32)
        np.floor(y, out=y)
        # |y| <= 127 up to float32 rounding of x * inv, so the clip only trims a last-ulp overshoot.
        np.clip(y, -QMAX, QMAX, out=y)
        out[:4 * nb].view("<f4")[:] = scales
        out[4 * nb:].view(np.int8)[:] = y
        return out.data

    def _block_size(self, meta) -> int:
        if meta.WhichOneof("codec_params") != "int8" or meta.int8.block_size < 1:
            raise InvalidArgument(f"tensor {meta.name!r}: CODEC_INT8 without a block size >= 1")
        return meta.int8.block_size

    def payload_size(self, meta):
        n = meta_numel(meta)
        return 4 * num_blocks(n, self._block_size(meta)) + n

    def decode(self, meta, payload):
        n, block = meta_numel(meta), self._block_size(meta)
        nb = num_blocks(n, block)
        raw = as_bytes_view(payload)
        scales = raw[:4 * nb].view("<f4")
        if not np.isfinite(scales).all():
            raise InvalidArgument(f"tensor {meta.name!r}: int8 payload has a non-finite scale")
        out = raw[4 * nb:].view(np.int8).astype(np.float32)
        head, tail = _blocks(out, block)
        head *= scales[:len(head), None]
        if tail is not None:
            tail *= scales[-1]
        return out.reshape(tuple(meta.shape))

    def shuffle_width(self, meta):
        return 1  # the bulk is single bytes; the scales are under 2% of it at the default block
