"""What answers at an address: the one-line explanation when a verb reached the wrong thing.

Every verb takes `--scheduler`; pointed at a server or a metrics port, gRPC alone says only
"Method not found!" or "failed to connect". On such a failure psctl asks the address what it
is (a ParameterServer ShardStatus call, then an HTTP GET of /metrics) and names it.
"""
from __future__ import annotations

import urllib.error
import urllib.request

import grpc

from shardps.pscommon import grpcutil
from shardps.pscommon.errors import PSError
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc

PROBE_TIMEOUT_S = 2.0
_METRIC_ROLES = (("shardps_scheduler_", "scheduler"), ("shardps_server_", "parameter server"),
                 ("shardps_worker_", "worker"))


def what_is(address: str, security: Security = NO_SECURITY) -> str | None:
    """A phrase naming what serves `address` ("a shardps parameter server (shard 1)"), or None
    when nothing shardps answers there."""
    shard = _server_shard(address, security)
    if shard is not None:
        return f"a shardps parameter server (shard {shard})"
    role = _metrics_role(address)
    if role is not None:
        return f"the Prometheus metrics endpoint of a shardps {role}"
    return None


def wrong_role(address: str, flag: str, wanted: str, security: Security = NO_SECURITY) -> str | None:
    """The one line to print when `flag ADDRESS` reached something other than `wanted`."""
    found = what_is(address, security)
    if found is None:
        return None
    return f"psctl: {address} is {found}; {flag} wants the {wanted}'s gRPC address"


def _server_shard(address: str, security: Security) -> int | None:
    channel = grpcutil.channel(address, security)
    try:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        return grpcutil.call(stub.ShardStatus, ps_pb2.ShardStatusRequest(), PROBE_TIMEOUT_S).shard
    except (PSError, grpc.RpcError):
        return None
    finally:
        channel.close()


def _metrics_role(address: str) -> str | None:
    # no proxies: the address is the operator's own, and a proxy would answer for it
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}/metrics", timeout=PROBE_TIMEOUT_S) as reply:
            text = reply.read(1 << 20).decode("utf-8", "replace")
    except (OSError, ValueError, urllib.error.URLError):
        return None
    for prefix, role in _METRIC_ROLES:
        if prefix in text:
            return role
    return None
