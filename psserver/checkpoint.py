"""Shard checkpoints: safetensors for tensors, a JSON sidecar for everything else.

Layout under --checkpoint-dir: shard-<i>/ckpt-<seq>.safetensors and ckpt-<seq>.json. The
tensors file is written first (pscommon.files.write_atomic: temporary name, fsync, rename,
fsync the directory); the JSON, which carries the tensors file's sha256, is written last the
same way and is the commit marker. A checkpoint whose JSON is missing, unparsable, or
whose tensors do not match the recorded hash is refused with a clear message and the
previous one is used. Nothing is pickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import threading
import time
from typing import Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from shardps.pscommon.errors import FailedPrecondition
from shardps.pscommon.files import write_atomic

log = logging.getLogger("shardps.checkpoint")
FORMAT = "shardps-shard-checkpoint/1"
KEEP = 3
STATE_SEP = "::"   # "<key>::<optimizer state name>" in the tensors file
PENDING = "__pending"  # "<key>::__pending": sync mode's gradient sum of the step in progress


@dataclasses.dataclass
class Snapshot:
    """What a checkpoint restores: produced by Shard.snapshot(), consumed by Shard.restore()."""

    shard: int
    fingerprint: str
    job: dict                       # the job spec (proto JSON form): refused if it changed
    keys: list[dict]                # KeySpec fields per key
    versions: dict[str, int]
    shard_version: int
    ledger: dict
    gate: dict                      # completed_step, clocks
    tensors: dict[str, np.ndarray]  # key -> values, "key::state" -> optimizer state


def save_tensors(tensors: dict[str, np.ndarray], path: str) -> None:
    save_file(tensors, path)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointStore:
    def __init__(self, root: str | os.PathLike, shard: int):
        self.dir = pathlib.Path(root) / f"shard-{shard}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard = shard

    def _sequences(self) -> list[int]:
        seqs = []
        for p in self.dir.glob("ckpt-*.json"):
            try:
                seqs.append(int(p.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return sorted(seqs)

    def write(self, take: Callable[[str], Snapshot]) -> pathlib.Path:
        """Write a checkpoint. `take(path)` writes the tensors file at `path` and returns the
        matching Snapshot (the shard does both under its lock, so they agree and nothing is
        copied); the slow part, fsync and rename, happens after, outside the lock. Returns the
        JSON path."""
        seq = (self._sequences() or [0])[-1] + 1
        tensors_path = self.dir / f"ckpt-{seq:08d}.safetensors"
        snap = write_atomic(tensors_path, take)
        meta = {"format": FORMAT, "seq": seq, "created": time.time(), "shard": snap.shard,
                "fingerprint": snap.fingerprint, "job": snap.job, "keys": snap.keys,
                "versions": snap.versions, "shard_version": snap.shard_version, "ledger": snap.ledger,
                "gate": snap.gate, "tensors_file": tensors_path.name, "sha256": _sha256(tensors_path)}
        json_path = self.dir / f"ckpt-{seq:08d}.json"
        write_atomic(json_path, json.dumps(meta, sort_keys=True).encode())
        self._prune()
        return json_path

    def _prune(self) -> None:
        for seq in self._sequences()[:-KEEP]:
            for suffix in (".json", ".safetensors"):
                (self.dir / f"ckpt-{seq:08d}{suffix}").unlink(missing_ok=True)

    def load(self, seq: int) -> Snapshot:
        """One checkpoint, verified; FailedPrecondition saying what is wrong otherwise."""
        json_path = self.dir / f"ckpt-{seq:08d}.json"
        try:
            meta = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"checkpoint {json_path} is unreadable: {exc}") from None
        if not isinstance(meta, dict):
            raise FailedPrecondition(f"checkpoint {json_path} is not a JSON object")
        if meta.get("format") != FORMAT:
            raise FailedPrecondition(f"checkpoint {json_path}: unknown format {meta.get('format')!r}")
        if meta.get("shard") != self.shard:
            raise FailedPrecondition(f"checkpoint {json_path} is of shard {meta.get('shard')}, not {self.shard}")
        tensors_path = self.dir / str(meta.get("tensors_file", ""))
        if not tensors_path.is_file():
            raise FailedPrecondition(f"checkpoint {json_path}: tensors file {tensors_path.name} is missing")
        if _sha256(tensors_path) != meta.get("sha256"):
            raise FailedPrecondition(f"checkpoint {json_path}: tensors file {tensors_path.name} is corrupt "
                                     "(sha256 mismatch)")
        try:
            tensors = load_file(str(tensors_path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise FailedPrecondition(f"checkpoint {tensors_path} cannot be parsed: {exc}") from None
        try:
            return Snapshot(meta["shard"], meta["fingerprint"], meta["job"], meta["keys"],
                            {k: int(v) for k, v in meta["versions"].items()}, int(meta["shard_version"]),
                            meta["ledger"], meta["gate"], tensors)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise FailedPrecondition(f"checkpoint {json_path} is missing a field: {exc}") from None

    def latest(self) -> Snapshot | None:
        """The newest checkpoint that verifies; corrupt ones are logged and skipped."""
        for seq in reversed(self._sequences()):
            try:
                return self.load(seq)
            except FailedPrecondition as exc:
                log.error("%s; trying the previous checkpoint", exc)
        return None


class Checkpointer:
    """Writes a shard's checkpoints: on a timer, on request (RPC), and at drain. Serialized by
    its own lock so the three never interleave."""

    def __init__(self, shard, store: CheckpointStore, job_json: dict, now: Callable[[], float] = time.monotonic):
        self.shard = shard
        self.store = store
        self.job_json = job_json
        self.now = now
        self.lock = threading.Lock()
        self.last_time: float | None = None
        self.last_version: int | None = None
        self.last_path: pathlib.Path | None = None

    def write(self) -> pathlib.Path:
        with self.lock:
            holder = {}

            def take(path):
                holder["snap"] = self.shard.write_snapshot(path, self.job_json)
                return holder["snap"]
            self.last_path = self.store.write(take)
            self.last_time = self.now()
            self.last_version = holder["snap"].shard_version
            log.info("shard %d checkpoint %s at version %d", self.shard.shard_id, self.last_path.name,
                     self.last_version)
            return self.last_path

    def due(self) -> bool:
        """Something changed since the last checkpoint."""
        return self.last_version != self.shard.version

    def age_s(self) -> float:
        return -1.0 if self.last_time is None else self.now() - self.last_time
