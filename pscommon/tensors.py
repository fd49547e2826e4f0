"""Tensors on the wire: dtype table, chunking of payloads, reassembly with validation.

A tensor travels as TensorMeta (name, dtype, shape, codec, payload size) plus a payload cut
into chunks of CHUNK_BYTES: protobuf framing is cheapest around 0.5-2 MiB a message
and gRPC's default receive limit is 4 MiB (docs/design.md, "The wire").
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Union

import numpy as np

from shardps.pscommon.errors import InvalidArgument, ResourceExhausted
from shardps.pscommon.wire.v1 import tensor_pb2

# 2 MiB: whole tensors of up to 2 MiB travel as one message and are decoded without a copy
# (measured in docs/benchmarks.md); framing cost is still small at this size
CHUNK_BYTES = 2 << 20
MAX_DIMS = 8

# bfloat16 has no numpy dtype: its payload is carried as the raw uint16 bit patterns.
_NUMPY = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT8: np.dtype("i1"),
    tensor_pb2.DTYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DTYPE_INT16: np.dtype("<i2"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_BOOL: np.dtype("?"),
}
_BY_NUMPY = {dt.str: code for code, dt in _NUMPY.items() if code != tensor_pb2.DTYPE_BFLOAT16}
DTYPE_NAMES = {code: tensor_pb2.DType.Name(code).removeprefix("DTYPE_").lower() for code in _NUMPY}
FLOAT_DTYPES = {tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16, tensor_pb2.DTYPE_BFLOAT16,
                tensor_pb2.DTYPE_FLOAT64}


def numpy_dtype(dtype: int) -> np.dtype:
    try:
        return _NUMPY[dtype]
    except KeyError:
        raise InvalidArgument(f"unsupported dtype {dtype}") from None


def wire_dtype(dtype: np.dtype) -> int:
    """The wire dtype of a numpy dtype (uint16 arrays are not taken as bfloat16)."""
    try:
        return _BY_NUMPY[np.dtype(dtype).newbyteorder("<").str if np.dtype(dtype).itemsize > 1
                         else np.dtype(dtype).str]
    except KeyError:
        raise InvalidArgument(f"unsupported numpy dtype {np.dtype(dtype)}") from None


def dtype_name(dtype: int) -> str:
    return DTYPE_NAMES.get(dtype, f"dtype{dtype}")


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def check_shape(name: str, shape: Iterable[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"tensor {name!r}: {len(shape)} dimensions, at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor {name!r}: negative dimension in shape {list(shape)}")
    return shape


def chunk_payload(meta: tensor_pb2.TensorMeta, payload, chunk_bytes: int = CHUNK_BYTES
                  ) -> Iterator[tensor_pb2.TensorChunk]:
    """The chunks of one tensor: meta on the first, then contiguous pieces of the payload."""
    view = memoryview(payload).cast("B")
    meta.payload_size = len(view)
    if len(view) <= chunk_bytes:
        yield tensor_pb2.TensorChunk(meta=meta, offset=0, data=bytes(view))
        return
    for offset in range(0, len(view), chunk_bytes):
        piece = bytes(view[offset:offset + chunk_bytes])
        if offset == 0:
            yield tensor_pb2.TensorChunk(meta=meta, offset=0, data=piece)
        else:
            yield tensor_pb2.TensorChunk(offset=offset, data=piece)


@dataclasses.dataclass(frozen=True)
class Frame:
    """What a TensorChunk carries, with `data` a view of the received message rather than
    protobuf's copy of it (see pscommon.framing). `meta` is None after a tensor's first chunk."""

    meta: tensor_pb2.TensorMeta | None
    offset: int
    data: bytes | memoryview

    @classmethod
    def of(cls, chunk: tensor_pb2.TensorChunk) -> "Frame":
        return cls(chunk.meta if chunk.HasField("meta") else None, chunk.offset, chunk.data)


Chunk = Union[Frame, tensor_pb2.TensorChunk]


class ChunkAssembler:
    """Reassembles a stream of TensorChunks into (meta, payload) pairs, refusing bad order.

    Caps are checked before any buffer is allocated: a chunk that claims a payload above
    `max_tensor_bytes`, or a stream whose sum passes `max_total_bytes`, is RESOURCE_EXHAUSTED.
    """

    def __init__(self, max_tensor_bytes: int, max_total_bytes: int):
        self.max_tensor_bytes = max_tensor_bytes
        self.max_total_bytes = max_total_bytes
        self.total = 0
        self._meta: tensor_pb2.TensorMeta | None = None
        self._buf: bytearray | None = None
        self._filled = 0

    def add(self, chunk: Chunk):
        """Feed one chunk; returns (meta, payload) when it completes a tensor, else None."""
        if not isinstance(chunk, Frame):
            chunk = Frame.of(chunk)
        if chunk.meta is not None:
            return self._start(chunk)
        if self._meta is None:
            raise InvalidArgument("chunk without tensor metadata: a tensor's first chunk must carry meta")
        if chunk.offset != self._filled:
            raise InvalidArgument(
                f"tensor {self._meta.name!r}: chunk at offset {chunk.offset}, expected {self._filled}")
        if self._filled + len(chunk.data) > self._meta.payload_size:
            raise InvalidArgument(
                f"tensor {self._meta.name!r}: chunks exceed the declared payload of "
                f"{self._meta.payload_size} bytes")
        self._buf[self._filled:self._filled + len(chunk.data)] = chunk.data
        self._filled += len(chunk.data)
        return self._maybe_done()

    def _start(self, chunk):
        meta = chunk.meta
        if self._meta is not None:
            raise InvalidArgument(
                f"tensor {meta.name!r} started before tensor {self._meta.name!r} was complete")
        if not meta.name:
            raise InvalidArgument("tensor without a name")
        if chunk.offset != 0:
            raise InvalidArgument(f"tensor {meta.name!r}: first chunk at offset {chunk.offset}, expected 0")
        size = meta.payload_size
        if size > self.max_tensor_bytes:
            raise ResourceExhausted(
                f"tensor {meta.name!r}: payload of {size} bytes exceeds the cap of {self.max_tensor_bytes}")
        if self.total + size > self.max_total_bytes:
            raise ResourceExhausted(
                f"tensor {meta.name!r}: transfer would reach {self.total + size} bytes, "
                f"cap is {self.max_total_bytes}")
        if len(chunk.data) > size:
            raise InvalidArgument(
                f"tensor {meta.name!r}: chunk of {len(chunk.data)} bytes exceeds the declared "
                f"payload of {size}")
        self.total += size
        self._meta = meta
        if len(chunk.data) == size:  # whole tensor in one message: no copy
            self._meta = None
            return meta, chunk.data
        self._buf = bytearray(size)
        self._buf[:len(chunk.data)] = chunk.data
        self._filled = len(chunk.data)
        return None

    def _maybe_done(self):
        if self._filled < self._meta.payload_size:
            return None
        meta, buf = self._meta, self._buf
        self._meta, self._buf, self._filled = None, None, 0
        return meta, bytes(buf) if len(buf) < 4096 else buf

    def finish(self) -> None:
        """Call at end of stream: an incomplete tensor is an error."""
        if self._meta is not None:
            raise InvalidArgument(
                f"tensor {self._meta.name!r}: stream ended after {self._filled} of "
                f"{self._meta.payload_size} bytes")


def assemble(chunks: Iterable[Chunk], max_tensor_bytes: int,
             max_total_bytes: int) -> Iterator[tuple[tensor_pb2.TensorMeta, bytes]]:
    asm = ChunkAssembler(max_tensor_bytes, max_total_bytes)
    for chunk in chunks:
        done = asm.add(chunk)
        if done is not None:
            yield done
    asm.finish()
