"""raw ("fp32" for float32 tensors): the tensor's own bytes, nothing lost."""
from __future__ import annotations

import numpy as np

from pscommon.codecs.base import Codec, meta_numel
from pscommon.tensors import numpy_dtype
from pscommon.wire.v1 import tensor_pb2


class RawCodec(Codec):
    wire = tensor_pb2.CODEC_RAW
    lossy = False

    def encode(self, array, cfg, meta):
        return np.ascontiguousarray(array).data

    def payload_size(self, meta):
        return meta_numel(meta) * numpy_dtype(meta.dtype).itemsize

    def decode(self, meta, payload):
        return np.frombuffer(payload, dtype=numpy_dtype(meta.dtype)).reshape(tuple(meta.shape))
