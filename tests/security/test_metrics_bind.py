"""The Prometheus endpoint has no authentication: it binds where the daemon's own gRPC port
listens, or loopback when that is a wildcard (or there is none, as for workers), instead of
every interface. `--metrics-host 0.0.0.0` still opens it to everyone, on purpose."""
from __future__ import annotations

import urllib.request

import pytest

from shardps.pscommon.config import JobSpec
from shardps.pscommon.lifecycle import DaemonOptions
from shardps.psctl import cli
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess


@pytest.mark.parametrize("argv, host", [
    (["scheduler", "--listen", "127.0.0.1:7000"], "127.0.0.1"),
    (["scheduler", "--listen", "127.0.0.23:7000"], "127.0.0.23"),
    (["scheduler", "--listen", "0.0.0.0:7000"], "127.0.0.1"),
    (["scheduler"], "127.0.0.1"),
    (["server", "--scheduler", "s:7000", "--listen", "[::]:7100"], "127.0.0.1"),
    (["server", "--scheduler", "s:7000", "--listen", "[::1]:7100"], "::1"),
    (["server", "--scheduler", "s:7000", "--listen", "node-3.example:7100"], "node-3.example"),
    (["worker", "--scheduler", "s:7000"], "127.0.0.1"),
    (["server", "--scheduler", "s:7000", "--listen", "0.0.0.0:7100", "--metrics-host", "0.0.0.0"], "0.0.0.0"),
    (["worker", "--scheduler", "s:7000", "--metrics-host", "127.0.0.99"], "127.0.0.99"),
])
def test_metrics_host_defaults_to_the_listen_host_or_loopback(argv, host):
    a = cli.build_parser().parse_args(argv + ["--metrics-port", "9100"])
    assert cli.options_from_args(a).metrics_host == host


def test_a_daemons_metrics_endpoint_binds_loopback_by_default():
    assert DaemonOptions().metrics_host == "127.0.0.1"
    proc = SchedulerProcess(SchedulerConfig(job=JobSpec(), options=DaemonOptions(metrics_port=0)))
    proc.start()
    try:
        host, port = proc.telemetry._server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            assert b"shardps_" in r.read()
    finally:
        proc.drain()
