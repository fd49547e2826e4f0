"""Bounds on the steps and clocks a caller names, shared by the scheduler and the servers:
at most 2**53 - 1, because checkpoints and the scheduler's state are JSON, and beyond that a
JSON reader (any that parses numbers as doubles) no longer reads back the value written."""
from __future__ import annotations

from shardps.pscommon.errors import InvalidArgument

MAX_CLOCK = 2**53 - 1


def check_clock(clock: int, what: str) -> int:
    """`clock` if it is in range; InvalidArgument naming `what` and the value otherwise."""
    if not 0 <= clock <= MAX_CLOCK:
        raise InvalidArgument(f"{what} clock {clock} is out of range: at most {MAX_CLOCK} (2**53 - 1)")
    return clock
