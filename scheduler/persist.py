"""Atomic JSON state files: write a temporary file, fsync, rename, fsync the directory."""
from __future__ import annotations

import json
import os
import pathlib

from shardps.pscommon.errors import FailedPrecondition


def write_json_atomic(path: pathlib.Path, data: dict) -> None:
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(path: pathlib.Path) -> dict | None:
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"state file {path} is unreadable: {exc}") from None
