"""JSON state files, replaced atomically and durably (pscommon.files)."""
from __future__ import annotations

import json
import pathlib

from shardps.pscommon.errors import FailedPrecondition
from shardps.pscommon.files import write_atomic


def write_json_atomic(path: pathlib.Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, sort_keys=True).encode())


def read_json(path: pathlib.Path) -> dict | None:
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"state file {path} is unreadable: {exc}") from None
