"""Malformed input gets a precise status naming the tensor, and changes nothing on the shard.

Never UNKNOWN or INTERNAL: every case asserts its exact code.
"""
import grpc
import numpy as np
import pytest

from shardps.pscommon import codecs, sharding
from shardps.pscommon.codecs.bf16 import from_bf16_bits, to_bf16_bits
from shardps.pscommon.config import CodecConfig, JobSpec
from shardps.pscommon.tensors import chunk_payload
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2
from shardps.psserver.servicer import Limits

from .helpers import (F32, TIMEOUT_S, declare, declare_requests, initial_values, pull, push, push_header,
                      shard_map, snapshot, tensor_chunks)

SHAPES = {"w": (4, 3), "b": (5,)}
INV, NF, RE, FP = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                   grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)
W = np.arange(12, dtype=np.float32) / 10


def meta(name="w", shape=(12,), dtype=F32, codec=tensor_pb2.CODEC_RAW, size=48):
    return tensor_pb2.TensorMeta(name=name, dtype=dtype, shape=shape, codec=codec, payload_size=size)


def chunk(m=None, offset=0, data=b""):
    c = tensor_pb2.TensorChunk(offset=offset, data=data)
    if m is not None:
        c.meta.CopyFrom(m)
    return ps_pb2.PushRequest(chunk=c)


def good(name="w", value=W, chunk_bytes=None):
    return [ps_pb2.PushRequest(chunk=c) for c in tensor_chunks(name, value, chunk_bytes)]


W16 = good(chunk_bytes=16)  # "w" as three chunks at offsets 0, 16, 32
assert [m.chunk.offset for m in W16] == [0, 16, 32]

# name -> (chunk messages after a valid header, code, text the message must contain)
PUSH_CASES = {
    "payload shorter than shape*dtype": ([chunk(meta(size=44), 0, W.tobytes()[:44])], INV, "'w'"),
    "payload longer than shape*dtype": ([chunk(meta(size=52), 0, W.tobytes() + b"\0" * 4)], INV, "'w'"),
    "negative dims": ([chunk(meta(shape=(-2, -6)), 0, W.tobytes())], INV, "'w'"),
    "too many dims": ([chunk(meta(shape=(1,) * 8 + (12,)), 0, W.tobytes())], INV, "'w'"),
    "shape claims huge element count": ([chunk(meta(shape=(1 << 40,)), 0, W.tobytes())], INV, "'w'"),
    "chunks out of order": ([W16[0], W16[2], W16[1]], INV, "'w'"),
    "first chunk at nonzero offset": ([chunk(meta(), 16, W.tobytes()[16:])], INV, "'w'"),
    "chunks beyond payload_size": ([W16[0], W16[1], chunk(None, 32, W.tobytes()[32:] + b"\0" * 4)],
                                   INV, "'w'"),
    "stream ends mid-tensor": (W16[:2], INV, "'w'"),
    "tensor started before the previous completed": (W16[:1] + good("b", np.ones(5, np.float32)),
                                                     INV, "'w'"),
    "chunk without meta first": ([chunk(None, 0, W.tobytes())], INV, "meta"),
    "tensor without a name": ([chunk(meta(name=""), 0, W.tobytes())], INV, "name"),
    "duplicated tensor": (good() + good(), INV, "'w'"),
    "gradient with wrong element count": (good("w", W[:11]), INV, "'w'"),
    "gradient for an unknown key": (good("zz", W), NF, "'zz'"),
    "second header": (good() + [push_header("x", worker=3)], INV, "header"),
}


@pytest.fixture
def srv(shard_server):
    s = shard_server()
    s.smap = shard_map(SHAPES)
    declare(s.stub, s.smap, initial_values(s.smap))
    push(s.stub, s.smap.fingerprint, {"w": np.ones(12, np.float32)}, worker=1, step=0)
    return s


def check_refused(srv, messages, code, text, method="Push"):
    fp = srv.smap.fingerprint
    before = snapshot(srv.stub, fp)
    with pytest.raises(grpc.RpcError) as err:
        getattr(srv.stub, method)(iter(messages), timeout=TIMEOUT_S)
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details(), err.value.details()
    assert snapshot(srv.stub, fp) == before
    return err.value


def check_identity_unused(srv, worker=3, step=0):
    """The refused push left no trace in the exactly-once ledger: the same (worker, step)
    is applied when sent correctly."""
    reply = push(srv.stub, srv.smap.fingerprint, {"b": np.ones(5, np.float32)}, worker=worker, step=step)
    assert not reply.duplicate


@pytest.mark.parametrize("case", sorted(PUSH_CASES))
def test_malformed_push(srv, case):
    messages, code, text = PUSH_CASES[case]
    check_refused(srv, [push_header(srv.smap.fingerprint, worker=3)] + messages, code, text)
    check_identity_unused(srv)


def test_valid_tensors_before_a_bad_one_are_not_applied(srv):
    messages = good("b", np.ones(5, np.float32)) + [chunk(meta(size=44), 0, W.tobytes()[:44])]
    check_refused(srv, [push_header(srv.smap.fingerprint, worker=3)] + messages, INV, "'w'")
    check_identity_unused(srv)


def test_unknown_dtype_names_the_tensor(srv):
    check_refused(srv, [push_header(srv.smap.fingerprint, worker=3), chunk(meta(dtype=99), 0, W.tobytes())],
                  INV, "'w'")


def test_unknown_dtype_is_invalid_argument(srv):
    check_refused(srv, [push_header(srv.smap.fingerprint, worker=3), chunk(meta(dtype=99), 0, W.tobytes())],
                  INV, "dtype")
    check_identity_unused(srv)


@pytest.mark.parametrize("codec", [42, tensor_pb2.CODEC_UNSPECIFIED])
def test_unknown_codec_is_invalid_argument(srv, codec):
    err = check_refused(srv, [push_header(srv.smap.fingerprint, worker=3),
                              chunk(meta(codec=codec), 0, W.tobytes())], INV, "'w'")
    assert "codec" in err.details()
    check_identity_unused(srv)


def _topk(k, values, indices):
    m = meta(codec=tensor_pb2.CODEC_TOPK, size=6 * len(values))
    m.topk.k = k
    data = to_bf16_bits(np.asarray(values, np.float32)).tobytes() + np.asarray(indices, "<u4").tobytes()
    return [chunk(m, 0, data)]


def _int8(block_size):
    m = meta(codec=tensor_pb2.CODEC_INT8, size=12 + 4)
    m.int8.block_size = block_size
    return [chunk(m, 0, b"\0" * 16)]


def _lossless(algorithm, raw_size, data):
    m = meta(size=len(data))
    m.lossless.algorithm = algorithm
    m.lossless.raw_size = raw_size
    return [chunk(m, 0, data)]


CODEC_PARAM_CASES = {
    "int8 without a block size": _int8(0),
    "topk without parameters": [chunk(meta(codec=tensor_pb2.CODEC_TOPK, size=12), 0, b"\0" * 12)],
    "topk k above the element count": _topk(13, np.ones(13), np.arange(13)),
    "topk index out of range": _topk(2, [1.0, 1.0], [3, 40]),
    "topk indices not increasing": _topk(2, [1.0, 1.0], [5, 3]),
    "zstd flag over raw bytes": _lossless(tensor_pb2.LOSSLESS_ZSTD, 48, W.tobytes()),
    "lz4 flag over raw bytes": _lossless(tensor_pb2.LOSSLESS_LZ4, 48, W.tobytes()),
    "lossless raw size disagreeing with the codec": _lossless(tensor_pb2.LOSSLESS_ZSTD, 1 << 40, b"\0" * 8),
    "unknown lossless algorithm": _lossless(77, 48, W.tobytes()),
}


@pytest.mark.parametrize("case", sorted(CODEC_PARAM_CASES))
def test_bad_codec_parameters(srv, case):
    check_refused(srv, [push_header(srv.smap.fingerprint, worker=3)] + CODEC_PARAM_CASES[case], INV, "'w'")
    check_identity_unused(srv)


def test_lossy_push_is_decoded_before_applying(srv):
    """The positive control for the cases above: a bf16 push is decoded to float32 and applied."""
    fp = srv.smap.fingerprint
    before = pull(srv.stub, fp, observer=True)[1]["w"]
    g = np.linspace(-3, 3, 12).astype(np.float32)
    m, payload = codecs.encode("w", g, F32, CodecConfig("bf16"))
    assert m.codec == tensor_pb2.CODEC_BF16
    msgs = [push_header(fp, worker=3)] + [ps_pb2.PushRequest(chunk=c) for c in chunk_payload(m, payload)]
    assert not srv.stub.Push(iter(msgs), timeout=TIMEOUT_S).duplicate
    after = pull(srv.stub, fp, observer=True)[1]["w"]
    g16 = from_bf16_bits(to_bf16_bits(g))
    np.testing.assert_array_equal(after, before - np.float32(0.1) * g16)
    traffic = {t.key: t for t in srv.stub.ShardStatus(ps_pb2.ShardStatusRequest(), timeout=TIMEOUT_S).push_traffic}
    assert traffic["w"].logical_bytes == 48 + 48 and traffic["w"].wire_bytes == 48 + 24


def test_stream_without_header(srv):
    check_refused(srv, good(), INV, "header")
    check_refused(srv, [], INV, "header")
    check_identity_unused(srv)


def test_header_with_wrong_model_or_shard(srv):
    fp = srv.smap.fingerprint
    check_refused(srv, [push_header("0123456789abcdef-s1-b1", worker=3)] + good(), FP, "model")
    check_refused(srv, [push_header(fp, worker=3, shard=1)] + good(), FP, "shard")
    check_identity_unused(srv)


def test_raw_bfloat16_gradient_is_decoded_or_refused(srv):
    fp = srv.smap.fingerprint
    before = pull(srv.stub, fp, observer=True)[1]["b"]
    bits = to_bf16_bits(np.ones(5, np.float32))
    m = meta(name="b", shape=(5,), dtype=tensor_pb2.DTYPE_BFLOAT16, size=10)
    try:
        srv.stub.Push(iter([push_header(fp, worker=3), chunk(m, 0, bits.tobytes())]), timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        assert err.code() == INV  # refusing is fine too
        return
    after = pull(srv.stub, fp, observer=True)[1]["b"]
    np.testing.assert_allclose(after, before - np.float32(0.1), rtol=1e-6)


# -- caps -----------------------------------------------------------------------------------
def capped(shard_server, **limits):
    s = shard_server(limits=Limits(**limits))
    s.smap = shard_map(SHAPES)
    init = initial_values(s.smap)
    for k in s.smap.keys:  # one key per Declare, so each stream stays under a transfer cap
        declare(s.stub, s.smap, {k.key: init[k.key]}, keys=[k])
    return s


def test_payload_size_over_tensor_cap_is_resource_exhausted(shard_server):
    s = capped(shard_server, max_tensor_bytes=64)
    # the claim alone is refused, before any buffer is allocated for it
    big = meta(size=1 << 30)
    check_refused(s, [push_header(s.smap.fingerprint, worker=3), chunk(big, 0, W.tobytes())], RE, "'w'")
    check_identity_unused(s)


def test_tensor_cap_applies_to_declare_and_pull_is_unaffected(shard_server):
    s = capped(shard_server, max_tensor_bytes=64)
    smap = shard_map({"big": (17,)})  # 68 bytes > 64
    with pytest.raises(grpc.RpcError) as err:
        declare(s.stub, smap, initial_values(smap))
    assert err.value.code() == RE and "'big'" in err.value.details()
    assert sorted(s.shard.entries) == ["b", "w"]


def test_transfer_over_stream_cap_is_resource_exhausted(shard_server):
    s = capped(shard_server, max_transfer_bytes=60)  # w (48) fits, w + b (68) does not
    msgs = [push_header(s.smap.fingerprint, worker=3)] + good() + good("b", np.ones(5, np.float32))
    check_refused(s, msgs, RE, "'b'")
    check_identity_unused(s)


def test_element_cap_is_invalid_argument(shard_server):
    s = capped(shard_server, max_elements=12)
    msgs = [push_header(s.smap.fingerprint, worker=3), chunk(meta(shape=(13,), size=52), 0, b"\0" * 52)]
    err = check_refused(s, msgs, INV, "'w'")
    assert "13 elements" in err.details()
    check_identity_unused(s)


# -- pull, inspect ----------------------------------------------------------------------------
def test_malformed_pulls(srv):
    fp = srv.smap.fingerprint
    before = snapshot(srv.stub, fp)
    cases = [
        (dict(keys=["w", "zz"]), NF, "zz"),
        (dict(shard=1), FP, "shard"),
        (dict(codec=tensor_pb2.CODEC_INT8), INV, "codec"),
        (dict(codec=99), INV, "99"),
    ]
    for kw, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            pull(srv.stub, fp, worker=3, **kw)
        assert err.value.code() == code, kw
        assert text in err.value.details(), kw
    with pytest.raises(grpc.RpcError) as err:
        pull(srv.stub, "not-the-model", worker=3)
    assert err.value.code() == FP
    assert snapshot(srv.stub, fp) == before
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Inspect(ps_pb2.InspectRequest(keys=["nope"]), timeout=TIMEOUT_S)
    assert err.value.code() == NF and "nope" in err.value.details()


def test_pull_before_declare_is_failed_precondition(shard_server):
    s = shard_server()
    with pytest.raises(grpc.RpcError) as err:
        pull(s.stub, "anything", worker=0)
    assert err.value.code() == FP and "declare" in err.value.details()


# -- declare ----------------------------------------------------------------------------------
def _declare_msgs(fp, keys, chunks):
    return [ps_pb2.DeclareRequest(header=ps_pb2.DeclareHeader(
        model_fingerprint=fp, shard=0, keys=[k.to_proto() for k in keys], job=JobSpec().to_proto()))
    ] + [ps_pb2.DeclareRequest(chunk=m.chunk) for m in chunks]


def test_malformed_declares(srv):
    fp = srv.smap.fingerprint
    keys = list(srv.smap.keys)
    w_key = [k for k in keys if k.key == "w"]
    bvals = good("b", np.ones(5, np.float32))
    cases = {
        "payload length mismatch": (_declare_msgs(fp, w_key, [chunk(meta(size=44), 0, W.tobytes()[:44])]),
                                    INV, "'w'"),
        "missing value": (_declare_msgs(fp, keys, good()), INV, "'b'"),
        "value for an undeclared key": (_declare_msgs(fp, w_key, good() + bvals), INV, "'b'"),
        "wrong element count": (_declare_msgs(fp, w_key, good("w", W[:11])), INV, "'w'"),
        "key listed twice": (_declare_msgs(fp, w_key * 2, good()), INV, "twice"),
        "no fingerprint": (_declare_msgs("", w_key, good()), INV, "fingerprint"),
        "chunks out of order": (_declare_msgs(fp, w_key, [W16[0], W16[2], W16[1]]), INV, "'w'"),
        "no header": ([ps_pb2.DeclareRequest(chunk=m.chunk) for m in good()], INV, "header"),
    }
    for name, (msgs, code, text) in cases.items():
        err = check_refused(srv, msgs, code, text, method="Declare")
        assert err.code() == code, name


@pytest.mark.parametrize("bad", [
    sharding.Key("v", "v", 99, (3,), 0, 3, 0),
    sharding.Key("v", "v", F32, (-3,), 0, 3, 0),
    sharding.Key("v", "v", F32, (3,), 2, 3, 0),
])
def test_declare_refuses_inconsistent_key_spec(shard_server, bad):
    s = shard_server()
    with pytest.raises(grpc.RpcError) as err:
        s.stub.Declare(declare_requests("fp", [bad], {"v": np.ones(3, np.float32)}), timeout=TIMEOUT_S)
    assert err.value.code() == INV
    assert s.shard.entries == {}
