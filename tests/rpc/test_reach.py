"""A verb's --scheduler that reached something not shardps says so in one line (issue 17):
another gRPC server, or an HTTP server; a shardps daemon that only answers slowly is never
called something else. In-process servers on port 0; no daemon processes."""
from __future__ import annotations

import http.server
import threading

import pytest

from shardps.pscommon import grpcutil
from shardps.pscommon.config import JobSpec
from shardps.psctl import cli, reach
from shardps.scheduler.daemon import SchedulerConfig, SchedulerProcess


@pytest.fixture(autouse=True)
def _no_malloc_tuning(monkeypatch):
    monkeypatch.setenv("SHARDPS_MALLOC_TUNING", "0")   # main() runs in the test process


@pytest.fixture
def grpc_not_shardps():
    server = grpcutil.make_server(max_workers=2)
    grpcutil.add_health(server)   # answers gRPC, has neither shardps service
    address = grpcutil.bind(server, "127.0.0.1:0")
    server.start()
    yield address
    server.stop(0)


@pytest.fixture
def http_not_shardps():
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join(10)


def _one_line(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 1   # a runtime failure
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    (line,) = captured.err.splitlines()
    return line


def test_a_grpc_server_that_is_not_shardps(capsys, grpc_not_shardps):
    assert _one_line(capsys, ["status", "--scheduler", grpc_not_shardps, "--timeout", "5"]) == (
        f"psctl: {grpc_not_shardps} is a gRPC server, not shardps; --scheduler wants the scheduler's gRPC address")


def test_an_http_server_that_is_not_shardps(capsys, http_not_shardps):
    assert _one_line(capsys, ["inspect", "--scheduler", http_not_shardps, "--timeout", "5"]) == (
        f"psctl: {http_not_shardps} is an HTTP server, not shardps; --scheduler wants the scheduler's gRPC address")


def test_a_scheduler_that_did_not_answer_in_time_is_not_called_something_else():
    proc = SchedulerProcess(SchedulerConfig(job=JobSpec(), listen="127.0.0.1:0"))
    proc.start()
    try:
        # its Status timed out (DeadlineExceeded): the probe must not call it "not shardps"
        assert reach.wrong_role(proc.address, "--scheduler", "scheduler") is None
    finally:
        proc.drain()
