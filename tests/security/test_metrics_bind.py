"""The Prometheus endpoint binds where the daemon's own gRPC port listens, or loopback when
that is a wildcard (or there is none, as for workers), instead of every interface;
`--metrics-host 0.0.0.0` still opens it to everyone, on purpose. With `--metrics-auth` it
answers only the observer (or admin) token."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from shardps.pscommon import roles
from shardps.pscommon.config import JobSpec
from shardps.pscommon.errors import InvalidArgument
from shardps.pscommon.lifecycle import DaemonOptions
from shardps.pscommon.security import RoleTokens, Security, token_digest
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


def test_metrics_auth_wants_the_observer_or_admin_token(tmp_path):
    """--metrics-auth: a scrape without a known token is 401, with a role that may not read
    metrics 403 (nothing computed), with the observer or admin token the metrics."""
    tokens = {r: f"{r}-token-{i}" for i, r in enumerate(roles.ROLES)}
    security = Security(token=tokens[roles.ADMIN], accept=RoleTokens.of({r: token_digest(t) for r, t in tokens.items()}))
    proc = SchedulerProcess(SchedulerConfig(job=JobSpec(), options=DaemonOptions(
        metrics_port=0, metrics_auth=True, security=security)))
    proc.start()
    try:
        port = proc.telemetry._server.server_address[1]

        def scrape(token: str | None) -> tuple[int, bytes]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as err:
                return err.code, err.read()
        assert scrape(None)[0] == 401 and scrape("not-a-token")[0] == 401
        assert scrape(tokens[roles.WORKER]) == (403, b"the observer or admin token is needed to read metrics\n")
        for role in (roles.OBSERVER, roles.ADMIN):
            code, body = scrape(tokens[role])
            assert code == 200 and b"shardps_" in body
    finally:
        proc.drain()


def test_metrics_auth_without_tokens_is_refused():
    with pytest.raises(InvalidArgument, match="--metrics-auth needs tokens"):
        DaemonOptions(metrics_port=0, metrics_auth=True)
