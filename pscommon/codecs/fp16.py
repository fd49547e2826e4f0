"""fp16: IEEE half precision; values beyond +-65504 saturate to infinity."""
from __future__ import annotations

import numpy as np

from shardps.pscommon.codecs.base import Codec, float32_input, meta_numel
from shardps.pscommon.wire.v1 import tensor_pb2


class Fp16Codec(Codec):
    wire = tensor_pb2.CODEC_FP16

    def encode(self, array, cfg, meta, rng=None):
        with np.errstate(over="ignore"):
            return float32_input(array, meta.name).astype("<f2").data

    def payload_size(self, meta):
        return meta_numel(meta) * 2

    def shuffle_width(self, meta):
        return 2

    def decode(self, meta, payload):
        return np.frombuffer(payload, dtype="<f2").astype(np.float32).reshape(tuple(meta.shape))

    def decode_into(self, meta, payload, out):
        out[:] = np.frombuffer(payload, dtype="<f2")
