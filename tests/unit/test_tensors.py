"""pscommon.tensors: chunking and reassembly, with the validation a server relies on."""
from __future__ import annotations

import numpy as np
import pytest

from shardps.pscommon import codecs
from shardps.pscommon.errors import InvalidArgument, ResourceExhausted
from shardps.pscommon.tensors import CHUNK_BYTES, ChunkAssembler, assemble, chunk_payload, numpy_dtype
from shardps.pscommon.wire.v1 import tensor_pb2

BIG = 1 << 30
ALL_DTYPES = [v for v in tensor_pb2.DType.values() if v != tensor_pb2.DTYPE_UNSPECIFIED]


def _sample(dtype: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values that exercise every byte of the dtype (bfloat16 as its uint16 bit patterns)."""
    rng = np.random.default_rng(seed)
    npd = numpy_dtype(dtype)
    if npd.kind == "b":
        return rng.integers(0, 2, size=shape).astype(npd)
    if npd.kind == "f":
        return rng.standard_normal(shape).astype(npd)
    info = np.iinfo(npd)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=npd)


def _round_trip(name: str, array: np.ndarray, dtype: int, chunk_bytes: int = CHUNK_BYTES):
    meta, payload = codecs.encode(name, array, dtype)
    chunks = list(chunk_payload(meta, payload, chunk_bytes))
    done = list(assemble(chunks, BIG, BIG))
    assert len(done) == 1
    out_meta, out_payload = done[0]
    return chunks, out_meta, codecs.decode(out_meta, out_payload, max_elements=BIG)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=tensor_pb2.DType.Name)
def test_every_dtype_round_trips_raw(dtype):
    array = _sample(dtype, (7, 5))
    _, meta, out = _round_trip("t", array, dtype)
    assert meta.dtype == dtype
    assert out.dtype == numpy_dtype(dtype)
    assert out.shape == array.shape
    assert out.tobytes() == array.tobytes()


def test_bfloat16_bit_patterns_survive_including_nan_and_inf():
    bits = np.array([0x0000, 0x8000, 0x3F80, 0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x0001], np.uint16)
    _, meta, out = _round_trip("bf", bits, tensor_pb2.DTYPE_BFLOAT16)
    assert meta.dtype == tensor_pb2.DTYPE_BFLOAT16
    np.testing.assert_array_equal(out, bits)


def test_tensor_above_four_mib_travels_in_several_ordered_chunks():
    array = _sample(tensor_pb2.DTYPE_FLOAT32, (5 << 18) + 3)  # just over 5 MiB
    chunks, meta, out = _round_trip("big", array, tensor_pb2.DTYPE_FLOAT32)
    n = -(-array.nbytes // CHUNK_BYTES)  # ceil: every chunk full but the last
    assert n >= 3 and len(chunks) == n
    assert chunks[0].HasField("meta") and not any(c.HasField("meta") for c in chunks[1:])
    assert [c.offset for c in chunks] == [i * CHUNK_BYTES for i in range(n)]
    assert meta.payload_size == array.nbytes
    np.testing.assert_array_equal(out, array)


def test_zero_dimensional_tensor_round_trips():
    array = np.array(2.5, dtype=np.float64)
    _, meta, out = _round_trip("scalar", array, tensor_pb2.DTYPE_FLOAT64)
    assert tuple(meta.shape) == ()
    assert out.shape == () and out.dtype == np.float64 and out == 2.5


def test_empty_vector_round_trips():
    array = np.zeros((0,), np.float32)
    chunks, meta, out = _round_trip("empty", array, tensor_pb2.DTYPE_FLOAT32)
    assert len(chunks) == 1 and meta.payload_size == 0
    assert out.shape == (0,) and out.dtype == np.float32


def test_empty_matrix_round_trips():
    array = np.zeros((3, 0), np.float32)
    _, meta, out = _round_trip("empty2d", array, tensor_pb2.DTYPE_FLOAT32)
    assert tuple(meta.shape) == (3, 0) and out.shape == (3, 0)


def test_several_tensors_in_one_stream_come_out_in_order():
    arrays = {f"t{i}": _sample(tensor_pb2.DTYPE_FLOAT32, (100 * (i + 1),), seed=i) for i in range(3)}
    chunks = []
    for name, a in arrays.items():
        chunks += chunk_payload(*codecs.encode(name, a, tensor_pb2.DTYPE_FLOAT32), chunk_bytes=256)
    asm = ChunkAssembler(BIG, BIG)
    out = [asm.add(c) for c in chunks]
    asm.finish()
    done = [d for d in out if d is not None]
    assert [m.name for m, _ in done] == list(arrays)
    assert asm.total == sum(a.nbytes for a in arrays.values())


def _chunks(name="w", n=1000, chunk_bytes=1024):
    meta, payload = codecs.encode(name, np.arange(n, dtype=np.float32), tensor_pb2.DTYPE_FLOAT32)
    return list(chunk_payload(meta, payload, chunk_bytes))


def _feed(chunks, max_tensor=BIG, max_total=BIG):
    list(assemble(chunks, max_tensor, max_total))


def test_out_of_order_chunk_is_refused_naming_the_tensor():
    c = _chunks()
    with pytest.raises(InvalidArgument, match="'w'.*offset 2048, expected 1024"):
        _feed([c[0], c[2], c[1], c[3]])


def test_chunk_without_meta_first_is_refused():
    with pytest.raises(InvalidArgument, match="metadata"):
        _feed(_chunks()[1:])


def test_first_chunk_at_nonzero_offset_is_refused_naming_the_tensor():
    first = _chunks()[0]
    first.offset = 8
    with pytest.raises(InvalidArgument, match="'w'.*offset 8"):
        _feed([first])


def test_second_tensor_before_first_completes_is_refused_naming_both():
    a, b = _chunks("a"), _chunks("b")
    with pytest.raises(InvalidArgument) as exc:
        _feed([a[0], b[0]])
    assert "'a'" in str(exc.value) and "'b'" in str(exc.value)


def test_continuation_chunk_beyond_payload_size_is_refused():
    c = _chunks(n=512, chunk_bytes=1024)  # exactly two chunks of 1024 bytes
    c[1].data = c[1].data + b"\0\0\0\0"
    with pytest.raises(InvalidArgument, match="'w'.*exceed"):
        _feed(c)


def test_first_chunk_beyond_payload_size_is_refused():
    c = _chunks(n=10)
    c[0].meta.payload_size = 8
    with pytest.raises(InvalidArgument, match="'w'.*exceeds"):
        _feed(c)


def test_stream_ending_mid_tensor_is_refused_naming_the_tensor():
    c = _chunks()
    with pytest.raises(InvalidArgument, match="'w'.*ended after 2048 of 4000"):
        _feed(c[:2])


def test_unnamed_tensor_is_refused():
    c = _chunks(n=4)
    c[0].meta.name = ""
    with pytest.raises(InvalidArgument, match="without a name"):
        _feed(c)


def test_payload_above_tensor_cap_is_resource_exhausted_before_buffering():
    c = _chunks(n=1000)
    with pytest.raises(ResourceExhausted, match="'w'.*4000 bytes exceeds the cap of 3999"):
        ChunkAssembler(3999, BIG).add(c[0])


def test_stream_above_total_cap_is_resource_exhausted():
    stream = _chunks("a", n=1000) + _chunks("b", n=1000)
    with pytest.raises(ResourceExhausted, match="'b'.*8000 bytes, cap is 7999"):
        _feed(stream, max_tensor=4000, max_total=7999)


def test_stream_exactly_at_caps_is_accepted():
    stream = _chunks("a", n=1000) + _chunks("b", n=1000)
    assert len(list(assemble(stream, 4000, 8000))) == 2


@pytest.mark.parametrize("delta", [-4, 4, -1])
def test_decode_refuses_payload_length_mismatch_naming_the_tensor(delta):
    meta, payload = codecs.encode("w", np.ones((3, 4), np.float32), tensor_pb2.DTYPE_FLOAT32)
    payload = bytes(payload)
    bad = payload[:delta] if delta < 0 else payload + b"\0" * delta
    with pytest.raises(InvalidArgument, match="'w'.*payload of"):
        codecs.decode(meta, bad, max_elements=BIG)


def test_decode_refuses_shape_that_disagrees_with_payload():
    meta, payload = codecs.encode("w", np.ones((3, 4), np.float32), tensor_pb2.DTYPE_FLOAT32)
    meta.shape[:] = [4, 4]
    with pytest.raises(InvalidArgument, match="'w'"):
        codecs.decode(meta, payload, max_elements=BIG)


def test_decode_refuses_dtype_that_disagrees_with_payload():
    meta, payload = codecs.encode("w", np.ones((3, 4), np.float32), tensor_pb2.DTYPE_FLOAT32)
    meta.dtype = tensor_pb2.DTYPE_FLOAT64
    with pytest.raises(InvalidArgument, match="'w'"):
        codecs.decode(meta, payload, max_elements=BIG)


def test_decode_refuses_more_elements_than_the_cap():
    meta, payload = codecs.encode("w", np.ones((3, 4), np.float32), tensor_pb2.DTYPE_FLOAT32)
    with pytest.raises(InvalidArgument, match="'w'.*12 elements"):
        codecs.decode(meta, payload, max_elements=11)


def test_decode_refuses_unknown_dtype():
    meta, payload = codecs.encode("w", np.ones(2, np.float32), tensor_pb2.DTYPE_FLOAT32)
    meta.dtype = tensor_pb2.DTYPE_UNSPECIFIED
    with pytest.raises(InvalidArgument, match="dtype"):
        codecs.decode(meta, payload, max_elements=BIG)


def test_decode_refuses_negative_dimension_naming_the_tensor():
    meta, payload = codecs.encode("w", np.ones((2, 2), np.float32), tensor_pb2.DTYPE_FLOAT32)
    meta.shape[:] = [-2, -2]  # product matches the payload, so only the shape check can refuse it
    with pytest.raises(InvalidArgument, match="'w'.*negative"):
        codecs.decode(meta, payload, max_elements=BIG)
