"""The dense codecs (raw, fp16, bf16): error bounds, special values, strided inputs, registry."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardps.pscommon import codecs
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import tensor_pb2

F32 = tensor_pb2.DTYPE_FLOAT32
BIG = 1 << 30


def _through(array: np.ndarray, codec: str, dtype: int = F32) -> np.ndarray:
    meta, payload = codecs.encode("t", array, dtype, CodecConfig(codec))
    return codecs.decode(meta, bytes(payload), max_elements=BIG)


def _log_uniform(lo_exp: float, hi_exp: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mags = 2.0 ** rng.uniform(lo_exp, hi_exp, n)
    return (mags * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def _rel_err(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(y.astype(np.float64) - x.astype(np.float64)) / np.abs(x.astype(np.float64))


@pytest.mark.parametrize("seed", range(3))
def test_bf16_relative_error_is_at_most_half_an_ulp(seed):
    x = _log_uniform(-120, 120, 50_000, seed)
    assert _rel_err(x, _through(x, "bf16")).max() <= 2.0 ** -8


@pytest.mark.parametrize("seed", range(3))
def test_fp16_relative_error_is_at_most_half_an_ulp_in_the_normal_range(seed):
    x = _log_uniform(-14, 15.9, 50_000, seed)  # fp16 normals: 2**-14 .. 65504
    assert _rel_err(x, _through(x, "fp16")).max() <= 2.0 ** -11


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=2.0 ** -100, max_value=2.0 ** 100, width=32), st.booleans())
def test_bf16_bound_holds_for_any_float32(value, negative):
    x = np.array([-value if negative else value], np.float32)
    assert _rel_err(x, _through(x, "bf16"))[0] <= 2.0 ** -8


def test_bf16_rounds_ties_to_even():
    # 1 + 2**-8 lies halfway between bf16 neighbours 1 and 1 + 2**-7: even mantissa (1) wins;
    # 1 + 3 * 2**-8 lies halfway between 1 + 2**-7 and 1 + 2**-6: the even one is 1 + 2**-6.
    x = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8], np.float32)
    np.testing.assert_array_equal(_through(x, "bf16"), [1.0, 1 + 2.0 ** -6])


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0xFFC00000, 0x7FFFFFFF],
                         ids=hex)
def test_bf16_nan_stays_nan(bits):
    # naive rounding carries 0x7F800001 into +inf and wraps 0xFFFFFFFF to zero
    x = np.array([bits, 0x3F800000], np.uint32).view(np.float32)
    out = _through(x, "bf16")
    assert np.isnan(out[0]) and out[1] == 1.0


@pytest.mark.parametrize("codec", ["bf16", "fp16", "fp32"])
def test_infinities_and_signed_zero_survive(codec):
    x = np.array([np.inf, -np.inf, 0.0, -0.0], np.float32)
    out = _through(x, codec)
    np.testing.assert_array_equal(out, x)
    assert np.signbit(out[3]) and not np.signbit(out[2])


def test_fp16_saturates_beyond_its_range_to_infinity():
    out = _through(np.array([1e6, -1e6, 65504.0], np.float32), "fp16")
    np.testing.assert_array_equal(out, [np.inf, -np.inf, 65504.0])


def _strided_views():
    base = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8) / 7
    return {
        "step": base[:, ::2, 1::3],
        "transpose": base.transpose(2, 0, 1),
        "fortran": np.asfortranarray(base),
        "negative-stride": base[::-1, :, ::-1],
    }


@pytest.mark.parametrize("view", list(_strided_views()))
@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16"])
def test_non_contiguous_input_encodes_its_logical_values(codec, view):
    array = _strided_views()[view]
    assert not array.flags.c_contiguous
    expected = _through(np.ascontiguousarray(array), codec)
    out = _through(array, codec)
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, expected)


def test_raw_keeps_float32_exactly():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(_through(x, "fp32"), x)


@pytest.mark.parametrize("codec", ["fp16", "bf16"])
def test_lossy_codecs_refuse_integer_tensors(codec):
    with pytest.raises(InvalidArgument, match="'t'.*floating"):
        codecs.encode("t", np.arange(4, dtype=np.int32), tensor_pb2.DTYPE_INT32, CodecConfig(codec))


@pytest.mark.parametrize("codec", ["fp16", "bf16"])
def test_lossy_codecs_decode_to_float32(codec):
    assert _through(np.ones(3, np.float64), codec, tensor_pb2.DTYPE_FLOAT64).dtype == np.float32


def test_decode_refuses_unknown_codec():
    meta, payload = codecs.encode("t", np.ones(2, np.float32), F32)
    meta.codec = tensor_pb2.CODEC_UNSPECIFIED
    with pytest.raises(InvalidArgument, match="codec"):
        codecs.decode(meta, payload, max_elements=BIG)
