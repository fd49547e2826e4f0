"""top-k: the k largest magnitudes as bf16 values plus their flat uint32 indices.

k = max(1, round(density * n)), at most n. Payload: k little-endian bf16 values, then k
little-endian uint32 flat indices, strictly increasing. Where 6k bytes would be at least the
2n bytes of dense bf16 (density >= 1/3) the tensor goes dense bf16 instead and meta.codec says
so. The server decodes to a dense array before aggregating: sums of top-k are not top-k.
"""
from __future__ import annotations

import numpy as np

from shardps.pscommon.codecs.base import Codec, default_rng, as_bytes_view, float32_input, meta_numel
from shardps.pscommon.codecs.bf16 import Bf16Codec, from_bf16_bits, to_bf16_bits
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import tensor_pb2

MAX_ELEMENTS = 1 << 32  # flat indices are uint32

# Below this size a full partition is as fast as sampling a threshold (figures for
# np.argpartition, which the full partition then was). Measured on the
# 2-core dev box (numpy 2.4, N(0,1) float32, best of 3): 64K elements ~0.1 ms either way;
# 256K: full 0.4 ms vs sampled 0.1-0.3 ms; 1M: 2.2 vs 0.6-1.5 ms; 4M: 15 vs 2-6 ms;
# 25M: full 107-110 ms vs sampled 24 ms (density 0.01) and 55 ms (0.1). Sampling only loses,
# by a little, at density near 1/3 where top-k goes dense bf16 anyway.
SAMPLE_MIN_ELEMENTS = 1 << 17
SAMPLE_FRACTION = 0.01
SAMPLE_MIN = 1024


def k_for(n: int, density: float) -> int:
    return min(n, max(1, round(density * n)))


def _largest_in_order(values: np.ndarray, k: int, positions: np.ndarray | None = None) -> np.ndarray:
    """The positions of the k largest `values`, in increasing order without sorting them:
    everything at or above the k-th largest value is kept in place, and where ties at that
    value make more than k, the last of those ties are dropped (so ties go to the lowest
    positions, always alike). `positions` (increasing) names the values; None: 0..n-1.
    An argpartition then a sort of the k indices cost 15-35% more (100K-2M elements)."""
    c = values.size
    kth = np.partition(values, c - k)[c - k]
    keep = values >= kth
    extra = np.count_nonzero(keep) - k
    if extra:
        ties = np.flatnonzero(values == kth)
        keep[ties[ties.size - extra:]] = False
    return np.flatnonzero(keep) if positions is None else positions[keep]


def _select_sampled(mag: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly the top k: every element at or above a sampled threshold is a candidate, and the
    threshold is set low enough that almost always at least k are; the top k of the
    candidates are then the top k of the whole, since every non-candidate is below them all."""
    n = mag.size
    s = max(SAMPLE_MIN, int(n * SAMPLE_FRACTION))
    sample = mag[rng.integers(0, n, s)]
    # The sample holds about s*k/n of the top k; going 3 standard deviations (plus a constant
    # for tiny k) deeper makes "fewer than k candidates" rare, and that case falls back.
    expected = s * k / n
    rank = min(s, int(expected + 3.0 * np.sqrt(expected) + 8))
    threshold = np.partition(sample, s - rank)[s - rank]
    candidates = np.flatnonzero(mag >= threshold)
    if candidates.size < k:
        return _largest_in_order(mag, k)
    return _largest_in_order(mag[candidates], k, candidates)


def top_k_indices(mag: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Flat indices of exactly the k largest entries of `mag`, increasing; of equal entries at
    the cut, the lowest indices are kept."""
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if k >= mag.size:
        return np.arange(mag.size)
    if mag.size >= SAMPLE_MIN_ELEMENTS:
        return _select_sampled(mag, k, default_rng() if rng is None else rng)
    return _largest_in_order(mag, k)


class TopKCodec(Codec):
    wire = tensor_pb2.CODEC_TOPK

    def encode(self, array, cfg, meta, rng=None):
        flat = float32_input(array, meta.name).reshape(-1)
        n = flat.size
        if n >= MAX_ELEMENTS:
            raise InvalidArgument(f"tensor {meta.name!r}: {n} elements, top-k indexes at most "
                                  f"{MAX_ELEMENTS - 1}")
        k = k_for(n, cfg.topk_density)
        if 6 * k >= 2 * n:  # sparse form no smaller than dense bf16
            meta.codec = tensor_pb2.CODEC_BF16
            return Bf16Codec().encode(flat, cfg, meta)
        mag = np.abs(flat)
        # Magnitudes are >= 0, so their max is NaN exactly when an element is NaN; NaN would
        # otherwise be kept or dropped depending on which selection path ran.
        if np.isnan(mag.max()):
            raise InvalidArgument(f"tensor {meta.name!r}: top-k cannot encode NaN values")
        idx = top_k_indices(mag, k, rng)
        del mag
        meta.topk.k = k
        out = np.empty(6 * k, dtype=np.uint8)
        out[:2 * k].view("<u2")[:] = to_bf16_bits(flat[idx])
        out[2 * k:].view("<u4")[:] = idx
        return out.data

    def _k(self, meta) -> int:
        if meta.WhichOneof("codec_params") != "topk":
            raise InvalidArgument(f"tensor {meta.name!r}: CODEC_TOPK without top-k parameters")
        n = meta_numel(meta)
        if meta.topk.k > n:
            raise InvalidArgument(f"tensor {meta.name!r}: top-k k={meta.topk.k} exceeds its "
                                  f"{n} elements")
        return meta.topk.k

    def payload_size(self, meta):
        return 6 * self._k(meta)

    def sparse(self, meta, payload) -> tuple[np.ndarray, np.ndarray]:
        """(float32 values, their flat indices) of a payload, the indices checked: what a
        receiver or the sender's error feedback needs without a dense array."""
        n, k = meta_numel(meta), self._k(meta)
        raw = as_bytes_view(payload)
        values = from_bf16_bits(raw[:2 * k].view("<u2"))
        idx = raw[2 * k:].view("<u4")
        if k:
            # Compare neighbours rather than np.diff: uint32 differences wrap around.
            if not (idx[1:] > idx[:-1]).all():
                raise InvalidArgument(f"tensor {meta.name!r}: top-k indices are not strictly increasing")
            if idx[-1] >= n:
                raise InvalidArgument(f"tensor {meta.name!r}: top-k index {int(idx[-1])} out of "
                                      f"range for {n} elements")
        return values, idx

    def decode(self, meta, payload):
        out = np.zeros(meta_numel(meta), dtype=np.float32)
        self.decode_into(meta, payload, out, zeroed=True)
        return out.reshape(tuple(meta.shape))

    def decode_into(self, meta, payload, out, zeroed: bool = False):
        values, idx = self.sparse(meta, payload)
        if not zeroed:
            out.fill(0.0)
        out[idx] = values

    def shuffle_width(self, meta):
        # Width 4 groups each uint32 index's slowly changing high bytes (the indices are sorted)
        # and still puts the bf16 values' exponent bytes in lanes of their own. On 4M N(0,1)
        # elements at density 0.01, zstd-1 shrank the payload 2.38x at width 4, 1.70x at 2.
        return 4
