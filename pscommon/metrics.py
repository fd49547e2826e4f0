"""Prometheus plumbing shared by the daemons: an HTTP endpoint, an RPC latency interceptor,
and conversion of shardps's own histograms into Prometheus families at scrape time.

Role-specific collectors (psserver.metrics, scheduler.metrics, worker.metrics) read the
state each role already keeps, so scraping costs the hot path nothing.
"""
from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app, start_http_server
from prometheus_client.core import HistogramMetricFamily

from shardps.pscommon import interceptors
from shardps.pscommon.security import RoleTokens
from shardps.pscommon.stats import Histogram as PSHistogram

RPC_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def serve(port: int, registry: CollectorRegistry, addr: str = "127.0.0.1", accept: RoleTokens | None = None):
    """Start the /metrics endpoint; returns the (server, thread) pair. Loopback unless asked.
    With `accept`, a scrape must carry a bearer token holding the observer or admin role
    (Prometheus: `authorization: {credentials_file: observer.token}`); otherwise anyone who
    reaches the port reads it."""
    if accept is None:
        return start_http_server(port, addr=addr, registry=registry)
    app = _with_token(make_wsgi_app(registry), accept)
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]   # an IPv6 host binds AF_INET6
    server_class = type("MetricsServer", (_ThreadingWSGIServer,), {"address_family": family})
    server = make_server(addr, port, app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread


_SCRAPERS = frozenset({"observer", "admin"})


def _with_token(app, accept: RoleTokens):
    """`app` behind the bearer token: 401 without a known token, 403 for a role that may not
    read metrics; the metrics are never computed for a refused request."""
    def guarded(environ, start_response):
        sent = environ.get("HTTP_AUTHORIZATION", "")
        roles = accept.match(sent[len("Bearer "):].encode("utf-8", "replace")) if sent.startswith("Bearer ") \
            else frozenset()
        if roles & _SCRAPERS:
            return app(environ, start_response)
        status = "403 Forbidden" if roles else "401 Unauthorized"
        body = (b"the observer or admin token is needed to read metrics\n" if roles
                else b"missing or invalid bearer token\n")
        start_response(status, [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [body]
    return guarded


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def histogram_family(name: str, doc: str, hist: PSHistogram, labels: dict[str, str]) -> HistogramMetricFamily:
    """A Prometheus histogram (cumulative buckets) from a pscommon.stats.Histogram."""
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    cumulative, buckets = 0, []
    for bound, count in zip(hist.bounds, hist.counts):
        cumulative += count
        buckets.append((repr(float(bound)), cumulative))
    buckets.append(("+Inf", hist.total))
    fam.add_metric(list(labels.values()), buckets, hist.sum)
    return fam


class RpcMetrics(grpc.ServerInterceptor):
    """Observes the handling time of every RPC, by method and status (streams: until the
    handler returns or its response stream ends)."""

    def __init__(self, registry: CollectorRegistry, role: str):
        self.role = role
        self.hist = Histogram("shardps_rpc_duration_seconds", "Time to handle one RPC, by method and code.",
                              ["role", "method", "code"], buckets=RPC_BUCKETS_S, registry=registry)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        return interceptors.around(handler, lambda context: self._timed(method, context))

    @contextlib.contextmanager
    def _timed(self, method: str, context):
        t0, code = time.perf_counter(), "OK"
        try:
            yield
        except Exception:
            code = _code_of(context)
            raise
        finally:
            self.hist.labels(self.role, method, code).observe(time.perf_counter() - t0)


def _code_of(context) -> str:
    code = context.code() if hasattr(context, "code") else None
    return code.name if code is not None else "UNKNOWN"
