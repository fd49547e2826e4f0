"""raw ("fp32" for float32 tensors): the tensor's own bytes, nothing lost."""
from __future__ import annotations

import numpy as np

from shardps.pscommon.codecs.base import Codec, meta_numel
from shardps.pscommon.codecs.bf16 import from_bf16_bits, to_bf16_bits
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tensors import numpy_dtype
from shardps.pscommon.wire.v1 import tensor_pb2


class RawCodec(Codec):
    wire = tensor_pb2.CODEC_RAW
    lossy = False

    def encode(self, array, cfg, meta, rng=None):
        target = numpy_dtype(meta.dtype)
        if array.dtype == target:
            return np.ascontiguousarray(array).data
        # A lossy codec falls back to raw for small tensors; the caller's array may then be
        # float64 or float16 while the wire dtype says float32, so convert rather than send
        # bytes that disagree with meta.dtype.
        if array.dtype.kind == "f" and meta.dtype == tensor_pb2.DTYPE_BFLOAT16:
            return to_bf16_bits(np.asarray(array, dtype=np.float32)).data
        if array.dtype.kind == "f" and target.kind == "f":
            return np.ascontiguousarray(array, dtype=target).data
        raise InvalidArgument(f"tensor {meta.name!r}: a {array.dtype} array cannot go raw as "
                              f"{tensor_pb2.DType.Name(meta.dtype)}")

    def payload_size(self, meta):
        return meta_numel(meta) * numpy_dtype(meta.dtype).itemsize

    def shuffle_width(self, meta):
        return numpy_dtype(meta.dtype).itemsize

    def decode(self, meta, payload):
        return np.frombuffer(payload, dtype=numpy_dtype(meta.dtype)).reshape(tuple(meta.shape))

    def decode_into(self, meta, payload, out):
        if meta.dtype == tensor_pb2.DTYPE_BFLOAT16:
            from_bf16_bits(np.frombuffer(payload, dtype="<u2"), out)
            return
        super().decode_into(meta, payload, out)
