"""The optional lossless layer: byte shuffle, then zstd or lz4, kept only where it pays.

Shuffling groups byte i of every element together (width = the codec's element size), so the
slowly varying sign/exponent bytes of floats, or the high bytes of sorted indices, form long
low-entropy runs a fast compressor can use. The mantissa bytes of gradients are close to
random, so the layer is applied per tensor only when the frame is at least 10% smaller than
the payload it replaces (MIN_SAVING); otherwise the tensor goes as the codec produced it and
meta.lossless stays unset.

Decoding checks the claimed raw size against the codec's expected payload size and a cap
before any buffer is allocated, and decompresses with an output bound, so a frame cannot
make the receiver allocate more than the tensor it describes.
"""
from __future__ import annotations

import threading

import lz4.frame
import numpy as np
import zstandard

from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import tensor_pb2

POLICIES = ("off", "auto", "zstd", "lz4")
MIN_SAVING = 0.10
MAX_SHUFFLE_WIDTH = 16
# 'auto' uses zstd level 1. On shuffled gradients the gain is in the exponent bytes, which are
# skewed but not repetitive: zstd's entropy coding of literals captures that, lz4 (match finding
# only) much less. python -m bench.codecs on 1Mi N(0,1) float32 (2 shared cores, noisy):
# bf16 2.00x -> zstd 2.93x / lz4 2.40x; fp16 2.00x -> zstd 2.36x / lz4 under 10% (not applied);
# fp32 -> zstd 1.19x / lz4 under 10%; top-k 1% 67x -> zstd 147x / lz4 122x; int8 neither.
# Encode and decode speeds were within the noise of each other (600-3000 MB/s).
# lz4 remains available explicitly.
ZSTD_LEVEL = 1
LZ4_LEVEL = 0  # lz4.frame's fast mode

_ALGORITHMS = {"zstd": tensor_pb2.LOSSLESS_ZSTD, "lz4": tensor_pb2.LOSSLESS_LZ4,
               "auto": tensor_pb2.LOSSLESS_ZSTD}
_NO_LAYER = (tensor_pb2.LOSSLESS_UNSPECIFIED, tensor_pb2.LOSSLESS_NONE)

# zstandard compressor/decompressor objects must not be shared by concurrent threads; the
# worker pushes shards from a thread pool, so each thread keeps its own.
_local = threading.local()


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise InvalidArgument(f"lossless {policy!r} is not one of {list(POLICIES)}")
    return policy


def shuffle(data: np.ndarray, width: int) -> np.ndarray:
    """Byte i of every `width`-byte element together; a tail shorter than width stays last."""
    if width <= 1 or data.size < 2 * width:
        return data
    whole = data.size // width * width
    out = np.empty_like(data)
    out[:whole].reshape(width, -1)[:] = data[:whole].reshape(-1, width).T
    out[whole:] = data[whole:]
    return out


def unshuffle(data: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or data.size < 2 * width:
        return data
    whole = data.size // width * width
    out = np.empty_like(data)
    out[:whole].reshape(-1, width)[:] = data[:whole].reshape(width, -1).T
    out[whole:] = data[whole:]
    return out


def compress(data, algorithm: int, width: int) -> bytes:
    shuffled = shuffle(np.frombuffer(data, dtype=np.uint8), width)
    if algorithm == tensor_pb2.LOSSLESS_ZSTD:
        return _zstd_c().compress(shuffled)
    if algorithm == tensor_pb2.LOSSLESS_LZ4:
        return lz4.frame.compress(shuffled, compression_level=LZ4_LEVEL, store_size=True)
    raise InvalidArgument(f"lossless algorithm {algorithm} is not zstd or lz4")


def apply(meta: tensor_pb2.TensorMeta, payload, policy: str, width: int):
    """The payload to send: compressed (and meta.lossless filled) only if that saves >= 10%."""
    if check_policy(policy) == "off":
        return payload
    raw_size = memoryview(payload).nbytes
    if raw_size == 0:
        return payload
    algorithm = _ALGORITHMS[policy]
    frame = compress(payload, algorithm, width)
    if len(frame) > (1.0 - MIN_SAVING) * raw_size:
        return payload
    meta.lossless.algorithm = algorithm
    meta.lossless.raw_size = raw_size
    meta.lossless.shuffle_width = width
    return frame


def undo(meta: tensor_pb2.TensorMeta, payload, expected_size: int, cap: int):
    """The codec payload under the lossless layer (or `payload` itself if there is none).

    `expected_size` is what the codec says a payload for meta has; `cap` bounds it whatever
    the codec says. Both are checked against the claimed raw size before decompressing.
    """
    if not meta.HasField("lossless") or meta.lossless.algorithm in _NO_LAYER:
        return payload
    params, name = meta.lossless, meta.name
    if params.raw_size > cap:
        raise InvalidArgument(f"tensor {name!r}: lossless frame claims {params.raw_size} raw bytes, "
                              f"over the cap of {cap}")
    if params.raw_size != expected_size:
        raise InvalidArgument(f"tensor {name!r}: lossless frame claims {params.raw_size} raw bytes, "
                              f"expected {expected_size} for its codec and shape")
    if params.shuffle_width > MAX_SHUFFLE_WIDTH:
        raise InvalidArgument(f"tensor {name!r}: shuffle width {params.shuffle_width} over "
                              f"{MAX_SHUFFLE_WIDTH}")
    size = params.raw_size
    if size == 0:
        # Never produced (empty payloads are sent as they are), and 0 means "unbounded" to
        # zstandard's max_output_size.
        raise InvalidArgument(f"tensor {name!r}: lossless frame over an empty payload")
    if params.algorithm == tensor_pb2.LOSSLESS_ZSTD:
        raw = _zstd_decompress(name, payload, size)
    elif params.algorithm == tensor_pb2.LOSSLESS_LZ4:
        raw = _lz4_decompress(name, payload, size)
    else:
        raise InvalidArgument(f"tensor {name!r}: unknown lossless algorithm {params.algorithm}")
    if len(raw) != size:
        raise InvalidArgument(f"tensor {name!r}: lossless frame decompressed to {len(raw)} bytes, "
                              f"expected {size}")
    return unshuffle(np.frombuffer(raw, dtype=np.uint8), params.shuffle_width).data


def _zstd_decompress(name: str, payload, size: int) -> bytes:
    try:
        # A frame header's content size overrides max_output_size, so check it first; frames
        # without one are bounded by max_output_size.
        declared = zstandard.frame_content_size(payload)
        if declared not in (-1, size):
            raise InvalidArgument(f"tensor {name!r}: zstd frame declares {declared} bytes, "
                                  f"expected {size}")
        return _zstd_d().decompress(payload, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise InvalidArgument(f"tensor {name!r}: bad zstd frame: {e}") from None


def _lz4_decompress(name: str, payload, size: int) -> bytes:
    try:
        d = lz4.frame.LZ4FrameDecompressor()
        # max_length bounds the output whatever the frame header claims.
        raw = d.decompress(payload, max_length=size)
    except RuntimeError as e:
        raise InvalidArgument(f"tensor {name!r}: bad lz4 frame: {e}") from None
    if not d.eof or d.unused_data:
        raise InvalidArgument(f"tensor {name!r}: lz4 frame does not end after {size} bytes")
    return raw
