"""Exactly-once bookkeeping: which (worker, incarnation, step) pushes a shard has taken.

A worker pushes its steps in increasing order and waits for each acknowledgement, so one
watermark per worker suffices: a push at or below it is a retry.
"""
from __future__ import annotations

import dataclasses
import enum

from shardps.pscommon.errors import StaleIncarnation


class Verdict(enum.Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    incarnation: int
    last_step: int  # highest step taken; -1 before the first


def classify(ledger: dict[int, LedgerEntry], worker: int, incarnation: int, step: int) -> Verdict:
    """Apply, duplicate, or FailedPrecondition for an incarnation older than one seen."""
    entry = ledger.get(worker)
    if entry is None or incarnation > entry.incarnation:
        return Verdict.APPLY
    if incarnation < entry.incarnation:
        raise StaleIncarnation(
            f"worker {worker} incarnation {incarnation} is stale (current {entry.incarnation}); rejoin",
            member=worker, incarnation=incarnation, current=entry.incarnation)
    return Verdict.DUPLICATE if step <= entry.last_step else Verdict.APPLY


def record(ledger: dict[int, LedgerEntry], worker: int, incarnation: int, step: int) -> None:
    ledger[worker] = LedgerEntry(incarnation, step)


def to_json(ledger: dict[int, LedgerEntry]) -> dict:
    return {str(w): [e.incarnation, e.last_step] for w, e in ledger.items()}


def from_json(data: dict) -> dict[int, LedgerEntry]:
    return {int(w): LedgerEntry(int(v[0]), int(v[1])) for w, v in data.items()}
