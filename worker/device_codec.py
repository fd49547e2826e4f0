"""Push compression on the device: the fp16/bf16 cast runs where the gradient is.

On a GPU a gradient's bytes cross PCIe before any host codec sees them. Casting to the push
codec's 16-bit form on the device first halves those bytes, and the error-feedback residual
stays on the device with the gradient (fp32, per parameter). The servers receive the same bits
the host path (pscommon.codecs + worker.compression.ErrorFeedback) would send:
tests/unit/test_device_codec.py runs this module's torch code on CPU tensors against it.

Only the casts run here. Top-k and int8 still go through the host codecs on fp32 gradients:
their selection and scales would need device kernels of their own to match the host bits.
"""
from __future__ import annotations

import numpy as np
import torch

from pscommon.config import CodecConfig
from pscommon.errors import InvalidArgument
from pscommon.wire.v1 import tensor_pb2

CASTS = {tensor_pb2.CODEC_FP16: torch.float16, tensor_pb2.CODEC_BF16: torch.bfloat16}


def supports(cfg: CodecConfig) -> bool:
    return cfg.codec in CASTS


def wire_bits(t: torch.Tensor) -> np.ndarray:
    """A 16-bit host tensor as the uint16 words the wire carries (numpy has no bfloat16)."""
    return t.view(torch.int16).numpy().view(np.uint16)


class DeviceCast:
    """One worker's device-side cast with error feedback, one residual per parameter."""

    def __init__(self, cfg: CodecConfig):
        if not supports(cfg):
            raise InvalidArgument(f"codec {cfg} has no device-side form (only fp16 and bf16)")
        self.wire = cfg.codec
        self.dtype = CASTS[cfg.codec]
        self.feedback = cfg.error_feedback
        self._residual: dict[str, torch.Tensor] = {}

    def encode(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The flat 16-bit gradient to send, on grad's device (and stream)."""
        flat = grad.detach().reshape(-1).to(torch.float32)
        if not self.feedback:
            return flat.to(self.dtype)
        residual = self._residual.get(name)
        if residual is not None and residual.numel() != flat.numel():
            raise InvalidArgument(f"tensor {name!r}: gradient of {flat.numel()} elements but its "
                                  f"residual has {residual.numel()}; call reset() after re-sharding")
        corrected = flat + residual if residual is not None else flat.clone()
        sent = corrected.to(self.dtype)
        corrected -= sent.to(torch.float32)
        # as on the host: an element sent as inf (fp16 overflow) leaves no finite remainder,
        # and a NaN residual would poison every later push of the tensor
        self._residual[name] = torch.nan_to_num_(corrected, nan=0.0, posinf=0.0, neginf=0.0)
        return sent

    def residual(self, name: str) -> torch.Tensor | None:
        r = self._residual.get(name)
        return None if r is None else r.clone()

    def reset(self) -> None:
        self._residual.clear()
