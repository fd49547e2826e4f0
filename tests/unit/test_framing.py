"""pscommon.framing: frames are protobuf's own bytes, and reading them agrees with protobuf.

The fast path may only ever differ from protobuf in speed: frames must serialize byte for byte
as the envelopes would, and whatever parse_frame accepts must parse, through protobuf, to the
same chunk. Anything it does not recognise is protobuf's to accept or refuse.
"""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from shardps.pscommon import framing
from shardps.pscommon.tensors import ChunkAssembler, Frame, chunk_payload
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2

ENVELOPES = [ps_pb2.PushRequest, ps_pb2.PullResponse, ps_pb2.DeclareRequest]
CHUNK = 1 << 10


def meta(n: int, **params) -> tensor_pb2.TensorMeta:
    return tensor_pb2.TensorMeta(name=f"layer.{n}", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[n],
                                 codec=tensor_pb2.CODEC_RAW, **params)


def protobuf_bytes(envelope, m, payload) -> list[bytes]:
    return [envelope(chunk=c).SerializeToString() for c in chunk_payload(m, payload, CHUNK)]


@pytest.mark.parametrize("envelope", ENVELOPES, ids=lambda e: e.__name__)
@pytest.mark.parametrize("n", [0, 1, 7, CHUNK // 4, CHUNK // 4 + 1, 3 * CHUNK // 4, 1000])
def test_frames_are_the_bytes_protobuf_writes(envelope, n):
    payload = np.arange(n, dtype=np.float32).data
    frames = list(framing.chunk_frames(meta(n), payload, CHUNK))
    assert frames == protobuf_bytes(envelope, meta(n), payload)
    assert len(frames) == max(1, -(-4 * n // CHUNK))


def test_frames_carry_typed_codec_parameters_and_payload_size():
    m = tensor_pb2.TensorMeta(name="emb", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[100, 3],
                              codec=tensor_pb2.CODEC_TOPK, topk=tensor_pb2.TopKParams(k=5))
    payload = bytes(range(30))
    (only,) = framing.chunk_frames(m, payload, CHUNK)
    parsed = ps_pb2.PushRequest.FromString(only).chunk
    assert parsed.meta.topk.k == 5 and parsed.meta.payload_size == 30 and parsed.data == payload


@pytest.mark.parametrize("n", [0, 5, 1000])
def test_parse_frame_reads_what_protobuf_reads_as_a_view(n):
    payload = (np.arange(n, dtype=np.float32) - 3.5).data
    for data in framing.chunk_frames(meta(n), payload, CHUNK):
        frame = framing.parse_frame(data)
        ref = ps_pb2.PushRequest.FromString(data).chunk
        assert frame is not None
        assert Frame(frame.meta, frame.offset, bytes(frame.data)) == Frame.of(ref)
        if len(frame.data):
            assert frame.data.obj is data  # no copy: a view of the received message


def test_headers_and_empty_messages_go_to_protobuf():
    header = ps_pb2.PushRequest(header=ps_pb2.PushHeader(step=7)).SerializeToString()
    assert framing.parse_frame(header) is None
    parsed = framing.deserializer(ps_pb2.PushRequest)(header)
    assert framing.body_of(parsed) == "header" and parsed.header.step == 7
    assert framing.chunk_of(parsed) is None
    empty = framing.deserializer(ps_pb2.PushRequest)(b"")
    assert framing.body_of(empty) is None and framing.chunk_of(empty) is None


def test_serialize_passes_frames_and_serializes_messages():
    msg = ps_pb2.PullResponse(header=ps_pb2.PullHeader(shard_version=3))
    assert framing.serialize(msg) == msg.SerializeToString()
    (frame,) = framing.chunk_frames(meta(2), np.zeros(2, np.float32).data)
    assert framing.serialize(frame) is frame


def test_the_assembler_takes_frames_and_messages_alike():
    a = np.arange(700, dtype=np.float32)
    frames = [framing.parse_frame(f) for f in framing.chunk_frames(meta(700), a.data, CHUNK)]
    messages = chunk_payload(meta(700), a.data, CHUNK)
    for chunks in (frames, list(messages)):
        asm = ChunkAssembler(1 << 20, 1 << 20)
        done = [asm.add(c) for c in chunks]
        assert done[:-1] == [None] * (len(chunks) - 1)
        m, payload = done[-1]
        assert m.name == "layer.700" and np.array_equal(np.frombuffer(payload, np.float32), a)
        asm.finish()


# -- whatever parse_frame accepts, protobuf parses to the same chunk ------------------------------
def agrees_with_protobuf(data: bytes) -> None:
    try:
        frame = framing.parse_frame(data)
    except DecodeError:  # only a malformed TensorMeta, which protobuf refuses as well
        with pytest.raises(DecodeError):
            ps_pb2.PushRequest.FromString(data)
        return
    if frame is None:
        return
    ref = ps_pb2.PushRequest.FromString(data)
    assert ref.WhichOneof("body") == "chunk"
    c = ref.chunk
    assert frame.meta == (c.meta if c.HasField("meta") else None)
    assert (frame.offset, bytes(frame.data)) == (c.offset, c.data)


def varint(n: int) -> bytes:
    return framing._varint(n)


FIELD = st.one_of(
    st.builds(lambda m: b"\x0a" + varint(len(m)) + m, st.just(meta(3).SerializeToString())),  # meta
    st.builds(lambda b: b"\x0a" + varint(len(b)) + b, st.binary(max_size=12)),  # meta, maybe junk
    st.builds(lambda v: b"\x10" + varint(v), st.integers(0, 2**64 - 1)),       # offset
    st.builds(lambda b: b"\x1a" + varint(len(b)) + b, st.binary(max_size=40)),  # data
    st.builds(lambda k, b: varint(k) + b, st.integers(0, 300), st.binary(max_size=6)),  # anything
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(FIELD, max_size=5), st.sampled_from([0, 0, 0, 0, 0, -1, 1, 2]),
       st.one_of(st.just(b""), st.just(b""), st.binary(max_size=3)))
def test_structured_envelopes_agree_with_protobuf(fields, length_error, tail):
    inner = b"".join(fields)
    agrees_with_protobuf(b"\x12" + varint(max(0, len(inner) + length_error)) + inner + tail)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_agree_with_protobuf(data):
    agrees_with_protobuf(data)
    agrees_with_protobuf(b"\x12" + data)


@settings(max_examples=500, deadline=None)
@given(st.permutations(["meta", "offset", "data"]), st.integers(0, 3), st.integers(0, 2**64 - 1),
       st.binary(max_size=300))
def test_fields_in_any_order_are_read_as_protobuf_reads_them(order, keep, offset, data):
    encoded = {"meta": b"\x0a" + varint(len(m := meta(9).SerializeToString())) + m,
               "offset": b"\x10" + varint(offset), "data": b"\x1a" + varint(len(data)) + data}
    inner = b"".join(encoded[name] for name in order[:keep])
    message = b"\x12" + varint(len(inner)) + inner
    assert framing.parse_frame(message) is not None
    agrees_with_protobuf(message)


@pytest.mark.parametrize("batch_type,header", [
    (ps_pb2.PushBatchRequest, ps_pb2.PushHeader(step=4, model_fingerprint="fp")),
    (ps_pb2.PullBatchReply, ps_pb2.PullHeader(shard_version=9, next_step=2)),
], ids=["push", "pull"])
def test_a_batch_is_its_header_then_the_frames(batch_type, header):
    tensors = {"a": np.arange(5, dtype=np.float32), "b": np.zeros(0, np.float32), "c": np.ones(300, np.float32)}
    frames = [f for name, t in tensors.items() for f in framing.chunk_frames(meta(t.size), t.data, CHUNK)]
    got = framing.batch(batch_type(header=header), frames)
    chunks = [c for t in tensors.values() for c in chunk_payload(meta(t.size), t.data, CHUNK)]
    assert got == batch_type(header=header, chunks=chunks).SerializeToString()
