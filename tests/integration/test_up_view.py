"""`psctl up`'s live view through a real run (issue 17): on a terminal (a pseudo-terminal from
the standard library's pty) a block of worker and shard rows is redrawn in place with cursor
movements and its last frame shows every worker's final step. (Piped, the same facts come as
plain lines: tests/unit/test_upview.py checks them and the choice of mode without a run.)
A small run: 1 server, 2 workers, 40 steps."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import termios
import time

import pytest

pytestmark = pytest.mark.slow

STEPS = 40
UP = ("up", "--servers", "1", "--workers", "2", "--steps", str(STEPS), "--mode", "async", "--timeout", "150")
WAIT_S = 200.0             # below pytest-timeout's 300 s; the run itself takes seconds
CURSOR_UP = re.compile(r"\x1b\[(\d+)A\r")
CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WORKER_ROW = re.compile(r"  worker (\d)  step +(-|\d+/40)  loss +(-|\d+\.\d{3})  +"
                        r"(starting|done|(?:\d+(?:\.\d)?|-) steps/s)")
SHARD_ROW = re.compile(r"  shard 0   version +(\d+) +(?:\d+(?:\.\d)?|-) updates/s")
SLOW = r"(?: \(scheduler: \w+\))?"   # a Status call that timed out on a loaded machine: rows kept


def _read_terminal(fd: int, proc, timeout_s: float) -> str:
    """Everything written to the terminal until the process exits (polled, with a deadline)."""
    chunks = []
    deadline = time.monotonic() + timeout_s
    while True:
        if time.monotonic() > deadline:
            pytest.fail(f"psctl up still running after {timeout_s}s; log:\n{proc.log_text()[-3000:]}")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:   # EIO: the last writer closed the terminal
                data = b""
            if not data:
                break
            chunks.append(data)
        elif not proc.running():
            break   # exited and nothing left to read
    return b"".join(chunks).decode(errors="replace")


def test_live_view_on_a_terminal(procs, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")   # the child's environment: a terminal that moves its cursor
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        up = procs.spawn("up-live", *UP, "--run-dir", str(procs.root / "live"), stdout=slave)  # stderr: its log
    finally:
        os.close(slave)
    try:
        text = _read_terminal(master, up, WAIT_S)
    finally:
        os.close(master)
    assert up.wait(30) == 0, up.log_text()[-3000:]
    text = text.replace("\r\n", "\n")   # the terminal's output processing

    # the block was drawn, then redrawn in place at least once (at the end, with the final state)
    assert "2 workers training digits-mlp for 40 steps, mode async\n" in text, text[:2000]
    frames = CURSOR_UP.split(text)   # [before the first redraw, N, frame, N, frame, ...]
    assert len(frames) >= 3, text[:3000]
    first = frames[0][frames[0].index("training for "):]
    drawn = [first] + frames[2::2]
    for up_n, frame in zip(frames[1::2], drawn):   # each redraw climbs over the block drawn before it
        assert int(up_n) == frame.split("\x1b[J")[0].count("\n"), (up_n, frame)

    rows = []
    for frame in drawn:
        block = frame.split("\x1b[J")[0]
        lines = [CSI.sub("", line) for line in block.split("\n")[:-1]]
        assert all(line.endswith("\x1b[K") for line in block.split("\n")[:-1]), block   # each line cleared to its end
        assert re.fullmatch(rf"training for \d+ s, mode async{SLOW.replace(' ', '  ', 1)}", lines[0]), lines
        workers = [WORKER_ROW.fullmatch(line) for line in lines[1:3]]
        assert all(workers), lines
        assert [int(m.group(1)) for m in workers] == [0, 1], lines
        assert all(SHARD_ROW.fullmatch(line) for line in lines[3:]) and len(lines) <= 4, lines
        rows.append([m.group(2) for m in workers])

    # steps only go forward from frame to frame, and the last frame shows both workers done
    for i in range(2):
        steps = [int(r[i].split("/")[0]) for r in rows if r[i] != "-"]
        assert steps == sorted(steps), rows
    final = [CSI.sub("", line) for line in drawn[-1].split("\x1b[J")[0].split("\n")[:-1]]
    for i in range(2):
        assert re.fullmatch(rf"  worker {i}  step    40/40  loss \d+\.\d{{3}}  done", final[1 + i]), final
    assert len(final) == 4 and SHARD_ROW.fullmatch(final[3]).group(1) == "80", final   # 2 x 40 pushes

    # then the summary as before, below the block
    after = drawn[-1].split("\x1b[J", 1)[1]
    assert after.startswith("\n$ psctl status --scheduler "), after[:500]
    assert "final held-out accuracy of the served parameters" in after
    assert not re.search(r"^\[\d+ s\]", text, re.MULTILINE), "plain lines on a terminal"
