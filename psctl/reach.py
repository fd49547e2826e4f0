"""What answers at an address: the one-line explanation when a verb reached the wrong thing.

Every verb takes `--scheduler`; pointed at a server or a metrics port, gRPC alone says only
"Method not found!" or "failed to connect". On such a failure psctl asks the address what it
is (a ParameterServer ShardStatus call, then an HTTP GET of /metrics) and names it: a shardps
server, a shardps metrics endpoint, or something that answers but is not shardps (another gRPC
or HTTP server). Nothing listening there is left to the caller's own message, which names the
address and the role it wanted.
"""
from __future__ import annotations

import http.client
import urllib.error
import urllib.request

import grpc

from shardps.pscommon import grpcutil
from shardps.pscommon.errors import PSError, Unimplemented
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.wire.v1 import ps_pb2, ps_pb2_grpc

PROBE_TIMEOUT_S = 2.0
_METRIC_ROLES = (("shardps_scheduler_", "scheduler"), ("shardps_server_", "parameter server"),
                 ("shardps_worker_", "worker"))


def what_is(address: str, security: Security = NO_SECURITY, lacks_wanted: bool = False) -> str | None:
    """A phrase naming what serves `address` ("a shardps parameter server (shard 1)"), or None
    when it cannot tell. `lacks_wanted`: the caller's own call was answered UNIMPLEMENTED (a gRPC
    server without the service it wanted), so a gRPC server without the ParameterServer either is
    not shardps; without it a slow or busy shardps daemon is never called something else."""
    shard = _server_shard(address, security)
    if isinstance(shard, int):
        return f"a shardps parameter server (shard {shard})"
    text = _http_metrics(address)
    role = _metrics_role(text) if text is not None else None
    if role is not None:
        return f"the Prometheus metrics endpoint of a shardps {role}"
    if text is not None:
        return "an HTTP server, not shardps"
    if shard is Unimplemented and lacks_wanted:
        return "a gRPC server, not shardps"
    return None


def wrong_role(address: str, flag: str, wanted: str, security: Security = NO_SECURITY,
               lacks_wanted: bool = False) -> str | None:
    """The one line to print when `flag ADDRESS` reached something other than `wanted`."""
    found = what_is(address, security, lacks_wanted)
    if found is None:
        return None
    return f"psctl: {address} is {found}; {flag} wants the {wanted}'s gRPC address"


def _server_shard(address: str, security: Security):
    """The shard of the ParameterServer at `address`; Unimplemented (the class) when a gRPC
    server answered without that service; None otherwise."""
    channel = grpcutil.channel(address, security)
    try:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        return grpcutil.call(stub.ShardStatus, ps_pb2.ShardStatusRequest(), PROBE_TIMEOUT_S).shard
    except Unimplemented:
        return Unimplemented
    except (PSError, grpc.RpcError):
        return None
    finally:
        channel.close()


def _http_metrics(address: str) -> str | None:
    """What `GET /metrics` at `address` returns ("" for an HTTP error status), or None when
    no HTTP server answers there."""
    # no proxies: the address is the operator's own, and a proxy would answer for it
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}/metrics", timeout=PROBE_TIMEOUT_S) as reply:
            return reply.read(1 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError:   # it speaks HTTP: a 404, a 401, ...
        return ""
    except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException):
        return None


def _metrics_role(text: str) -> str | None:
    for prefix, role in _METRIC_ROLES:
        if prefix in text:
            return role
    return None
