"""Data-plane messages serialized with one copy of the payload.

Building `PushRequest(chunk=TensorChunk(data=payload))` and serializing it copies a chunk's
bytes three or four times (into the chunk, into the envelope, into the serialized string):
at 2 MiB a chunk that costs about 1 ms, seven times a plain memcpy (docs/benchmarks.md).
`chunk_frames` writes the same protobuf wire bytes directly: the small head (tags, lengths,
the TensorMeta) goes through protobuf, the payload is joined in once. The result is an
ordinary serialized `PushRequest`, `DeclareRequest` or `PullResponse` (all three carry the
chunk in the same field), so any protobuf peer parses it; only the sending side knows.

gRPC calls `serialize` on everything a stub or handler sends: frames pass through as they
are, messages are serialized as usual. On receipt, `deserializer` reads a message of exactly
that shape as a `Frame` whose data is a view of the received bytes (protobuf would copy them
twice more); anything else, headers and malformed input included, goes to protobuf's parser,
so what is accepted and refused is protobuf's decision.
"""
from __future__ import annotations

from typing import Iterator

import grpc

from shardps.pscommon import interceptors
from shardps.pscommon.tensors import CHUNK_BYTES, Chunk, Frame
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc, tensor_pb2

_LEN = 2  # protobuf wire type of length-delimited fields
_SERVICE = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]


def _field_number(message, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number


def _chunk_field() -> int:
    numbers = {_field_number(m, "chunk") for m in (ps_pb2.PushRequest, ps_pb2.PullResponse,
                                                   ps_pb2.DeclareRequest)}
    numbers |= {_field_number(m, "chunks") for m in (ps_pb2.PushBatchRequest, ps_pb2.PullBatchReply,
                                                     ps_pb2.PushPullRequest, ps_pb2.PushPullReply)}
    if len(numbers) != 1:  # the .proto changed: frames would no longer parse as all three
        raise RuntimeError(f"the data-plane envelopes disagree on the chunk field: {numbers}")
    return numbers.pop()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# field keys (number << 3 | wire type) as protobuf writes them before each field
_META_KEY = _field_number(tensor_pb2.TensorChunk, "meta") << 3 | _LEN
_OFFSET_KEY = _field_number(tensor_pb2.TensorChunk, "offset") << 3  # a varint
_DATA_KEY = _field_number(tensor_pb2.TensorChunk, "data") << 3 | _LEN
_CHUNK_TAG = _varint(_chunk_field() << 3 | _LEN)
# Transfers up to this size go as one PullBatch/PushBatch/PushPullBatch message; larger ones
# stream frames. 4 MiB, half the 8 MiB message cap (headroom for headers, keys and rows):
# ps-loop's small preset at S,W = 2,2 (2 MB a shard) moved 35% more as one message each way
# than streamed at a 1 MiB bound, and at 1,1 (4 MB) the same (docs/benchmarks.md).
BATCH_BYTES = 4 << 20
_DATA_TAG = _varint(_DATA_KEY)


def frame(meta: tensor_pb2.TensorMeta | None, offset: int, data) -> bytes:
    """One serialized envelope whose `chunk` is TensorChunk(meta, offset, data)."""
    head = tensor_pb2.TensorChunk(meta=meta, offset=offset).SerializeToString()
    n = len(data)
    # proto3 leaves an empty bytes field out; doing the same keeps frames byte-identical
    # to what protobuf would write
    data_field = [_DATA_TAG, _varint(n), data] if n else []
    inner = len(head) + (len(_DATA_TAG) + len(_varint(n)) + n if n else 0)
    return b"".join([_CHUNK_TAG, _varint(inner), head, *data_field])


def chunk_frames(meta: tensor_pb2.TensorMeta, payload, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The frames of one tensor: meta on the first, then contiguous pieces of the payload.

    Sets meta.payload_size. Each frame is built when it is asked for, so a caller that holds
    a lock while taking them gets the payload's bytes as of that moment.
    """
    view = memoryview(payload).cast("B")
    meta.payload_size = len(view)
    yield frame(meta, 0, view[:chunk_bytes])
    for offset in range(chunk_bytes, len(view), chunk_bytes):
        yield frame(None, offset, view[offset:offset + chunk_bytes])


def batch(envelope, frames: list[bytes]) -> bytes:
    """A serialized PushBatchRequest or PullBatchReply: `envelope` (holding the header), then
    the frames, which encode its repeated `chunks` as they encode an envelope's `chunk`."""
    return b"".join([envelope.SerializeToString(), *frames])


def serialize(message) -> bytes:
    """gRPC serializer for the data-plane methods: frames as they are, messages serialized."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def parameter_server_stub(channel):
    """A ParameterServer stub whose uploads (Declare, Push, PushBatch, PushPullBatch) take frames and
    batches as well as messages and whose Pull yields Frames for chunks; the other methods
    are the generated stub's."""
    stub = ps_pb2_grpc.ParameterServerStub(channel)
    path = f"/{_SERVICE.full_name}/"
    for name, reply in (("Declare", ps_pb2.DeclareReply), ("Push", ps_pb2.PushReply)):
        setattr(stub, name, channel.stream_unary(path + name, request_serializer=serialize,
                                                 response_deserializer=reply.FromString))
    stub.PushBatch = channel.unary_unary(path + "PushBatch", request_serializer=serialize,
                                         response_deserializer=ps_pb2.PushReply.FromString)
    stub.PushPullBatch = channel.unary_unary(path + "PushPullBatch", request_serializer=serialize,
                                             response_deserializer=ps_pb2.PushPullReply.FromString)
    stub.Pull = channel.unary_stream(path + "Pull", request_serializer=serialize,
                                     response_deserializer=deserializer(ps_pb2.PullResponse))
    return stub


def add_parameter_server(servicer, server: grpc.Server) -> None:
    """Register a ParameterServer servicer as the generated add_..._to_server does, with
    `serialize` for every reply (so Pull may yield frames) and `deserializer` for the
    uploads (so Declare and Push receive Frames)."""
    def parse(message_class):
        carries_chunks = "chunk" in message_class.DESCRIPTOR.fields_by_name
        return deserializer(message_class) if carries_chunks else message_class.FromString

    handlers = {
        m.name: interceptors.make_handler(
            (m.client_streaming, m.server_streaming), getattr(servicer, m.name),
            request_deserializer=parse(getattr(ps_pb2, m.input_type.name)), response_serializer=serialize)
        for m in _SERVICE.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(_SERVICE.full_name, handlers)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < end and shift < 64:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return (value, pos) if value < 1 << 64 else None
        shift += 7
    return None


def parse_frame(data: bytes) -> Frame | None:
    """The Frame in a serialized envelope holding only a chunk of (meta?, offset?, data?),
    each at most once; None for anything else (the caller then asks protobuf)."""
    buf = memoryview(data)
    end = len(buf)
    if not data.startswith(_CHUNK_TAG):
        return None
    got = _read_varint(buf, len(_CHUNK_TAG), end)
    if got is None or got[0] != end - got[1]:
        return None
    pos, fields = got[1], {}
    while pos < end:
        got = _read_varint(buf, pos, end)
        if got is None:
            return None
        tag, pos = got
        if tag in fields or tag not in (_META_KEY, _OFFSET_KEY, _DATA_KEY):
            return None
        got = _read_varint(buf, pos, end)
        if got is None:
            return None
        value, pos = got
        if tag == _OFFSET_KEY:
            fields[tag] = value
            continue
        if value > end - pos:
            return None
        fields[tag] = buf[pos:pos + value]
        pos += value
    meta = fields.get(_META_KEY)
    return Frame(None if meta is None else tensor_pb2.TensorMeta.FromString(bytes(meta)),
                 fields.get(_OFFSET_KEY, 0), fields.get(_DATA_KEY, b""))


def deserializer(message_class):
    """gRPC deserializer for a data-plane envelope: a Frame where the bytes are one, else
    the parsed message."""
    def parse(data: bytes):
        frame = parse_frame(data)
        return frame if frame is not None else message_class.FromString(data)
    return parse


def body_of(message) -> str | None:
    """Which member of the envelope's `body` a received data-plane message holds."""
    return "chunk" if isinstance(message, Frame) else message.WhichOneof("body")


def chunk_of(message) -> Chunk | None:
    """The chunk a received data-plane message carries (None for a header or an empty body)."""
    if isinstance(message, Frame):
        return message
    return message.chunk if message.WhichOneof("body") == "chunk" else None
