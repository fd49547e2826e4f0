"""A pull's encoded frames, kept per key and version: encoded once, sent to every reader.

Every worker pulls every key each step. Without a cache the shard re-encodes (bf16 or fp16
cast, lossless layer, framing) the same value once per worker; with one, the first pull of a
(key, version) pays and the rest send the same bytes. Frames are immutable `bytes`, so
sharing them between concurrent pulls is safe.

What makes an entry valid is decided here, purely (`fresh`): the same key, the same pull
variant (codec, lossless policy, small-tensor threshold), the same key version, and the same
owner object, compared by identity. The owner is the shard's per-key state: a restore or a
re-seed replaces it, so values that changed without a version bump are never served stale,
and the entry holds a reference to it, so its identity cannot be reused while cached.

Size: at most one version per (key, variant), and at most `max_bytes` of frames in all,
least recently used first out. The shard's lock is held around `get` by the caller (the
encode reads the value under it); the cache's own lock makes it safe without.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable, Hashable

from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import tensor_pb2

# Pull-encoded frames of a shard's model at one version per variant: bounded so that a
# model pulled in two codecs does not hold two extra copies beyond this.
DEFAULT_MAX_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One key's pull as sent: its meta (read-only), frames and the seconds encoding took."""

    meta: tensor_pb2.TensorMeta
    frames: tuple[bytes, ...]
    encode_s: float

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.frames)


@dataclasses.dataclass(frozen=True)
class _Entry:
    version: int
    owner: object
    encoded: Encoded


def worth_caching(codec: str, lossless: str) -> bool:
    """Whether pulls in this variant are worth keeping: an fp32 pull without the lossless
    layer is a copy of the value into frames, which a hit saves little of, while keeping it
    would hold a second copy of the shard (the server's memory goal counts it)."""
    return codec != "fp32" or lossless != "off"


def fresh(entry: _Entry | None, version: int, owner: object) -> bool:
    """Whether a cached entry is the encoding of this version of this owner's value."""
    return entry is not None and entry.version == version and entry.owner is owner


class PullCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise InvalidArgument(f"pull cache max_bytes {max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[str, Hashable], _Entry] = collections.OrderedDict()

    def get(self, key: str, variant: Hashable, version: int, owner: object,
            encode: Callable[[], Encoded]) -> tuple[Encoded, bool]:
        """The encoding of `key` at `version` in `variant` and whether it was a hit: cached, or
        `encode()` now (and kept)."""
        slot = (key, variant)
        with self._lock:
            entry = self._entries.get(slot)
            if fresh(entry, version, owner):
                self._entries.move_to_end(slot)
                self.hits += 1
                return entry.encoded, True
            self.misses += 1
        encoded = encode()
        self._put(slot, _Entry(version, owner, encoded))
        return encoded, False

    def _put(self, slot, entry: _Entry) -> None:
        with self._lock:
            old = self._entries.pop(slot, None)
            if old is not None:
                self._bytes -= old.encoded.nbytes
            if entry.encoded.nbytes > self.max_bytes:
                return
            self._entries[slot] = entry
            self._bytes += entry.encoded.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.encoded.nbytes

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
