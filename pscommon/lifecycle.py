"""Process lifecycle helpers shared by the daemons: stop signals, ready files, logging."""
from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading


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
    p = pathlib.Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, p)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
