"""The cheaper codec paths say exactly what the plain ones said: the lossless decision rule,
the lane-wise byte shuffle, bf16 rounding, decode_into, and top-k's sparse error feedback."""
from __future__ import annotations

import numpy as np
import pytest

from shardps.pscommon import codecs
from shardps.pscommon.codecs import lossless, topk
from shardps.pscommon.codecs.bf16 import from_bf16_bits, to_bf16_bits
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import tensor_pb2
from shardps.worker.compression import ErrorFeedback

F32 = tensor_pb2.DTYPE_FLOAT32
BIG = 1 << 30
LARGE = 4 * lossless.PROBE_BYTES   # bytes: above the size where a sample decides


def _rng(seed=0):
    return np.random.default_rng(seed)


def _noise_bytes(n, seed=0):
    return _rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _repetitive_bytes(n):
    return (np.arange(n, dtype=np.uint32) % 7).astype(np.uint8).tobytes()


class _Counting:
    """lossless.compress, counting the bytes it was given (a real compressor underneath)."""

    def __init__(self, monkeypatch):
        self.calls: list[int] = []
        real = lossless.compress

        def counted(data, algorithm, width):
            self.calls.append(memoryview(data).nbytes)
            return real(data, algorithm, width)
        monkeypatch.setattr(lossless, "compress", counted)


# -- the lossless decision -------------------------------------------------------------------

def test_a_large_noise_tensor_is_decided_from_a_sample_and_then_not_compressed(monkeypatch):
    counting, decisions = _Counting(monkeypatch), lossless.Decisions(every=8)
    for step in range(8):
        meta = tensor_pb2.TensorMeta(name="w")
        payload = _noise_bytes(LARGE, seed=step)
        assert lossless.apply(meta, payload, "auto", 4, decisions) == payload
        assert not meta.HasField("lossless")
    assert counting.calls == [lossless.PROBE_BYTES]   # one sample, no whole payload
    assert decisions.probes == 1
    lossless.apply(tensor_pb2.TensorMeta(name="w"), _noise_bytes(LARGE), "auto", 4, decisions)
    assert counting.calls == [lossless.PROBE_BYTES] * 2 and decisions.probes == 2   # probed again


def test_a_compressible_tensor_gets_the_same_frame_as_without_decisions(monkeypatch):
    decisions = lossless.Decisions(every=4)
    for _ in range(6):
        payload = _repetitive_bytes(LARGE)
        plain_meta, with_meta = tensor_pb2.TensorMeta(name="w"), tensor_pb2.TensorMeta(name="w")
        plain = lossless.apply(plain_meta, payload, "zstd", 4)
        decided = lossless.apply(with_meta, payload, "zstd", 4, decisions)
        assert bytes(decided) == bytes(plain) and with_meta == plain_meta
        assert with_meta.HasField("lossless")
    assert decisions.probes == 1   # while the layer is on, each message's own result decides


def test_a_miss_turns_the_layer_off_until_the_next_probe(monkeypatch):
    counting, decisions = _Counting(monkeypatch), lossless.Decisions(every=3)
    lossless.apply(tensor_pb2.TensorMeta(name="w"), _repetitive_bytes(LARGE), "auto", 4, decisions)
    assert counting.calls == [lossless.PROBE_BYTES, LARGE]
    # the tensor turned to noise: compressing it shows the miss, which turns the layer off
    meta, noise = tensor_pb2.TensorMeta(name="w"), _noise_bytes(LARGE)
    assert lossless.apply(meta, noise, "auto", 4, decisions) == noise
    assert not meta.HasField("lossless") and counting.calls[-1] == LARGE
    n = len(counting.calls)
    for _ in range(2):
        lossless.apply(tensor_pb2.TensorMeta(name="w"), _noise_bytes(LARGE), "auto", 4, decisions)
    assert len(counting.calls) == n   # skipped without compressing
    lossless.apply(tensor_pb2.TensorMeta(name="w"), _noise_bytes(LARGE), "auto", 4, decisions)
    assert counting.calls[n:] == [lossless.PROBE_BYTES]


def test_small_payloads_are_always_tried_whole(monkeypatch):
    counting, decisions = _Counting(monkeypatch), lossless.Decisions(every=100)
    small = 2 * lossless.PROBE_BYTES
    for seed in range(3):
        lossless.apply(tensor_pb2.TensorMeta(name="b"), _noise_bytes(small, seed), "auto", 2, decisions)
    assert counting.calls == [small] * 3 and decisions.probes == 0


def test_decisions_are_per_tensor():
    decisions = lossless.Decisions()
    lossless.apply(tensor_pb2.TensorMeta(name="noise"), _noise_bytes(LARGE), "auto", 4, decisions)
    meta = tensor_pb2.TensorMeta(name="zeros")
    lossless.apply(meta, bytes(LARGE), "auto", 4, decisions)
    assert meta.HasField("lossless")


@pytest.mark.parametrize("width", [1, 2, 3, 4, 16])
def test_the_sample_is_whole_elements_from_four_places(width):
    data = np.arange(LARGE + 5, dtype=np.uint32).astype(np.uint8).tobytes()
    sample = lossless.sample_of(data, width)
    block = lossless.PROBE_BYTES // lossless.PROBE_BLOCKS // width * width
    assert sample.size == lossless.PROBE_BLOCKS * block and block % width == 0
    assert bytes(sample[:block]) == data[:block]


def test_error_feedback_keeps_its_lossless_decisions_per_tensor():
    ef, cfg = ErrorFeedback(), CodecConfig.parse("bf16")
    x = _rng().standard_normal(LARGE).astype(np.float32)   # bf16 of noise: exponent bytes pay
    meta, payload = ef.compress("w", x, cfg, lossless="auto")
    assert ef.lossless.probes == 1
    np.testing.assert_allclose(codecs.decode(meta, payload, BIG) + ef.residual("w"), x, rtol=1e-6)


# -- byte shuffle ----------------------------------------------------------------------------

@pytest.mark.parametrize("width", range(0, 17))
@pytest.mark.parametrize("n", [0, 1, 3, 31, 32, 33, 4099])
def test_shuffle_is_byte_i_of_every_element_together(width, n):
    """The wire format: the new lane-wise copies write what the transpose wrote."""
    data = _rng(width).integers(0, 256, n, dtype=np.uint8)
    if width <= 1 or n < 2 * width:
        expected = data
    else:
        whole = n // width * width
        expected = np.concatenate([data[:whole].reshape(-1, width).T.reshape(-1), data[whole:]])
    np.testing.assert_array_equal(lossless.shuffle(data, width), expected)
    np.testing.assert_array_equal(lossless.unshuffle(expected, width), data)


# -- bf16 ------------------------------------------------------------------------------------

def _bf16_reference(x: np.ndarray) -> np.ndarray:
    """The one-expression round-to-nearest-even, NaN as 0x7FC0 (what the codec always sent)."""
    bits = x.view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    return out


def test_bf16_rounding_matches_the_reference_on_every_high_half_and_tie():
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    x = (high[:, None] | lows[None, :]).reshape(-1).view(np.float32)
    np.testing.assert_array_equal(to_bf16_bits(x), _bf16_reference(x))


def test_from_bf16_bits_into_a_buffer_is_the_same_as_a_new_array():
    bits = _rng().integers(0, 1 << 16, 1000, dtype=np.uint16)
    out = np.empty(1000, np.float32)
    from_bf16_bits(bits, out)
    np.testing.assert_array_equal(out.view(np.uint32), from_bf16_bits(bits).view(np.uint32))
    np.testing.assert_array_equal(out.view(np.uint32), bits.astype(np.uint32) << 16)


# -- decode_into -----------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "topk:0.01", "topk:0.5"])
@pytest.mark.parametrize("policy", ["off", "zstd"])
def test_decode_into_writes_what_decode_returns(codec, policy):
    x = _rng().standard_normal((50, 40)).astype(np.float32)
    meta, payload = codecs.encode("t", x, F32, CodecConfig.parse(codec), lossless=policy, rng=_rng(1))
    out = np.full(x.size, 7.0, np.float32)   # stale values a top-k decode must clear
    codecs.decode_into(meta, bytes(payload), BIG, out)
    np.testing.assert_array_equal(out, codecs.decode(meta, bytes(payload), BIG).reshape(-1))


def test_decode_into_a_raw_bf16_payload_gives_float_values():
    x = np.array([1.5, -2.0, 0.0], np.float32)
    meta, payload = codecs.encode("t", x, tensor_pb2.DTYPE_BFLOAT16)
    out = np.empty(3, np.float32)
    codecs.decode_into(meta, bytes(payload), BIG, out)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("buffer", [np.empty(9, np.float32), np.empty(10, np.float64),
                                    np.empty(20, np.float32)[::2]])
def test_decode_into_refuses_a_buffer_that_does_not_fit(buffer):
    meta, payload = codecs.encode("t", np.ones(10, np.float32), F32, CodecConfig.parse("bf16"))
    with pytest.raises(InvalidArgument, match="'t'.*cannot decode"):
        codecs.decode_into(meta, bytes(payload), BIG, buffer)


def test_decode_into_checks_the_payload_as_decode_does():
    meta, payload = codecs.encode("t", np.ones(10, np.float32), F32, CodecConfig.parse("bf16"))
    with pytest.raises(InvalidArgument, match="'t'.*payload of 18 bytes"):
        codecs.decode_into(meta, bytes(payload)[:18], BIG, np.empty(10, np.float32))


def test_decode_into_refuses_an_integer_raw_tensor():
    meta, payload = codecs.encode("t", np.arange(4, dtype=np.int32), tensor_pb2.DTYPE_INT32)
    with pytest.raises(InvalidArgument, match="'t'.*floating"):
        codecs.decode_into(meta, bytes(payload), BIG, np.empty(4, np.float32))


# -- top-k error feedback without a dense decode ----------------------------------------------

def _dense_residual(corrected: np.ndarray, meta, payload) -> np.ndarray:
    """What the residual was computed as before: minus the dense decode, non-finite zeroed."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = corrected - codecs.decode(meta, payload, BIG).reshape(corrected.shape)
    out[~np.isfinite(out)] = 0.0
    return out


@pytest.mark.parametrize("special", [None, "inf", "huge"])
def test_top_k_residual_is_bit_for_bit_the_dense_one(special):
    ef, cfg, rng = ErrorFeedback(), CodecConfig.parse("topk:0.05"), _rng(5)
    residual = np.zeros((30, 20), np.float32)
    for step in range(6):
        grad = rng.standard_normal((30, 20)).astype(np.float32)
        if special == "inf":
            grad[2 * step:2 * step + 2, :] = np.inf   # 40 > k = 30: some stay in the residual
        elif special == "huge":
            grad[0, step] = np.float32(3.4e38)   # rounds to bf16 inf: inf - x
        corrected = grad + residual
        meta, payload = ef.compress("w", grad, cfg, rng=_rng(step))
        residual = _dense_residual(corrected, meta, payload)
        np.testing.assert_array_equal(ef.residual("w").view(np.uint32), residual.view(np.uint32))


# -- top-k selection without a sort ----------------------------------------------------------

def _lowest_first_reference(mag: np.ndarray, k: int) -> np.ndarray:
    """The k largest, ties at the cut to the lowest indices, increasing: by a full sort."""
    return np.sort(np.lexsort((np.arange(mag.size), -mag))[:k])


@pytest.mark.parametrize("n", [1000, topk.SAMPLE_MIN_ELEMENTS * 2])
@pytest.mark.parametrize("kind", ["distinct", "ties"])
def test_top_k_selection_is_the_sorted_reference_whatever_the_sample(n, kind):
    rng = _rng(n)
    x = rng.standard_normal(n) if kind == "distinct" else rng.integers(-20, 21, n)
    mag = np.abs(x.astype(np.float32))
    k = round(0.01 * n)
    expected = _lowest_first_reference(mag, k)
    for seed in range(3):
        np.testing.assert_array_equal(topk.top_k_indices(mag, k, _rng(seed)), expected)


def test_top_k_selection_keeps_infinities_and_every_tie_rule_at_the_cut():
    mag = np.array([1, np.inf, 3, 3, 3, 0, np.inf, 3], np.float32)
    np.testing.assert_array_equal(topk.top_k_indices(mag, 4), [1, 2, 3, 6])
    np.testing.assert_array_equal(topk.top_k_indices(mag, 2), [1, 6])
