"""The optional lossless layer: byte shuffle, then zstd or lz4, kept only where it pays.

Shuffling groups byte i of every element together (width = the codec's element size), so the
slowly varying sign/exponent bytes of floats, or the high bytes of sorted indices, form long
low-entropy runs a fast compressor can use. The mantissa bytes of gradients are close to
random, so the layer is applied per tensor only when the frame is at least 10% smaller than
the payload it replaces (MIN_SAVING); otherwise the tensor goes as the codec produced it and
meta.lossless stays unset.

With a `Decisions` (the worker keeps one), a large tensor's payload is compressed only
while a sample of it says the layer pays, re-sampled every REPROBE_EVERY messages.

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


_WORDS = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def shuffle(data: np.ndarray, width: int) -> np.ndarray:
    """Byte i of every `width`-byte element together; a tail shorter than width stays last."""
    if width <= 1 or data.size < 2 * width:
        return data
    whole = data.size // width * width
    lanes = whole // width
    out = np.empty_like(data)
    word = _WORDS.get(width)
    if word is not None:
        # Whole little-endian words: lane i is the word shifted right by 8i bytes, stored
        # truncated, straight into its place (4 MiB of width 4: 0.33 ms vs 0.66 ms per lane copy).
        words = data[:whole].view(word)
        out[:lanes] = words
        for i in range(1, width):
            np.right_shift(words, 8 * i, out=out[i * lanes:(i + 1) * lanes], casting="unsafe")
    else:
        # One contiguous destination per lane. Writing the transposed view whole instead made
        # numpy walk the source with stride `lanes` (unshuffle of 1 MiB: 4.8 ms vs 0.46 ms).
        elements = data[:whole].reshape(-1, width)
        for i in range(width):
            out[i * lanes:(i + 1) * lanes] = elements[:, i]
    out[whole:] = data[whole:]
    return out


def unshuffle(data: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or data.size < 2 * width:
        return data
    whole = data.size // width * width
    lanes = whole // width
    out = np.empty_like(data)
    if width == 2:
        words = out[:whole].view("<u2")
        np.left_shift(data[lanes:whole], 8, out=words, dtype="<u2")
        words |= data[:lanes]
    else:
        elements = out[:whole].reshape(-1, width)
        for i in range(width):
            elements[:, i] = data[i * lanes:(i + 1) * lanes]
    out[whole:] = data[whole:]
    return out


def compress(data, algorithm: int, width: int) -> bytes:
    shuffled = shuffle(np.frombuffer(data, dtype=np.uint8), width)
    if algorithm == tensor_pb2.LOSSLESS_ZSTD:
        return _zstd_c().compress(shuffled)
    if algorithm == tensor_pb2.LOSSLESS_LZ4:
        return lz4.frame.compress(shuffled, compression_level=LZ4_LEVEL, store_size=True)
    raise InvalidArgument(f"lossless algorithm {algorithm} is not zstd or lz4")


def apply(meta: tensor_pb2.TensorMeta, payload, policy: str, width: int, decisions: "Decisions | None" = None):
    """The payload to send: compressed (and meta.lossless filled) only if that saves >= 10%.

    With `decisions`, a tensor the layer did not pay for is sent as it is, without
    compressing it, until its next probe (see Decisions)."""
    if check_policy(policy) == "off":
        return payload
    raw_size = memoryview(payload).nbytes
    if raw_size == 0:
        return payload
    algorithm = _ALGORITHMS[policy]
    if decisions is not None and not decisions.worth_trying(meta.name, payload, algorithm, width):
        return payload
    frame = compress(payload, algorithm, width)
    saves = len(frame) <= (1.0 - MIN_SAVING) * raw_size
    if decisions is not None:
        decisions.record(meta.name, saves)
    if not saves:
        return payload
    meta.lossless.algorithm = algorithm
    meta.lossless.raw_size = raw_size
    meta.lossless.shuffle_width = width
    return frame


# A payload's compressibility is a property of the tensor (its dtype, codec and how its
# values are spread), which changes slowly over training; compressing every message to
# learn, each time, that noise-like mantissas do not compress cost as much as compressing.
PROBE_BYTES = 64 << 10       # the sample a decision is made from: 4 evenly spaced blocks
PROBE_BLOCKS = 4
REPROBE_EVERY = 64           # messages of a tensor between two decisions


def worthwhile(decision_frame: int, sample: int) -> bool:
    """Whether a sample's frame predicts a saving of MIN_SAVING on the whole payload."""
    return decision_frame <= (1.0 - MIN_SAVING) * sample


def sample_of(payload, width: int) -> np.ndarray:
    """PROBE_BLOCKS evenly spaced blocks of the payload, each whole `width`-byte elements, so
    its shuffled lanes hold the same kinds of bytes as the whole payload's."""
    data = np.frombuffer(payload, dtype=np.uint8)
    block = PROBE_BYTES // PROBE_BLOCKS // max(width, 1) * max(width, 1)
    step = (data.size - block) // (PROBE_BLOCKS - 1) // max(width, 1) * max(width, 1)
    return np.concatenate([data[i * step:i * step + block] for i in range(PROBE_BLOCKS)])


class Decisions:
    """Per tensor name, whether the lossless layer is worth trying on its next message.

    The rule: a payload of at most 2 * PROBE_BYTES is always compressed and kept only if it
    saves MIN_SAVING (a sample would cost about as much). A larger one is decided from a
    PROBE_BYTES sample (sample_of) on its tensor's first message. While the layer is on,
    every message is compressed anyway and its own result decides the next (one that did not
    save MIN_SAVING turns the layer off); while it is off, the tensor's messages go as they
    are and every REPROBE_EVERY-th is decided from a sample again. So a tensor the layer does
    not pay for costs one sample's compression per REPROBE_EVERY messages, not one payload's
    compression per message; one it pays for costs what it did before.
    Thread-safe: the worker encodes shards from a pool (one tensor from one thread at once).
    """

    def __init__(self, every: int = REPROBE_EVERY):
        self.every = every
        self.probes = 0   # samples compressed so far (the tests read it)
        self._lock = threading.Lock()
        self._state: dict[str, list] = {}   # name -> [on?, messages skipped since turned off]

    def worth_trying(self, name: str, payload, algorithm: int, width: int) -> bool:
        if memoryview(payload).nbytes <= 2 * PROBE_BYTES:
            return True
        with self._lock:
            state = self._state.get(name)
            if state is not None and (state[0] or state[1] < self.every):
                state[1] += 1
                return state[0]
        sample = sample_of(payload, width)
        decided = worthwhile(len(compress(sample, algorithm, width)), sample.size)
        with self._lock:
            self.probes += 1
            self._state[name] = [decided, 1]
        return decided

    def record(self, name: str, saved: bool) -> None:
        """What compressing the whole payload showed: a miss turns the layer off."""
        with self._lock:
            state = self._state.get(name)
            if state is not None and not saved:
                state[0], state[1] = False, 1


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
