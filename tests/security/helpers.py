"""Helpers for the attack tests: raw scheduler stubs, the job's observable state before and
after an attack, and a worker that shows training still goes on.

Attacks are sent as hand-built requests through the generated stubs, never through the
client library, which would refuse to build most of them.
"""
from __future__ import annotations


import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from shardps.pscommon import grpcutil
from shardps.pscommon.errors import DOMAIN
from shardps.pscommon.wire.v1 import scheduler_pb2 as spb
from shardps.pscommon.wire.v1 import scheduler_pb2_grpc
from shardps.worker.client import ClientConfig, ShardClient

# one poll for every tier (tests/ is on sys.path, as for every test package here)
from rpc.helpers import poll  # noqa: F401  (re-exported to the attack tests)

TIMEOUT_S = 30.0  # generous: the machine is small and shared


class Attacker:
    """A raw Scheduler stub on its own channel: what anyone who can reach the port can send."""

    def __init__(self, address: str):
        self.channel = grpcutil.channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    def refused(self, method: str, request) -> grpc.RpcError:
        """The error `method(request)` fails with; fails the test if the call is accepted."""
        try:
            reply = getattr(self.stub, method)(request, timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            return err
        pytest.fail(f"{method} was accepted: {reply}")

    def close(self):
        self.channel.close()


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The shardps ErrorInfo a refusal carries, if any."""
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None


def membership(stub) -> dict:
    """Everything the scheduler reports about who is in the job (not lease ages or uptime,
    which move on their own)."""
    st = stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S)
    info = stub.GetJob(spb.GetJobRequest(), timeout=TIMEOUT_S)
    return {
        "view": st.view,
        "servers": [(s.shard, s.address, s.member_id, s.incarnation, s.state) for s in st.servers],
        "workers": [(w.worker_id, w.incarnation, w.state, w.clock, w.name) for w in st.workers],
        "model": st.model_fingerprint,
        "keys": st.keys,
        "shard_map": info.shard_map.SerializeToString(deterministic=True),
    }


def worker(address: str, name: str = "honest") -> ShardClient:
    client = ShardClient(ClientConfig(scheduler=address, name=name))
    client.join()
    client.wait_for_servers()
    return client


def pulled(client: ShardClient, shapes: dict[str, int]) -> dict[str, np.ndarray]:
    out = {n: np.empty(size, np.float32) for n, size in shapes.items()}
    client.pull(out)
    return out


def trains(client: ShardClient, shapes: dict[str, int], stub=None) -> None:
    """One more step goes through: a push changes the served values, a pull sees it. With the
    scheduler's `stub`, also waits until a heartbeat has reported the new clock, so that a
    snapshot taken next does not race the worker's own heartbeats."""
    before = pulled(client, shapes)
    client.push({n: np.ones(size, np.float32) for n, size in shapes.items()})
    after = pulled(client, shapes)
    for n in shapes:
        assert not np.array_equal(before[n], after[n]), f"the push did not move {n}"
    if stub is not None:
        def reported():
            ws = stub.Status(spb.StatusRequest(), timeout=TIMEOUT_S).workers
            return any(w.worker_id == client.worker_id and w.clock == client.clock for w in ws)
        poll(reported, what=f"worker {client.worker_id}'s clock {client.clock} to reach the scheduler")


def write_token_dir(path, tokens: dict[str, str], digest_only: dict[str, str] | None = None) -> str:
    """A `--token-dir` folder at `path`, as pscommon/security.py reads it: ROLE.token for each
    role -> token of `tokens` (what a process of that role sends, and its daemon accepts), and
    ROLE.sha256 alone for each of `digest_only` (accepted, never sent). Returns the folder."""
    import hashlib
    import pathlib

    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for role, token in tokens.items():
        (folder / f"{role}.token").write_text(token + "\n")
    for role, token in (digest_only or {}).items():
        (folder / f"{role}.sha256").write_text(hashlib.sha256(token.encode("ascii")).hexdigest() + "\n")
    return str(folder)
