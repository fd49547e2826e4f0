"""Push compression on the device: casts and top-k run where the gradient is.

On a GPU a gradient's bytes cross PCIe before any host codec sees them. Encoding on the
device first moves only what goes on the wire: half the bytes for fp16/bf16, about 6 bytes
per kept element for top-k. The error-feedback residual stays on the device with the
gradient (fp32, per parameter). The payloads are exactly the host codecs' (pscommon.codecs
with worker.compression.ErrorFeedback): same layout, same bits, same residual;
tests/unit/test_device_codec.py runs this module's torch code on CPU tensors against them.

int8 stays on the host: its stochastic rounding draws from the host's generator.
"""
from __future__ import annotations

import dataclasses

import torch

from shardps.pscommon.codecs.topk import k_for
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import tensor_pb2

CASTS = {tensor_pb2.CODEC_FP16: torch.float16, tensor_pb2.CODEC_BF16: torch.bfloat16}
DEVICE_CODECS = frozenset(CASTS) | {tensor_pb2.CODEC_TOPK}


def supports(cfg: CodecConfig) -> bool:
    return cfg.codec in DEVICE_CODECS


@dataclasses.dataclass(frozen=True)
class Part:
    """One key's encoded slice: its payload is bytes [start, start + size) of the parameter's."""

    key: str
    codec: int
    numel: int
    k: int      # top-k only
    start: int
    size: int

    def meta(self) -> tensor_pb2.TensorMeta:
        meta = tensor_pb2.TensorMeta(name=self.key, dtype=tensor_pb2.DTYPE_FLOAT32, shape=[self.numel],
                                     codec=self.codec)
        if self.codec == tensor_pb2.CODEC_TOPK:
            meta.topk.k = self.k
        return meta


def max_payload_bytes(numel: int) -> int:
    """Room for any parameter's payload: a cast is 2 bytes an element, and top-k is sent only
    where its 6 bytes per kept element come to less than that."""
    return 2 * numel


def refuse_nan(name: str, has_nan: bool) -> None:
    """What the host's top-k codec says of NaN, raised once the device's flag is on the host."""
    if has_nan:
        raise InvalidArgument(f"tensor {name!r}: top-k cannot encode NaN values")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


class DeviceEncoder:
    """One worker's device-side push codec, one error-feedback residual per parameter.

    `keys` maps each parameter to its keys as (key name, offset, length): the host codecs
    encode key by key (top-k picks k per key), and so does this.
    """

    def __init__(self, cfg: CodecConfig, keys: dict[str, list[tuple[str, int, int]]]):
        if not supports(cfg):
            raise InvalidArgument(f"codec {cfg} has no device-side form (fp16, bf16 and topk have)")
        self.cfg = cfg
        self.keys = keys
        self._residual: dict[str, torch.Tensor] = {}

    def encode(self, name: str, grad: torch.Tensor) -> tuple[torch.Tensor, list[Part], torch.Tensor]:
        """(payload bytes on grad's device, the keys' parts, a device flag: NaN where top-k
        cannot encode). The flag is a tensor, not a bool, so a GPU never waits for it here."""
        corrected = self._corrected(name, grad)
        sent = torch.zeros_like(corrected) if self.cfg.error_feedback else None
        chunks, parts, start = [], [], 0
        nan = torch.zeros((), dtype=torch.bool, device=corrected.device)
        for key, offset, length in self.keys[name]:
            seg = corrected[offset:offset + length]
            codec, k, payload = self._encode_key(seg, sent, offset, length)
            if codec == tensor_pb2.CODEC_TOPK:
                nan = nan | torch.isnan(seg).any()
            chunks.append(payload)
            parts.append(Part(key, codec, length, k, start, payload.numel()))
            start += payload.numel()
        if sent is not None:
            corrected -= sent
            # as on the host: an element sent as inf (fp16 overflow) leaves no finite
            # remainder, and a NaN residual would poison every later push of the tensor
            self._residual[name] = torch.nan_to_num_(corrected, nan=0.0, posinf=0.0, neginf=0.0)
        return torch.cat(chunks) if chunks else corrected.new_empty(0, dtype=torch.uint8), parts, nan

    def _corrected(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        flat = grad.detach().reshape(-1).to(torch.float32)
        residual = self._residual.get(name) if self.cfg.error_feedback else None
        if residual is None:
            return flat.clone()
        if residual.numel() != flat.numel():
            raise InvalidArgument(f"tensor {name!r}: gradient of {flat.numel()} elements but its "
                                  f"residual has {residual.numel()}; call reset() after re-sharding")
        return flat + residual

    def _encode_key(self, seg, sent, offset, length):
        codec = self.cfg.codec
        if codec == tensor_pb2.CODEC_TOPK:
            k = k_for(length, self.cfg.topk_density)
            if 6 * k < 2 * length:
                idx = torch.topk(seg.abs(), k, sorted=False).indices.sort().values
                values = seg[idx].to(torch.bfloat16)
                if sent is not None:
                    sent[offset + idx] = values.to(torch.float32)
                return codec, k, torch.cat([_bytes(values), _bytes(idx.to(torch.int32))])
            codec = tensor_pb2.CODEC_BF16  # the sparse form would be no smaller: dense bf16
        values = seg.to(CASTS[codec])
        if sent is not None:
            sent[offset:offset + length] = values.to(torch.float32)
        return codec, 0, _bytes(values)

    def residual(self, name: str) -> torch.Tensor | None:
        r = self._residual.get(name)
        return None if r is None else r.clone()

    def reset(self) -> None:
        self._residual.clear()
