"""The pull cache: a key's pull encoded once per version, the same bytes as a fresh encode."""
from __future__ import annotations

import time

import numpy as np
import pytest

from shardps.pscommon import codecs
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.framing import chunk_frames
from shardps.pscommon.wire.v1 import tensor_pb2
from shardps.psserver.pull_cache import Encoded, PullCache, fresh

BF16 = CodecConfig.parse("bf16")


def _encoder(key, value, cfg=BF16, lossless="off", calls=None):
    """What the servicer's pull does for one key, counting the times it runs."""
    def encode():
        if calls is not None:
            calls.append(key)
        start = time.perf_counter()
        meta, payload = codecs.encode(key, value, tensor_pb2.DTYPE_FLOAT32, cfg, 4096, lossless)
        return Encoded(meta, tuple(chunk_frames(meta, payload, chunk_bytes=1 << 16)), time.perf_counter() - start)
    return encode


class _Owner:
    """Stands for the shard's per-key state, whose identity a restore changes."""


@pytest.mark.parametrize("lossless", ["off", "zstd"])
def test_a_hit_is_the_same_frames_as_a_fresh_encode(lossless):
    value = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    cache, owner, calls = PullCache(), _Owner(), []
    first, first_hit = cache.get("w", (BF16, lossless), 3, owner, _encoder("w", value, lossless=lossless, calls=calls))
    again, again_hit = cache.get("w", (BF16, lossless), 3, owner, _encoder("w", value, lossless=lossless, calls=calls))
    assert calls == ["w"] and again is first and (cache.hits, cache.misses) == (1, 1)
    assert (first_hit, again_hit) == (False, True)
    fresh_encoding = _encoder("w", value, lossless=lossless)()
    assert again.frames == fresh_encoding.frames and len(again.frames) > 1
    assert again.meta == fresh_encoding.meta


def test_a_new_version_is_encoded_again_from_the_new_value():
    value, cache, owner, calls = np.ones(5000, np.float32), PullCache(), _Owner(), []
    cache.get("w", BF16, 1, owner, _encoder("w", value.copy(), calls=calls))
    value -= 0.5
    got, _ = cache.get("w", BF16, 2, owner, _encoder("w", value.copy(), calls=calls))
    assert calls == ["w", "w"]
    assert got.frames == _encoder("w", value)().frames
    assert cache.get("w", BF16, 2, owner, _encoder("w", value, calls=calls)) == (got, True)
    assert len(calls) == 2


def test_a_replaced_owner_at_the_same_version_is_not_served_stale():
    cache, calls = PullCache(), []
    cache.get("w", BF16, 7, _Owner(), _encoder("w", np.ones(5000, np.float32), calls=calls))
    restored = np.full(5000, 2.0, np.float32)
    got, hit = cache.get("w", BF16, 7, _Owner(), _encoder("w", restored, calls=calls))
    assert not hit
    assert calls == ["w", "w"] and got.frames == _encoder("w", restored)().frames


def test_variants_and_keys_are_kept_apart():
    cache, owner, calls, value = PullCache(), _Owner(), [], np.ones(5000, np.float32)
    fp32, fp16 = CodecConfig.parse("fp32"), CodecConfig.parse("fp16")
    a, _ = cache.get("w", fp32, 1, owner, _encoder("w", value, fp32, calls=calls))
    b, _ = cache.get("w", fp16, 1, owner, _encoder("w", value, fp16, calls=calls))
    c, _ = cache.get("v", fp16, 1, owner, _encoder("v", value, fp16, calls=calls))
    assert calls == ["w", "w", "v"] and len({a.frames, b.frames, c.frames}) == 3
    assert cache.get("w", fp32, 1, owner, _encoder("w", value, fp32, calls=calls)) == (a, True)


def test_the_cache_stays_under_its_byte_cap_oldest_out_first():
    one = _encoder("k0", np.ones(5000, np.float32))().nbytes
    cache, owner, calls = PullCache(max_bytes=2 * one), _Owner(), []
    for key in ("k0", "k1", "k0", "k2"):   # k0 used again: k1 is the least recently used
        cache.get(key, BF16, 1, owner, _encoder(key, np.ones(5000, np.float32), calls=calls))
    assert cache.nbytes <= 2 * one and calls == ["k0", "k1", "k2"]
    cache.get("k0", BF16, 1, owner, _encoder("k0", np.ones(5000, np.float32), calls=calls))
    cache.get("k1", BF16, 1, owner, _encoder("k1", np.ones(5000, np.float32), calls=calls))
    assert calls == ["k0", "k1", "k2", "k1"]


def test_an_encoding_larger_than_the_cap_is_sent_but_not_kept():
    cache, calls = PullCache(max_bytes=100), []
    for _ in range(2):
        cache.get("w", BF16, 1, _Owner, _encoder("w", np.ones(5000, np.float32), calls=calls))
    assert calls == ["w", "w"] and cache.nbytes == 0


def test_clear_forgets_everything():
    cache, owner, calls = PullCache(), _Owner(), []
    for _ in range(2):
        cache.get("w", BF16, 1, owner, _encoder("w", np.ones(10, np.float32), calls=calls))
        cache.clear()
    assert calls == ["w", "w"] and cache.nbytes == 0


def test_fresh_needs_the_same_version_and_the_same_owner():
    owner = _Owner()
    encoded = Encoded(tensor_pb2.TensorMeta(name="w"), (b"x",), 0.0)
    from shardps.psserver.pull_cache import _Entry
    entry = _Entry(4, owner, encoded)
    assert fresh(entry, 4, owner)
    assert not fresh(entry, 5, owner) and not fresh(entry, 4, _Owner()) and not fresh(None, 4, owner)


def test_a_negative_cap_is_refused():
    with pytest.raises(InvalidArgument, match="max_bytes -1"):
        PullCache(max_bytes=-1)
