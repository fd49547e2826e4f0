"""The device-side cast (worker/device_codec.py) against the host codecs with error feedback:
the same torch code runs on CUDA and here on CPU tensors, and must put the same bits on the
wire and carry the same residual, step after step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pscommon.config import CodecConfig
from pscommon.errors import InvalidArgument
from worker.compression import ErrorFeedback
from worker.device_codec import DeviceCast, supports, wire_bits


def gradients(n: int, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for step in range(steps):
        g = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)).astype(np.float32)
        if step == 1:
            g[:3] = [7e4, -1e5, 65519.0]   # past fp16's range: sent as inf, no residual kept
        yield g


@pytest.mark.parametrize("codec", ["bf16", "fp16"])
@pytest.mark.parametrize("feedback", [True, False], ids=["ef", "no-ef"])
def test_device_cast_sends_the_host_codecs_bits(codec, feedback):
    cfg = CodecConfig.parse(codec, error_feedback=feedback)
    host, dev = ErrorFeedback(), DeviceCast(cfg)
    for g in gradients(1001, steps=5):   # odd length, not a multiple of anything
        meta, payload = host.compress("w", g, cfg)
        words = wire_bits(dev.encode("w", torch.from_numpy(g.copy())))
        assert meta.codec == dev.wire
        assert words.tobytes() == bytes(payload)
        h, d = host.residual("w"), dev.residual("w")
        if feedback:
            np.testing.assert_array_equal(d.numpy(), h)
            assert np.isfinite(h).all()
        else:
            assert h is None and d is None


def test_error_feedback_on_the_device_loses_nothing():
    dev = DeviceCast(CodecConfig.parse("bf16"))
    total_sent = torch.zeros(257, dtype=torch.float64)
    total_true = torch.zeros(257, dtype=torch.float64)
    for g in gradients(257, steps=20, seed=3):
        g = np.clip(g, -1e3, 1e3)
        total_true += torch.from_numpy(g).double()
        total_sent += dev.encode("w", torch.from_numpy(g)).double()
    np.testing.assert_allclose((total_sent + dev.residual("w").double()).numpy(), total_true.numpy(),
                               rtol=1e-5, atol=1e-4)


def test_device_cast_takes_any_shape_and_dtype():
    dev = DeviceCast(CodecConfig.parse("bf16", error_feedback=False))
    g = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()   # non-contiguous, float64
    out = dev.encode("w", g)
    assert out.dtype == torch.bfloat16 and out.shape == (12,)
    np.testing.assert_array_equal(out.float().numpy(), g.reshape(-1).float().numpy())


@pytest.mark.parametrize("codec", ["fp32", "int8", "topk:0.01"])
def test_codecs_without_a_device_form_are_refused(codec):
    cfg = CodecConfig.parse(codec)
    assert not supports(cfg)
    with pytest.raises(InvalidArgument, match="no device-side form"):
        DeviceCast(cfg)


def test_residual_of_another_size_is_refused():
    dev = DeviceCast(CodecConfig.parse("fp16"))
    dev.encode("w", torch.ones(8))
    with pytest.raises(InvalidArgument, match="'w'.*residual has 8"):
        dev.encode("w", torch.ones(9))
