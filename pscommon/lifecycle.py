"""Process lifecycle helpers shared by the daemons: stop signals, ready files, logging."""
from __future__ import annotations

import dataclasses
import logging
import signal
import threading

from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.files import write_atomic
from shardps.pscommon.security import NO_SECURITY, Security


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop`; the daemon then drains and exits 0."""
    def handler(signum, frame):
        logging.getLogger("shardps").info("signal %d: draining", signum)
        stop.set()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def write_ready_file(path: str | None, address: str) -> None:
    """Write the bound address atomically, so a launcher polling for the file never reads half."""
    if not path:
        return
    # not durable: it tells a launcher polling now where we listen, and means nothing after a reboot
    write_atomic(path, (address + "\n").encode(), durable=False)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 4 << 30, arena_max: int = 2) -> bool:
    """Stop glibc from mmap/munmap-ing every multi-MB buffer gRPC allocates.

    Same effect as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the environment, but set
    by the process itself so every way of starting a daemon gets it (docs/benchmarks.md has
    the measurement). Without mmap, freed buffers stay in per-thread arenas; capping the
    arenas keeps gRPC's many threads from each holding their own copy (peak RSS). Returns
    False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(mmap_threshold, 2**31 - 1)))
    ok_trim = mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold, 2**31 - 1)))
    ok_arena = mallopt(_M_ARENA_MAX, ctypes.c_int(arena_max))
    return bool(ok_mmap and ok_trim and ok_arena)


LOOPBACK = "127.0.0.1"
_WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}


def default_metrics_host(listen: str | None) -> str:
    """Where /metrics binds unless told: the daemon's own listen host, so the endpoint is
    reachable exactly where its gRPC port is; loopback when that is a wildcard or there is
    none (workers). /metrics has no token or TLS, so a wildcard gRPC listen (protected by
    them) must not open it to every interface by itself: ask with --metrics-host 0.0.0.0."""
    if not listen:
        return LOOPBACK
    host = listen.rpartition(":")[0]
    if host in _WILDCARDS:
        return LOOPBACK
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


@dataclasses.dataclass(frozen=True)
class DaemonOptions:
    """What every daemon shares: security, the metrics endpoint, reflection."""

    security: Security = NO_SECURITY
    metrics_port: int | None = None     # None: no /metrics endpoint; 0: any free port
    metrics_host: str = LOOPBACK        # psctl: default_metrics_host(--listen)
    reflection: bool = False
    metrics_auth: bool = False          # /metrics wants the observer (or admin) bearer token

    def __post_init__(self):
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"metrics port {self.metrics_port} must be in [0, 65535]")
        if self.metrics_auth and self.security.accepted is None:
            raise InvalidArgument("--metrics-auth needs tokens to check: give --token-dir or --token-file")


class Telemetry:
    """A daemon's Prometheus registry, RPC interceptor and /metrics endpoint."""

    def __init__(self, opts: DaemonOptions, role: str, serves_rpc: bool = True):
        from prometheus_client import CollectorRegistry

        from shardps.pscommon.metrics import RpcMetrics
        self.opts = opts
        self.registry = CollectorRegistry()
        on = opts.metrics_port is not None and serves_rpc
        self.interceptors = (RpcMetrics(self.registry, role),) if on else ()
        self.port: int | None = None
        self._server = None

    def start(self, *collectors) -> None:
        if self.opts.metrics_port is None:
            return
        from shardps.pscommon.metrics import serve
        for c in collectors:
            self.registry.register(c)
        accept = self.opts.security.accepted if self.opts.metrics_auth else None
        self._server, _ = serve(self.opts.metrics_port, self.registry, self.opts.metrics_host, accept)
        self.port = self._server.server_port
        logging.getLogger("shardps").info("metrics on http://%s:%d/metrics", self.opts.metrics_host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # release the port: a restart in-process can bind it again
