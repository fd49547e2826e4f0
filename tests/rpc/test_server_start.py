"""A server that cannot reach the scheduler at start: it says whom it waits for, a stop
signal ends the wait at once (exit 0, nothing served), and giving up names the address."""
from __future__ import annotations

import logging
import socket
import threading

import pytest

from shardps.pscommon.errors import Unavailable
from shardps.psserver.daemon import ServerConfig, run

from .helpers import poll


def _closed_port() -> str:
    """An address on this machine where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_a_stop_signal_ends_the_wait_for_the_scheduler(caplog):
    caplog.set_level(logging.WARNING, logger="shardps.server")
    cfg = ServerConfig(scheduler=_closed_port(), shard_id=0, register_timeout_s=120.0)
    stop, out = threading.Event(), {}
    t = threading.Thread(target=lambda: out.setdefault("rc", run(cfg, stop)), daemon=True)
    t.start()
    poll(lambda: any("waiting for the scheduler at " + cfg.scheduler in r.getMessage() for r in caplog.records),
         30.0, what="the server to say it waits for the scheduler")
    stop.set()
    t.join(30.0)
    assert not t.is_alive() and out["rc"] == 0


def test_giving_up_names_the_scheduler_address():
    cfg = ServerConfig(scheduler=_closed_port(), shard_id=0, register_timeout_s=0.5)
    with pytest.raises(Unavailable, match=f"could not register with the scheduler at {cfg.scheduler} within 0.5 s"):
        run(cfg, threading.Event())
