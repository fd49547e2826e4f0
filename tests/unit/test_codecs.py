"""Codecs int8 and top-k, the lossless layer, error feedback, and every codec's round trip."""
from __future__ import annotations

import os

import numpy as np
import pytest
import zstandard
import lz4.frame

from shardps.pscommon import codecs
from shardps.pscommon.codecs import lossless, topk
from shardps.pscommon.codecs.bf16 import from_bf16_bits, to_bf16_bits
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tensors import wire_dtype
from shardps.pscommon.wire.v1 import tensor_pb2
from shardps.worker.compression import ErrorFeedback

F32 = tensor_pb2.DTYPE_FLOAT32
BIG = 1 << 30
CODECS = ["fp32", "fp16", "bf16", "int8", "int8:8", "topk:0.01", "topk:0.2"]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _encode(array, codec, dtype=F32, **kw):
    kw.setdefault("rng", _rng(123))
    return codecs.encode("t", array, dtype, CodecConfig.parse(codec), **kw)


def _through(array, codec, dtype=F32, **kw):
    meta, payload = _encode(array, codec, dtype, **kw)
    return codecs.decode(meta, bytes(payload), max_elements=BIG)


def _bf16(x):
    return from_bf16_bits(to_bf16_bits(np.asarray(x, np.float32).reshape(-1)))


def _int8_steps(x, block):
    """Each element's quantization step: its block's absmax / 127, computed independently."""
    flat = np.abs(np.asarray(x, np.float64).reshape(-1))
    steps = np.empty_like(flat)
    for start in range(0, flat.size, block):
        steps[start:start + block] = flat[start:start + block].max() / 127
    return steps


def _topk_expected(x, density):
    """Dense result top-k must produce, from a full sort (ties make indices ambiguous, so the
    test inputs below have distinct magnitudes)."""
    flat = np.asarray(x, np.float32).reshape(-1)
    k = min(flat.size, max(1, round(density * flat.size)))
    keep = np.argsort(np.abs(flat), kind="stable")[flat.size - k:]
    out = np.zeros_like(flat)
    out[keep] = _bf16(flat[keep])
    return out


def _check_error(codec, x, out):
    """The error bound each codec promises, for finite inputs in fp16's normal range."""
    x32 = np.asarray(x, np.float32).reshape(-1)
    out = np.asarray(out).reshape(-1)
    name, _, arg = codec.partition(":")
    if name == "fp32":  # raw: the tensor's own values (its own dtype in these tests)
        np.testing.assert_array_equal(out, np.asarray(x).reshape(-1))
    elif name == "fp16":
        np.testing.assert_allclose(out, x32, rtol=2.0 ** -11, atol=0)
    elif name == "bf16":
        np.testing.assert_allclose(out, x32, rtol=2.0 ** -8, atol=0)
    elif name == "int8":
        steps = _int8_steps(x32, int(arg or 256))
        assert (np.abs(out.astype(np.float64) - x32) <= steps * (1 + 1e-6)).all()
    elif name == "topk":
        if 6 * max(1, round(float(arg) * x32.size)) >= 2 * x32.size:  # went dense bf16
            np.testing.assert_allclose(out, x32, rtol=2.0 ** -8, atol=0)
        else:
            np.testing.assert_array_equal(out, _topk_expected(x32, float(arg)))


def _distinct(shape, dtype, seed=0):
    """Values with distinct magnitudes (so top-k is unambiguous) in fp16's normal range."""
    n = int(np.prod(shape))
    mags = np.linspace(0.5, 4.0, n)[_rng(seed).permutation(n)] if n else np.zeros(0)
    signs = _rng(seed + 1).choice([-1.0, 1.0], n)
    return (mags * signs).reshape(shape).astype(dtype)


SHAPES = {"0-d": (), "empty": (0,), "empty-matrix": (3, 0), "one": (1,), "odd": (7,),
          "not-a-block-multiple": (5, 13), "big": (1000,), "3-d": (4, 9, 11)}


# -- round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_every_codec_dtype_and_shape(codec, dtype, shape):
    x = _distinct(SHAPES[shape], dtype)
    # raw keeps the tensor's own dtype; the lossy codecs compute in float32 whatever it is
    wire = wire_dtype(x.dtype) if codec == "fp32" else F32
    meta, payload = _encode(x, codec, wire)
    assert len(payload) == codecs.REGISTRY[meta.codec].payload_size(meta)
    out = codecs.decode(meta, bytes(payload), max_elements=BIG)
    assert out.shape == x.shape
    assert out.dtype == (x.dtype if codec == "fp32" else np.float32)
    _check_error(codec, x, out)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("view", ["transpose", "step", "negative-stride", "fortran"])
def test_non_contiguous_views_encode_their_logical_values(codec, view):
    base = _distinct((6, 10, 8), np.float32)
    array = {"transpose": base.transpose(2, 0, 1), "step": base[:, ::2, 1::3],
             "negative-stride": base[::-1, :, ::-1], "fortran": np.asfortranarray(base)}[view]
    assert not array.flags.c_contiguous
    out = _through(array, codec)
    # same rng seed: stochastic rounding and sampling see the same logical sequence
    np.testing.assert_array_equal(out, _through(np.ascontiguousarray(array), codec))
    _check_error(codec, array, out)


def test_raw_casts_a_float64_tensor_to_its_float32_wire_dtype():
    x = _rng().standard_normal(10)
    out = _through(x, "fp32", F32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float32))


def test_raw_refuses_an_integer_tensor_with_a_float_wire_dtype():
    with pytest.raises(InvalidArgument, match="'t'"):
        _encode(np.arange(4, dtype=np.int32), "fp32", F32)


@pytest.mark.parametrize("codec", ["int8", "topk:0.01"])
def test_small_tensors_skip_lossy_codecs_and_go_raw(codec):
    x = _rng().standard_normal(100)  # float64: 800 bytes
    meta, payload = _encode(x, codec, small_tensor_bytes=800)
    assert meta.codec == tensor_pb2.CODEC_RAW
    np.testing.assert_array_equal(codecs.decode(meta, payload, BIG), x.astype(np.float32))
    meta, _ = _encode(x, codec, small_tensor_bytes=799)
    assert meta.codec == codecs.REGISTRY[CodecConfig.parse(codec).codec].wire


def test_every_codec_enum_value_except_unspecified_has_a_registered_codec():
    missing = [tensor_pb2.Codec.Name(v) for v in tensor_pb2.Codec.values()
               if v != tensor_pb2.CODEC_UNSPECIFIED and v not in codecs.REGISTRY]
    assert missing == []
    assert all(c.wire == v for v, c in codecs.REGISTRY.items())
    assert tensor_pb2.CODEC_UNSPECIFIED not in codecs.REGISTRY


# -- int8 --------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [1, 7, 256, 1000])
def test_int8_error_is_within_one_step_of_each_blocks_scale(block):
    x = _rng(block).standard_normal(2500).astype(np.float32) * np.repeat([1e-3, 1.0, 50.0], [900, 800, 800])
    out = _through(x, f"int8:{block}")
    steps = _int8_steps(x, block)
    assert (np.abs(out.astype(np.float64) - x) <= steps * (1 + 1e-6)).all()


def test_int8_payload_is_float32_block_scales_then_int8_values():
    x = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 3.0], np.float32)
    meta, payload = _encode(x, "int8:3")
    assert meta.int8.block_size == 3 and meta.codec == tensor_pb2.CODEC_INT8
    raw = bytes(payload)
    assert len(raw) == 3 * 4 + 7  # blocks of 3, 3 and a short 1
    scales = np.frombuffer(raw[:12], "<f4")
    np.testing.assert_allclose(scales, [2.0 / 127, 0.0, 3.0 / 127], rtol=1e-7)
    q = np.frombuffer(raw[12:], np.int8)
    assert q[1] == -127 and q[6] == 127 and (q[3:6] == 0).all()  # absmax hits the end exactly


def test_int8_stochastic_rounding_is_unbiased():
    # One block repeated 4000 times: every copy has the same scale, so the mean of the decoded
    # copies estimates E[decode(x)] with standard error <= step / (2 sqrt(4000)) = 0.008 step.
    # Round-to-nearest would be off by up to half a step; 0.04 step is 5 standard errors.
    block = np.concatenate([[1.0], _rng(1).uniform(-1, 1, 63)]).astype(np.float32)
    reps = 4000
    out = _through(np.tile(block, reps), "int8:64").reshape(reps, 64)
    step = 1.0 / 127
    assert np.abs(out.mean(axis=0) - block).max() <= 0.04 * step
    # and it really is random: values between levels are decoded to both neighbours
    assert (out.min(axis=0) < out.max(axis=0)).sum() >= 60


def test_int8_with_a_fixed_rng_is_deterministic():
    x = _rng().standard_normal(1000).astype(np.float32)
    a = _encode(x, "int8", rng=_rng(5))[1]
    b = _encode(x, "int8", rng=_rng(5))[1]
    assert bytes(a) == bytes(b)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_refuses_non_finite_values_naming_the_tensor(bad):
    x = np.ones(10, np.float32)
    x[3] = bad
    with pytest.raises(InvalidArgument, match="'t'.*non-finite|'t'.*NaN"):
        _encode(x, "int8")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_processes_round_differently():
    # Workers forked from one parent must not share the rounding stream, or their
    # quantization errors add up across workers instead of averaging out.
    x = np.full(4096, 0.5 / 127, np.float32)
    x[0] = 1.0  # scale 1/127: every other element sits halfway between 0 and one step
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: encode with the default generator, send the bytes, leave at once
        try:
            os.write(write_fd, bytes(codecs.encode("t", x, F32, CodecConfig("int8"))[1]))
        finally:
            os._exit(0)
    os.close(write_fd)
    child = b""
    while chunk := os.read(read_fd, 65536):
        child += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    parent = bytes(codecs.encode("t", x, F32, CodecConfig("int8"))[1])
    assert len(child) == len(parent) == 4 * 16 + 4096
    assert child != parent


def test_int8_zero_blocks_decode_to_zero():
    out = _through(np.zeros(300, np.float32), "int8")
    assert (out == 0).all() and not np.signbit(out).any()


# -- top-k -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1000, 50_000, topk.SAMPLE_MIN_ELEMENTS + 12_345])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.3])
def test_topk_keeps_exactly_the_k_largest_magnitudes(n, density):
    x = _rng(n).standard_normal(n).astype(np.float32)
    meta, payload = _encode(x, f"topk:{density}", rng=_rng(7))
    k = max(1, round(density * n))
    assert meta.codec == tensor_pb2.CODEC_TOPK and meta.topk.k == k
    idx = np.frombuffer(bytes(payload)[2 * k:], "<u4")
    order = np.sort(np.abs(x))[::-1]
    kept = np.abs(x[idx])
    np.testing.assert_array_equal(np.sort(kept)[::-1], order[:k])  # the k largest, all of them
    assert (np.diff(idx.astype(np.int64)) > 0).all()
    out = codecs.decode(meta, payload, BIG)
    np.testing.assert_array_equal(out[idx], _bf16(x[idx]))
    assert np.count_nonzero(out) == np.count_nonzero(_bf16(x[idx]))


def test_topk_with_ties_keeps_k_elements_none_smaller_than_any_dropped():
    n = topk.SAMPLE_MIN_ELEMENTS * 2
    x = _rng().integers(-20, 21, n).astype(np.float32)  # massive ties
    k = round(0.01 * n)
    for rng in (_rng(0), _rng(1)):
        idx = topk.top_k_indices(np.abs(x), k, rng)
        dropped = np.ones(n, bool)
        dropped[idx] = False
        assert idx.size == k == np.unique(idx).size
        assert np.abs(x[idx]).min() >= np.abs(x[dropped]).max()


class _WorstSampler:
    """An rng whose 'random' sample is only the largest element: the sampled threshold then
    admits fewer than k candidates, forcing the full-partition fallback."""

    def __init__(self, where):
        self.where = where

    def integers(self, low, high, size):
        return np.full(size, self.where)


def test_topk_falls_back_to_a_full_partition_when_the_sample_misleads():
    n = topk.SAMPLE_MIN_ELEMENTS + 1
    x = _rng().standard_normal(n).astype(np.float32)
    k = 500
    idx = topk.top_k_indices(np.abs(x), k, _WorstSampler(int(np.argmax(np.abs(x)))))
    np.testing.assert_array_equal(idx, np.sort(np.argsort(np.abs(x))[n - k:]))


def test_topk_goes_dense_bf16_when_the_sparse_form_is_not_smaller():
    x = _distinct((300,), np.float32)
    meta, payload = _encode(x, "topk:0.33")  # k = 99: 594 bytes < 600
    assert meta.codec == tensor_pb2.CODEC_TOPK and len(payload) == 594
    meta, payload = _encode(x, "topk:0.3334")  # k = 100: 600 bytes, no gain over bf16
    assert meta.codec == tensor_pb2.CODEC_BF16 and len(payload) == 600
    assert meta.WhichOneof("codec_params") is None
    np.testing.assert_array_equal(codecs.decode(meta, payload, BIG), _bf16(x))


def test_topk_refuses_nan_naming_the_tensor():
    x = _rng().standard_normal(1000).astype(np.float32)
    x[10] = np.nan
    with pytest.raises(InvalidArgument, match="'t'.*NaN"):
        _encode(x, "topk:0.01")


def test_topk_keeps_infinities_as_the_largest_magnitudes():
    x = _distinct((1000,), np.float32)
    x[[5, 500]] = [np.inf, -np.inf]
    out = _through(x, "topk:0.002")
    assert out[5] == np.inf and out[500] == -np.inf and np.count_nonzero(out) == 2


# -- refusing bad payloads ----------------------------------------------------------------

def _topk_payload(values, idx):
    return to_bf16_bits(np.asarray(values, np.float32)).tobytes() + np.asarray(idx, "<u4").tobytes()


def _topk_meta(n, k, name="grad/w"):
    meta = tensor_pb2.TensorMeta(name=name, dtype=F32, shape=[n], codec=tensor_pb2.CODEC_TOPK)
    meta.topk.k = k
    return meta


@pytest.mark.parametrize("idx,why", [([1, 10], "out of range"), ([3, 3], "increasing"),
                                     ([5, 2], "increasing"), ([0xFFFFFFFF, 0], "increasing")])
def test_topk_decode_refuses_bad_indices_naming_the_tensor(idx, why):
    with pytest.raises(InvalidArgument, match=f"'grad/w'.*{why}"):
        codecs.decode(_topk_meta(10, 2), _topk_payload([1, 2], idx), BIG)


def test_topk_decode_refuses_k_over_the_element_count():
    with pytest.raises(InvalidArgument, match="'grad/w'.*k=11"):
        codecs.decode(_topk_meta(10, 11), _topk_payload(np.ones(11), range(11)), BIG)


@pytest.mark.parametrize("codec", ["int8", "topk:0.01"])
def test_decode_refuses_missing_codec_params_naming_the_tensor(codec):
    meta, payload = _encode(_rng().standard_normal(1000), codec)
    meta.ClearField(meta.WhichOneof("codec_params"))
    with pytest.raises(InvalidArgument, match="'t'"):
        codecs.decode(meta, payload, BIG)


def test_int8_decode_refuses_block_size_zero_and_params_of_another_codec():
    meta, payload = _encode(_rng().standard_normal(1000), "int8")
    meta.int8.block_size = 0
    with pytest.raises(InvalidArgument, match="'t'.*block size"):
        codecs.decode(meta, payload, BIG)
    meta.topk.k = 3  # the oneof now holds top-k parameters
    with pytest.raises(InvalidArgument, match="'t'.*block size"):
        codecs.decode(meta, payload, BIG)


def test_int8_decode_refuses_a_non_finite_scale():
    meta, payload = _encode(np.ones(10, np.float32), "int8")
    bad = np.array([np.inf], "<f4").tobytes() + bytes(payload)[4:]
    with pytest.raises(InvalidArgument, match="'t'.*scale"):
        codecs.decode(meta, bad, BIG)


@pytest.mark.parametrize("codec", ["int8", "int8:7", "topk:0.01", "fp16", "bf16"])
@pytest.mark.parametrize("delta", [-1, 1, -4, 6])
def test_decode_refuses_payload_length_disagreeing_with_codec_params(codec, delta):
    meta, payload = _encode(_rng().standard_normal(1000), codec)
    payload = bytes(payload)
    bad = payload[:delta] if delta < 0 else payload + b"\0" * delta
    with pytest.raises(InvalidArgument, match="'t'.*payload of"):
        codecs.decode(meta, bad, BIG)


def test_decode_refuses_block_size_disagreeing_with_the_payload():
    meta, payload = _encode(_rng().standard_normal(1000), "int8:10")  # 100 scales
    meta.int8.block_size = 20  # would expect 50 scales
    with pytest.raises(InvalidArgument, match="'t'.*payload of"):
        codecs.decode(meta, payload, BIG)


def test_unknown_codec_names_the_tensor():
    meta, payload = _encode(np.ones(3, np.float32), "fp32")
    meta.codec = 99
    with pytest.raises(InvalidArgument, match="'t'.*unknown codec"):
        codecs.decode(meta, payload, BIG)


# -- the lossless layer -------------------------------------------------------------------

def _noise(n=50_000, seed=0):
    """Float noise with nothing to exploit: random mantissas and exponents spread over 2**200."""
    rng = _rng(seed)
    return (rng.uniform(-1, 1, n) * 2.0 ** rng.integers(-100, 100, n)).astype(np.float32)


@pytest.mark.parametrize("policy", ["auto", "zstd", "lz4"])
def test_lossless_is_skipped_for_noise(policy):
    x = _noise()
    meta, payload = _encode(x, "fp32", lossless=policy)
    assert not meta.HasField("lossless")
    assert bytes(payload) == x.tobytes()


@pytest.mark.parametrize("policy", ["auto", "zstd", "lz4"])
@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "topk:0.01"])
@pytest.mark.parametrize("kind", ["zeros", "repeated"])
def test_lossless_compresses_repetitive_tensors_and_round_trips(policy, codec, kind):
    x = np.zeros((64, 100), np.float32) if kind == "zeros" else np.tile(
        np.array([0.5, -1.25, 3.0, 0.0], np.float32), 1600).reshape(64, 100)
    plain_meta, plain = _encode(x, codec)
    meta, payload = _encode(x, codec, lossless=policy)
    assert meta.HasField("lossless")
    assert meta.lossless.algorithm == (tensor_pb2.LOSSLESS_LZ4 if policy == "lz4"
                                       else tensor_pb2.LOSSLESS_ZSTD)
    assert meta.lossless.raw_size == len(plain)
    assert meta.lossless.shuffle_width == codecs.REGISTRY[meta.codec].shuffle_width(meta)
    assert len(payload) <= 0.9 * len(plain)
    np.testing.assert_array_equal(codecs.decode(meta, bytes(payload), BIG),
                                  codecs.decode(plain_meta, plain, BIG))


def test_lossless_keeps_the_frame_only_when_it_saves_at_least_ten_percent(monkeypatch):
    raw = bytes(range(200)) * 5  # 1000 bytes
    for frame_len, applied in [(900, True), (901, False), (1000, False)]:
        monkeypatch.setattr(lossless, "compress", lambda data, alg, width, n=frame_len: b"x" * n)
        meta = tensor_pb2.TensorMeta(name="t")
        out = lossless.apply(meta, raw, "auto", 4)
        assert meta.HasField("lossless") == applied
        assert len(out) == (frame_len if applied else 1000)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 16, 1001])
def test_shuffle_inverts(width, n):
    data = _rng().integers(0, 256, n, dtype=np.uint8)
    np.testing.assert_array_equal(lossless.unshuffle(lossless.shuffle(data, width), width), data)


def test_lossless_policy_must_be_known():
    with pytest.raises(InvalidArgument, match="lossless 'gzip'"):
        _encode(np.zeros(100, np.float32), "fp32", lossless="gzip")


def _zeros_zstd(policy="zstd"):
    meta, payload = _encode(np.zeros(1000, np.float32), "fp32", lossless=policy)
    assert meta.HasField("lossless")
    return meta, bytes(payload)


def test_lossless_frame_claiming_raw_size_over_the_cap_is_refused_before_decompressing():
    meta, _ = _zeros_zstd()
    meta.lossless.raw_size = 1 << 40
    # Garbage frame: had it been decompressed first, the error would be about the frame.
    with pytest.raises(InvalidArgument, match="'t'.*over the cap"):
        codecs.decode(meta, b"\x28\xb5\x2f\xfd garbage", max_elements=1000)


def test_lossless_frame_claiming_a_raw_size_other_than_the_codecs_is_refused():
    meta, payload = _zeros_zstd()
    meta.lossless.raw_size = 3996
    with pytest.raises(InvalidArgument, match="'t'.*claims 3996 raw bytes, expected 4000"):
        codecs.decode(meta, payload, BIG)


def test_zstd_frame_declaring_a_huge_content_size_is_refused_before_allocating():
    # A hand-made frame: magic, a header with an 8-byte content size of 2**40 (single segment),
    # then one empty last raw block. zstandard would try to allocate the declared 1 TiB.
    frame = (b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + (1 << 40).to_bytes(8, "little")
             + b"\x01\x00\x00")
    assert zstandard.frame_content_size(frame) == 1 << 40
    meta, _ = _zeros_zstd()
    with pytest.raises(InvalidArgument, match="'t'.*declares 1099511627776 bytes, expected 4000"):
        codecs.decode(meta, frame, BIG)


@pytest.mark.parametrize("make", [
    lambda: zstandard.ZstdCompressor().compress(bytes(40_000)),  # header declares 40000
    lambda: zstandard.ZstdCompressor(write_content_size=False).compress(bytes(40_000)),
    lambda: lz4.frame.compress(bytes(40_000)),
    lambda: lz4.frame.compress(bytes(40_000), store_size=False),
], ids=["zstd-declared", "zstd-undeclared", "lz4-declared", "lz4-undeclared"])
def test_lossless_frame_inflating_past_its_raw_size_is_refused(make):
    frame = make()
    meta, _ = _zeros_zstd("lz4" if frame[:4] == b"\x04\x22\x4d\x18" else "zstd")
    with pytest.raises(InvalidArgument, match="'t'"):
        codecs.decode(meta, frame, BIG)


@pytest.mark.parametrize("policy", ["zstd", "lz4"])
@pytest.mark.parametrize("damage", ["truncated", "trailing", "garbage"])
def test_damaged_lossless_frames_are_refused_naming_the_tensor(policy, damage):
    meta, payload = _zeros_zstd(policy)
    bad = {"truncated": payload[:-3], "trailing": payload + payload,
           "garbage": b"not a frame at all"}[damage]
    with pytest.raises(InvalidArgument, match="'t'"):
        codecs.decode(meta, bad, BIG)


def test_lossless_unknown_algorithm_and_wide_shuffle_are_refused():
    meta, payload = _zeros_zstd()
    meta.lossless.shuffle_width = 1000
    with pytest.raises(InvalidArgument, match="'t'.*shuffle width"):
        codecs.decode(meta, payload, BIG)
    meta.lossless.shuffle_width = 4
    meta.lossless.algorithm = 9
    with pytest.raises(InvalidArgument, match="'t'.*unknown lossless"):
        codecs.decode(meta, payload, BIG)


# -- error feedback ------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["topk:0.01", "topk:0.1", "int8", "int8:16", "fp16", "bf16"])
def test_error_feedback_sent_plus_residual_equals_the_true_gradient_sum(codec):
    ef, rng, cfg = ErrorFeedback(), _rng(3), CodecConfig.parse(codec)
    shape = (40, 25)
    true_sum = np.zeros(shape, np.float64)
    sent_sum = np.zeros(shape, np.float64)
    for step in range(50):
        grad = (rng.standard_normal(shape) * (1 + step % 5)).astype(np.float32)
        before = grad.copy()
        meta, payload = ef.compress("w", grad, cfg, rng=rng)
        np.testing.assert_array_equal(grad, before)  # the caller's gradient is not touched
        true_sum += grad
        sent_sum += codecs.decode(meta, payload, BIG)
    total = sent_sum + ef.residual("w")
    np.testing.assert_allclose(total, true_sum, rtol=1e-5, atol=1e-5 * np.abs(true_sum).max())


def test_without_error_feedback_top_k_loses_what_it_drops():
    cfg = CodecConfig.parse("topk:0.01", error_feedback=False)
    ef, rng = ErrorFeedback(), _rng(3)
    true_sum = sent_sum = 0.0
    for _ in range(50):
        grad = rng.standard_normal(1000).astype(np.float32)
        meta, payload = ef.compress("w", grad, cfg, rng=rng)
        true_sum += grad
        sent_sum += codecs.decode(meta, payload, BIG)
    assert ef.residual("w") is None
    assert np.abs(sent_sum - true_sum).max() > 1.0  # the invariant above is not vacuous


def test_error_feedback_applies_the_residual_to_the_next_step():
    ef, cfg = ErrorFeedback(), CodecConfig.parse("topk:0.1")
    grad = np.arange(1, 11, dtype=np.float32)  # k = 1: sends 10, keeps 1..9
    _, p1 = ef.compress("w", grad, cfg)
    np.testing.assert_array_equal(ef.residual("w"), np.r_[np.arange(1, 10), 0])
    meta, p2 = ef.compress("w", np.zeros(10, np.float32), cfg)
    np.testing.assert_array_equal(codecs.decode(meta, p2, BIG), np.r_[np.zeros(8), 9, 0])


def test_error_feedback_skips_raw_and_small_tensors():
    ef = ErrorFeedback()
    ef.compress("raw", np.ones(10, np.float32), CodecConfig.parse("fp32"))
    meta, _ = ef.compress("bias", np.ones(10, np.float32), CodecConfig.parse("int8"),
                          small_tensor_bytes=40)
    assert meta.codec == tensor_pb2.CODEC_RAW
    assert ef.residual("raw") is None and ef.residual("bias") is None


def test_error_feedback_residual_stays_finite_after_fp16_overflow():
    ef, cfg = ErrorFeedback(), CodecConfig.parse("fp16")
    ef.compress("w", np.array([1e6, 1.0 + 2 ** -12], np.float32), cfg)
    r = ef.residual("w")
    assert np.isfinite(r).all() and r[0] == 0 and r[1] != 0


def test_error_feedback_refuses_a_shape_change_until_reset():
    ef, cfg = ErrorFeedback(), CodecConfig.parse("int8")
    ef.compress("w", np.ones(10, np.float32), cfg)
    with pytest.raises(InvalidArgument, match="'w'.*reset"):
        ef.compress("w", np.ones(12, np.float32), cfg)
    ef.reset("w")
    ef.compress("w", np.ones(12, np.float32), cfg)


def test_error_feedback_with_lossless_layer_decodes_to_what_it_accounted_for():
    ef, cfg = ErrorFeedback(), CodecConfig.parse("int8")
    grad = np.tile(np.array([0.25, -0.5], np.float32), 5000)
    meta, payload = ef.compress("w", grad, cfg, lossless="zstd")
    assert meta.HasField("lossless")
    np.testing.assert_allclose(codecs.decode(meta, payload, BIG) + ef.residual("w"), grad, rtol=1e-6)


def test_compression_stats_count_logical_and_wire_bytes():
    ef = ErrorFeedback()
    x = _rng().standard_normal(10_000).astype(np.float32)
    for _ in range(3):
        meta, payload = ef.compress("w", x, CodecConfig.parse("topk:0.01"))
    ef.compress("b", np.zeros(1000, np.float32), CodecConfig.parse("bf16"), lossless="auto")
    s = ef.stats()
    w, b = s["w"], s["b"]
    assert (w.codec, w.logical_bytes, w.wire_bytes, w.pushes) == ("CODEC_TOPK", 40_000, 600, 3)
    assert w.header_bytes == meta.ByteSize() and w.total_wire_bytes == 1800
    assert w.encode_s > 0 and w.total_encode_s >= w.encode_s
    assert w.ratio == pytest.approx(120_000 / (1800 + 3 * meta.ByteSize()))
    assert b.lossless == "LOSSLESS_ZSTD" and b.wire_bytes < 200
    assert ef.totals().total_logical_bytes == 124_000
