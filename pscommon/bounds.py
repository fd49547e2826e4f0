"""Bounds on the steps and clocks a caller names, shared by the scheduler and the servers:
at most 2**53 - 1, because checkpoints and the scheduler's state are JSON, and beyond that a
JSON reader (any that parses numbers as doubles) no longer reads back the value written."""
from __future__ import annotations

from shardps.pscommon.errors import InvalidArgument

MAX_CLOCK = 2**53 - 1
# async and ssp: how far past its clock on a shard a worker's push may name its step. A worker
# pushes every step to every shard (an empty push where the batch touched none of the shard's
# rows), so an honest push is at its clock; the slack absorbs steps whose pushes were refused
# (a non-finite gradient). Without it one push could move a worker's ledger entry (every later
# push a "duplicate") or the tables' idle clock (every row evicted) arbitrarily far.
MAX_STEP_AHEAD = 1000


def check_clock(clock: int, what: str) -> int:
    """`clock` if it is in range; InvalidArgument naming `what` and the value otherwise."""
    if not 0 <= clock <= MAX_CLOCK:
        raise InvalidArgument(f"{what} clock {clock} is out of range: at most {MAX_CLOCK} (2**53 - 1)")
    return clock
