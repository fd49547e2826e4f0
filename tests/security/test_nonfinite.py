"""One diverged worker cannot poison the model: a push with NaN or Inf is refused whole (the
default) or, with --nonfinite skip, applied without those gradients; counted either way."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from shardps.pscommon import tables
from shardps.pscommon.config import JobSpec, OptimizerConfig
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.tables import TableSpec
from shardps.pscommon.wire.v1 import ps_pb2, tensor_pb2
from shardps.psserver.servicer import Limits

from rpc.helpers import (TIMEOUT_S, declare_requests, push, push_header, shard_map, snapshot, status, tensor_chunks,
                         values)

SMAP = shard_map({"a": (4,), "b": (3,)})
FP = SMAP.fingerprint
EMB = TableSpec("emb", 2, "zeros", 0.0, 0)
JOB = JobSpec(optimizer=OptimizerConfig(kind="sgd", lr=1.0))


def serve(shard_server, nonfinite: str):
    srv = shard_server(job=JOB, limits=Limits(nonfinite=nonfinite))
    reqs = list(declare_requests(FP, SMAP.keys_of(0), {"a": np.zeros(4, np.float32), "b": np.zeros(3, np.float32)}))
    reqs[0].header.tables.append(EMB.to_proto())
    srv.stub.Declare(iter(reqs), timeout=TIMEOUT_S)
    return srv


def push_rows(srv, dense: dict, ids: np.ndarray, grads: np.ndarray, step: int = 0):
    msgs = [push_header(FP, step=step)]
    for name, g in dense.items():
        msgs += [ps_pb2.PushRequest(chunk=c) for c in tensor_chunks(name, g)]
    msgs += [ps_pb2.PushRequest(rows=b) for b in tables.row_blocks("emb", ids, grads, tensor_pb2.DTYPE_FLOAT32)]
    return srv.stub.Push(iter(msgs), timeout=TIMEOUT_S)


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_a_push_with_nan_or_inf_is_refused_and_changes_nothing(shard_server, poison):
    srv = serve(shard_server, "refuse")
    before = snapshot(srv.stub, FP)
    bad = np.ones(4, np.float32)
    bad[2] = poison
    with pytest.raises(grpc.RpcError) as err:
        push(srv.stub, FP, {"a": bad, "b": np.ones(3, np.float32)})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or Inf in the gradients of ['a']" in err.value.details()
    assert snapshot(srv.stub, FP) == before and not srv.shard.ledger
    assert status(srv.stub).nonfinite_pushes == 1
    # the same push, finite, is then taken as new: the refused one was not recorded
    assert not push(srv.stub, FP, {"a": np.ones(4, np.float32), "b": np.ones(3, np.float32)}).duplicate


def test_nan_in_row_gradients_is_refused_too(shard_server):
    srv = serve(shard_server, "refuse")
    grads = np.array([[1.0, np.nan]], np.float32)
    with pytest.raises(grpc.RpcError) as err:
        push_rows(srv, {}, np.array([7], np.int64), grads)
    assert "table emb" in err.value.details() and srv.shard.version == 0
    assert srv.shard.tables.stores["emb"].stats().rows == 0


def test_skip_applies_the_finite_gradients_and_counts_the_push(shard_server):
    srv = serve(shard_server, "skip")
    bad = np.full(3, np.nan, np.float32)
    rows_bad = np.array([[np.inf, 0.0]], np.float32)
    reply = push_rows(srv, {"a": np.ones(4, np.float32), "b": bad}, np.array([7], np.int64), rows_bad)
    assert not reply.duplicate and reply.shard_version == 1
    got = values(srv.stub, FP)
    assert got["a"].tolist() == [-1.0] * 4 and got["b"].tolist() == [0.0] * 3   # sgd lr 1: a moved, b untouched
    assert srv.shard.tables.stores["emb"].stats().rows == 0    # the poisoned row was not created
    assert status(srv.stub).nonfinite_pushes == 1
    assert push_rows(srv, {"a": np.ones(4, np.float32), "b": bad}, np.array([7], np.int64), rows_bad).duplicate


def test_the_policy_is_validated():
    with pytest.raises(InvalidArgument, match="nonfinite='ignore' must be one of refuse, skip"):
        Limits(nonfinite="ignore")
