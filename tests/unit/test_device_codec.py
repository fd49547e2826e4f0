"""The device-side push codec (worker/device_codec.py) against the host codecs with error
feedback: the same torch code runs on CUDA and here on CPU tensors, and must put the same
bytes on the wire and carry the same residual, key by key and step after step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shardps.pscommon import codecs
from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.wire.v1 import tensor_pb2
from shardps.worker.compression import ErrorFeedback
from shardps.worker.device_codec import DeviceEncoder, max_payload_bytes, supports

N = 3001
# one parameter cut into keys of uneven sizes, as a shard map slices a large tensor
KEYS = {"w": [("w/0", 0, 1200), ("w/1", 1200, 1200), ("w/2", 2400, 601)]}


def gradients(steps: int, seed: int = 0, overflow: bool = True):
    rng = np.random.default_rng(seed)
    for step in range(steps):
        g = (rng.standard_normal(N) * 10.0 ** rng.integers(-6, 3, N)).astype(np.float32)
        if overflow and step == 1:
            g[:3] = [7e4, -1e5, 65519.0]   # past fp16's range: sent as inf, no residual kept
        yield g


def host_vs_device(codec: str, feedback: bool, steps: int = 5, overflow: bool = True):
    cfg = CodecConfig.parse(codec, error_feedback=feedback)
    host, dev = ErrorFeedback(), DeviceEncoder(cfg, KEYS)
    for g in gradients(steps, overflow=overflow):
        payload, parts, nan = dev.encode("w", torch.from_numpy(g.copy()))
        assert not bool(nan)
        data = payload.numpy().tobytes()
        assert len(data) <= max_payload_bytes(N)
        for part, (key, offset, length) in zip(parts, KEYS["w"]):
            meta, expected = host.compress(key, g[offset:offset + length], cfg)
            assert part.key == key and part.meta() == meta
            assert data[part.start:part.start + part.size] == bytes(expected), key
        residual = dev.residual("w")
        for key, offset, length in KEYS["w"]:
            h = host.residual(key)
            if feedback:
                np.testing.assert_array_equal(residual[offset:offset + length].numpy(), h, err_msg=key)
            else:
                assert h is None and residual is None
    return parts


@pytest.mark.parametrize("codec", ["bf16", "fp16"])
@pytest.mark.parametrize("feedback", [True, False], ids=["ef", "no-ef"])
def test_device_casts_send_the_host_codecs_bytes(codec, feedback):
    parts = host_vs_device(codec, feedback)
    assert {p.codec for p in parts} == {CodecConfig.parse(codec).codec}


@pytest.mark.parametrize("feedback", [True, False], ids=["ef", "no-ef"])
def test_device_topk_sends_the_host_codecs_bytes(feedback):
    # no ties among the magnitudes (random normals): the top k are one set on both sides
    parts = host_vs_device("topk:0.02", feedback, overflow=False)
    assert [p.codec for p in parts] == [tensor_pb2.CODEC_TOPK] * 3
    assert [p.k for p in parts] == [24, 24, 12]


def test_device_topk_goes_dense_bf16_where_sparse_is_no_smaller():
    parts = host_vs_device("topk:0.5", feedback=True, overflow=False)
    assert [p.codec for p in parts] == [tensor_pb2.CODEC_BF16] * 3


def test_device_payload_decodes_to_what_was_sent():
    cfg = CodecConfig.parse("topk:0.01")
    dev = DeviceEncoder(cfg, KEYS)
    g = next(gradients(1, seed=5))
    payload, parts, _ = dev.encode("w", torch.from_numpy(g))
    data = payload.numpy()
    sent = np.concatenate([codecs.decode(p.meta(), data[p.start:p.start + p.size], max_elements=N)
                           for p in parts])
    # what went plus what was kept back is the gradient
    np.testing.assert_allclose(sent + dev.residual("w").numpy(), g, rtol=0, atol=1e-6)
    for p, (_, offset, length) in zip(parts, KEYS["w"]):
        kept = np.flatnonzero(sent[offset:offset + length])
        top = np.argsort(-np.abs(g[offset:offset + length]))[:p.k]
        assert set(kept) == set(top)


def test_error_feedback_on_the_device_loses_nothing():
    dev = DeviceEncoder(CodecConfig.parse("topk:0.01"), KEYS)
    total_sent = np.zeros(N)
    total_true = np.zeros(N)
    for g in gradients(30, seed=3, overflow=False):
        g = np.clip(g, -1e3, 1e3)
        total_true += g
        payload, parts, _ = dev.encode("w", torch.from_numpy(g))
        data = payload.numpy()
        total_sent += np.concatenate([codecs.decode(p.meta(), data[p.start:p.start + p.size], max_elements=N)
                                      for p in parts])
    np.testing.assert_allclose(total_sent + dev.residual("w").numpy(), total_true, rtol=1e-5, atol=1e-3)


def test_nan_is_flagged_for_topk_and_sent_by_casts():
    g = torch.ones(N)
    g[5] = float("nan")
    _, _, nan = DeviceEncoder(CodecConfig.parse("topk:0.01"), KEYS).encode("w", g)
    assert bool(nan)
    _, _, nan = DeviceEncoder(CodecConfig.parse("bf16"), KEYS).encode("w", g)
    assert not bool(nan)


def test_device_encoder_takes_any_shape_and_dtype():
    dev = DeviceEncoder(CodecConfig.parse("bf16", error_feedback=False), {"w": [("w", 0, 12)]})
    g = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()   # non-contiguous, float64
    payload, (part,), _ = dev.encode("w", g)
    decoded = codecs.decode(part.meta(), payload.numpy(), max_elements=12)
    np.testing.assert_array_equal(decoded, g.reshape(-1).float().numpy())


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_codecs_without_a_device_form_are_refused(codec):
    cfg = CodecConfig.parse(codec)
    assert not supports(cfg)
    with pytest.raises(InvalidArgument, match="no device-side form"):
        DeviceEncoder(cfg, KEYS)


def test_residual_of_another_size_is_refused():
    dev = DeviceEncoder(CodecConfig.parse("fp16"), {"w": [("w", 0, 8)]})
    dev.encode("w", torch.ones(8))
    dev.keys = {"w": [("w", 0, 9)]}
    with pytest.raises(InvalidArgument, match="'w'.*residual has 8"):
        dev.encode("w", torch.ones(9))
