"""Shard checkpoints: safetensors for tensors, a JSON sidecar for everything else.

Layout under --checkpoint-dir: shard-<i>/ckpt-<seq>.safetensors and ckpt-<seq>.json (with
embedding tables also ckpt-<seq>.tables.safetensors: ids, rows, optimizer state and touch
bookkeeping, "<table>/<array>", whose sha256 the JSON carries too), and
shard-<i>/owner.json, the fence: the server that registered for the shard last claims the
directory there, and a writer that finds another claim refuses to write (Superseded). The
shard copies its state under its lock (Shard.snapshot) and the copy is written outside it.
The tensors file is written first (pscommon.files.write_atomic: temporary name, fsync,
rename, fsync the directory); the JSON, which carries the tensors file's sha256, is written
last the same way and is the commit marker. On load the JSON is checked against its schema
and the tensors against the JSON; a checkpoint that fails any check is refused with a
message naming the file and the problem, and the previous one is used. Nothing is pickled.

The fence backs the lease. A server checks its lease with the scheduler before each checkpoint,
but a server cut off from the scheduler cannot hear that it was replaced; its successor's claim
in the directory tells it. Between the check and the write there is a window of one file read,
which a filesystem without compare-and-swap cannot close.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import threading
import time
import uuid
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from shardps.pscommon.errors import FailedPrecondition, Internal, Superseded
from shardps.pscommon.files import write_atomic
from shardps.pscommon.wire.v1 import tensor_pb2
from shardps.psserver import rowstore

log = logging.getLogger("shardps.checkpoint")
FORMAT = "shardps-shard-checkpoint/1"
KEEP = 3
OWNER = "owner.json"
STATE_SEP = "::"   # "<key>::<optimizer state name>" in the tensors file
PENDING = "__pending"  # "<key>::__pending": sync mode's gradient sum of the step in progress
TABLE_SEP = "/"        # "<table>/<array>" in the tables file


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
    gate: dict                      # completed_step, clocks, pending_from
    tensors: dict[str, np.ndarray]  # key -> values, "key::state" -> optimizer state
    path: str = ""                  # the JSON it was loaded from
    # embedding tables: name -> (TableSpec JSON, the row store's snapshot)
    tables: dict[str, tuple[dict, rowstore.Snapshot]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Refused:
    """A checkpoint that was not used: its JSON's path and why."""

    path: str
    why: str


def save_tensors(tensors: dict[str, np.ndarray], path: str) -> None:
    save_file(tensors, path)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """An error as one line that names its cause: errno name and file for an OSError."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f": {exc.filename}" if exc.filename else ""
        return _one_line(f"{exc.strerror or exc} [{name}]{where}")
    return _one_line(f"{type(exc).__name__}: {exc}")


# -- the sidecar's schema -----------------------------------------------------------------------
class _Unusable(Exception):
    """Why one checkpoint cannot be used; an older one may be."""


def _is_int(v) -> bool:
    return type(v) is int  # bool is an int to isinstance, never to a checkpoint


def _integer(lo: int = 0):
    def check(v, where):
        if not _is_int(v) or v < lo:
            raise _Unusable(f"field '{where}' must be an integer >= {lo}, not {_short(v)}")
    return check


def _number(v, where):
    if not (_is_int(v) or type(v) is float) or not math.isfinite(v):
        raise _Unusable(f"field '{where}' must be a finite number, not {_short(v)}")


def _text(v, where):
    if not isinstance(v, str):
        raise _Unusable(f"field '{where}' must be a string, not {_short(v)}")


def _any_object(v, where):
    if not isinstance(v, dict):
        raise _Unusable(f"field '{where}' must be an object, not {_short(v)}")


def _record(fields: dict[str, Callable]):
    """An object with exactly these fields."""
    def check(v, where):
        _any_object(v, where)
        for name, field in fields.items():
            if name not in v:
                raise _Unusable(f"missing field '{_join(where, name)}'")
            field(v[name], _join(where, name))
        unknown = sorted(set(v) - set(fields))
        if unknown:
            raise _Unusable(f"unknown field '{_join(where, unknown[0])}'")
    return check


def _list_of(item: Callable):
    def check(v, where):
        if not isinstance(v, list):
            raise _Unusable(f"field '{where}' must be a list, not {_short(v)}")
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")
    return check


def _map_of(value: Callable, worker_ids: bool = False):
    """An object used as a map; with `worker_ids` its keys are decimal member ids."""
    def check(v, where):
        _any_object(v, where)
        for k, x in v.items():
            if worker_ids and not re.fullmatch(r"0|[1-9][0-9]{0,18}", k):
                raise _Unusable(f"field '{where}' has a key {k!r} that is not a worker id")
            value(x, _join(where, k))
    return check


def _ledger_entry(v, where):
    if not (isinstance(v, list) and len(v) == 2 and _is_int(v[0]) and v[0] >= 0
            and _is_int(v[1]) and v[1] >= -1):
        raise _Unusable(f"field '{where}' must be [incarnation, last step], not {_short(v)}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, (bytes, bytearray)) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_KEY_SPEC = _record({"key": _text, "param": _text, "dtype": _integer(1), "param_shape": _list_of(_integer(0)),
                     "offset": _integer(0), "length": _integer(1), "shard": _integer(0)})
_SCHEMA = _record({
    "format": _text, "seq": _integer(1), "created": _number, "shard": _integer(0), "fingerprint": _text,
    "job": _any_object, "keys": _list_of(_KEY_SPEC), "versions": _map_of(_integer(0)),
    "shard_version": _integer(0), "ledger": _map_of(_ledger_entry, worker_ids=True),
    "gate": _record({"completed_step": _integer(0), "clocks": _map_of(_integer(0), worker_ids=True),
                     "pending_from": _list_of(_integer(0))}),
    "tensors_file": _text, "sha256": _text,
})
_TABLES = _record({"file": _text, "sha256": _text, "specs": _map_of(_any_object), "stores": _map_of(_any_object)})


def check_meta(meta: Any, shard: int, seq: int) -> None:
    """The sidecar of checkpoint `seq` of `shard` against its schema and itself (pure); raises
    _Unusable naming the first problem."""
    if not isinstance(meta, dict):
        raise _Unusable("not a JSON object")
    if meta.get("format") != FORMAT:
        raise _Unusable(f"unknown format {meta.get('format')!r}")
    if "shard" in meta and meta["shard"] != shard:
        raise _Unusable(f"is of shard {_short(meta['shard'])}, not {shard}")
    _SCHEMA({k: v for k, v in meta.items() if k != "tables"}, "")
    name = f"ckpt-{seq:08d}"
    if "tables" in meta:
        _TABLES(meta["tables"], "tables")
        if meta["tables"]["file"] != f"{name}.tables.safetensors":
            raise _Unusable(f"field 'tables.file' must be '{name}.tables.safetensors', not "
                            f"{_short(meta['tables']['file'])}")
        if set(meta["tables"]["specs"]) != set(meta["tables"]["stores"]):
            raise _Unusable("fields 'tables.specs' and 'tables.stores' name different tables")
    if meta["seq"] != seq:
        raise _Unusable(f"field 'seq' is {meta['seq']} in {name}.json")
    if meta["tensors_file"] != f"{name}.safetensors":   # never a path out of this folder
        raise _Unusable(f"field 'tensors_file' must be '{name}.safetensors', not {_short(meta['tensors_file'])}")
    if not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]):
        raise _Unusable("field 'sha256' must be 64 hex digits")
    names = []
    for i, spec in enumerate(meta["keys"]):
        if spec["shard"] != shard:
            raise _Unusable(f"key {spec['key']!r} (keys[{i}]) belongs to shard {spec['shard']}")
        if spec["dtype"] not in tensor_pb2.DType.values():
            raise _Unusable(f"key {spec['key']!r} has an unknown dtype {spec['dtype']}")
        if spec["offset"] + spec["length"] > math.prod(spec["param_shape"]):
            raise _Unusable(f"key {spec['key']!r} runs past the end of its parameter {spec['param']!r}")
        names.append(spec["key"])
    if len(set(names)) != len(names):
        raise _Unusable(f"key {next(n for n in names if names.count(n) > 1)!r} is listed twice")
    unknown, unversioned = sorted(set(meta["versions"]) - set(names)), sorted(set(names) - set(meta["versions"]))
    if unknown:
        raise _Unusable(f"field 'versions' has versions of keys it does not list: {unknown[:5]}")
    if unversioned:
        raise _Unusable(f"field 'versions' has no version for keys {unversioned[:5]}")
    above = sorted(k for k, v in meta["versions"].items() if v > meta["shard_version"])
    if above:
        raise _Unusable(f"keys {above[:5]} have versions above the shard version {meta['shard_version']}")


def check_tensors(meta: dict, tensors: dict[str, np.ndarray]) -> None:
    """The tensors file against its (already checked) sidecar (pure): every key's values,
    the same optimizer state names for every key, pending sums only with a step in progress,
    every array float32 of its key's length (flat but for pending sums), nothing else."""
    lengths = {spec["key"]: spec["length"] for spec in meta["keys"]}
    states: dict[str, set[str]] = {k: set() for k in lengths}
    for name, arr in tensors.items():
        if name in lengths:
            key, state = name, None
        else:
            key, sep, state = name.rpartition(STATE_SEP)
            if not sep or key not in lengths or not state:
                raise _Unusable(f"tensor {name!r} belongs to no key")
        if arr.dtype != np.float32:
            raise _Unusable(f"tensor {name!r} is {arr.dtype}, not float32")
        if arr.ndim != 1 and state != PENDING:   # a pending sum keeps the shape its pushes had
            raise _Unusable(f"tensor {name!r} has shape {tuple(arr.shape)}, not flat")
        if arr.size != lengths[key]:
            raise _Unusable(f"tensor {name!r} has {arr.size} elements, its key spec says {lengths[key]}")
        if state is not None and state != PENDING:
            states[key].add(state)
    missing = sorted(k for k in lengths if k not in tensors)
    if missing:
        raise _Unusable(f"no tensor for keys {missing[:5]}")
    if len({frozenset(s) for s in states.values()}) > 1:
        raise _Unusable("the optimizer state differs between keys: "
                        f"{sorted({k: sorted(s) for k, s in states.items()}.items())[:3]}")
    if not meta["gate"]["pending_from"] and any(n.endswith(STATE_SEP + PENDING) for n in tensors):
        raise _Unusable("tensors hold pending sums but no step in progress has contributors")


# -- what to restore ------------------------------------------------------------------------
UNSET = "(unset)"   # a job field one side does not have (proto JSON leaves defaults out)


def job_differences(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(field, checkpoint's value, job's value) for each field that differs, nested objects
    flattened to dotted names (pure)."""
    out = []
    for name in sorted(set(saved) | set(current)):
        a, b = saved.get(name, UNSET), current.get(name, UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(job_differences(a, b, f"{prefix}{name}."))
        elif a != b:
            out.append((f"{prefix}{name}", a, b))
    return out


def _value(v) -> str:
    return v if v is UNSET else repr(v)


def choose_restore(found: Snapshot | None, refused: list[Refused], job: dict, start_empty_if_unreadable: bool,
                   where: str | os.PathLike) -> Snapshot | None:
    """The checkpoint to restore, None to start empty, or FailedPrecondition (pure).

    An empty folder is a fresh shard. A folder whose every checkpoint was refused is not:
    starting empty would silently drop the shard's training, so it takes the operator's
    explicit --start-empty-if-unreadable. A checkpoint of another job spec is refused
    whatever the flags say: its values and optimizer state mean something else."""
    if found is None:
        if refused and not start_empty_if_unreadable:
            raise FailedPrecondition(unusable_message(where, refused) + "; fix or move them, or start this shard "
                                     "empty with --start-empty-if-unreadable")
        return None
    diffs = job_differences(found.job, job)
    if diffs:
        fields = "; ".join(f"{f}: checkpoint {_value(a)}, job {_value(b)}" for f, a, b in diffs)
        raise FailedPrecondition(f"checkpoint {found.path} was written for another job spec ({fields}); "
                                 "refusing to restore it")
    return found


def unusable_message(where: str | os.PathLike, refused: list[Refused]) -> str:
    listed = "; ".join(f"{pathlib.Path(r.path).name}: {r.why}" for r in refused)
    return f"no usable checkpoint in {where} ({len(refused)} refused: {listed})"


def _verified_arrays(path: pathlib.Path, sha256: str, what: str) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file whose digest the sidecar recorded; _Unusable naming
    the file when it is missing, unreadable, corrupt or unparsable."""
    try:
        digest = _sha256(path)
    except FileNotFoundError:
        raise _Unusable(f"{what} {path.name} is missing") from None
    except OSError as exc:
        raise _Unusable(f"{what} {path.name} is unreadable: {describe(exc)}") from None
    if digest != sha256:
        raise _Unusable(f"{what} {path.name} is corrupt (sha256 mismatch)")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise _Unusable(f"{what} {path.name} cannot be parsed: {_one_line(exc)}") from None


class CheckpointStore:
    def __init__(self, root: str | os.PathLike, shard: int):
        self.dir = pathlib.Path(root) / f"shard-{shard}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard = shard

    def claim(self, incarnation: int) -> str:
        """Make this directory ours: a newer claim than any earlier server's. Returns the token
        that `check_owner` compares with; OSError when the claim cannot be written."""
        token = uuid.uuid4().hex
        body = {"token": token, "incarnation": incarnation, "pid": os.getpid(), "claimed": time.time()}
        write_atomic(self.dir / OWNER, json.dumps(body, sort_keys=True).encode())
        return token

    def check_owner(self, token: str | None) -> None:
        """Superseded when another server claimed the directory after `token` was taken. A
        writer without a token (its claim failed) and a directory without a readable claim
        are not fenced: the lease check alone guards them."""
        if token is None:
            return
        try:
            owner = json.loads((self.dir / OWNER).read_text())
        except (OSError, ValueError):
            return
        if isinstance(owner, dict) and owner.get("token") not in (None, token):
            raise Superseded(
                f"shard {self.shard}'s checkpoint directory {self.dir} was claimed by a newer server "
                f"(incarnation {owner.get('incarnation')}, pid {owner.get('pid')}): this copy is stale",
                shard=self.shard, incarnation=owner.get("incarnation"))

    def _sequences(self) -> list[int]:
        seqs = []
        for p in self.dir.glob("ckpt-*.json"):
            try:
                seqs.append(int(p.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return sorted(seqs)

    def _json(self, seq: int) -> pathlib.Path:
        return self.dir / f"ckpt-{seq:08d}.json"

    def write(self, take: Callable[[str], Snapshot]) -> pathlib.Path:
        """Write a checkpoint. `take(path)` writes the tensors file at `path` and returns the
        matching Snapshot (Shard.write_snapshot: a copy taken under the shard's lock, written
        outside it). Returns the JSON path."""
        seq = (self._sequences() or [0])[-1] + 1
        tensors_path = self.dir / f"ckpt-{seq:08d}.safetensors"
        snap = write_atomic(tensors_path, take)
        meta = {"format": FORMAT, "seq": seq, "created": time.time(), "shard": snap.shard,
                "fingerprint": snap.fingerprint, "job": snap.job, "keys": snap.keys,
                "versions": snap.versions, "shard_version": snap.shard_version, "ledger": snap.ledger,
                "gate": snap.gate, "tensors_file": tensors_path.name, "sha256": _sha256(tensors_path)}
        if snap.tables:
            meta["tables"] = self._write_tables(seq, snap.tables)
        json_path = self._json(seq)
        write_atomic(json_path, json.dumps(meta, sort_keys=True).encode())
        try:
            self._prune()
        except OSError as exc:  # the checkpoint is committed; old files only cost space
            log.warning("checkpoint %s written, but older ones could not be removed: %s", json_path.name,
                        describe(exc))
        return json_path

    def _write_tables(self, seq: int, tables: dict) -> dict:
        path = self.dir / f"ckpt-{seq:08d}.tables.safetensors"
        arrays = {f"{name}{TABLE_SEP}{k}": a for name, (_, snap) in tables.items() for k, a in snap.arrays.items()}
        write_atomic(path, lambda tmp: save_file(arrays, tmp))
        return {"file": path.name, "sha256": _sha256(path), "specs": {n: spec for n, (spec, _) in tables.items()},
                "stores": {n: snap.meta for n, (_, snap) in tables.items()}}

    def _load_tables(self, meta: dict) -> dict:
        path = self.dir / meta["file"]
        arrays = _verified_arrays(path, meta["sha256"], "tables file")
        by_table: dict[str, dict] = {n: {} for n in meta["specs"]}
        for name, a in arrays.items():
            table, _, array = name.rpartition(TABLE_SEP)
            if table not in by_table:
                raise _Unusable(f"tables file {path.name}: array {name!r} belongs to no table")
            by_table[table][array] = a
        return {n: (meta["specs"][n], rowstore.Snapshot(by_table[n], meta["stores"][n])) for n in meta["specs"]}

    def _prune(self) -> None:
        for seq in self._sequences()[:-KEEP]:
            for suffix in (".json", ".safetensors", ".tables.safetensors"):
                (self.dir / f"ckpt-{seq:08d}{suffix}").unlink(missing_ok=True)

    def _load(self, seq: int) -> Snapshot:
        json_path = self._json(seq)
        try:
            meta = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise _Unusable(f"unreadable: {describe(exc) if isinstance(exc, OSError) else exc}") from None
        check_meta(meta, self.shard, seq)
        tensors = _verified_arrays(self.dir / meta["tensors_file"], meta["sha256"], "tensors file")
        check_tensors(meta, tensors)
        tables = self._load_tables(meta["tables"]) if "tables" in meta else {}
        return Snapshot(meta["shard"], meta["fingerprint"], meta["job"], meta["keys"], meta["versions"],
                        meta["shard_version"], meta["ledger"], meta["gate"], tensors, str(json_path), tables)

    def load(self, seq: int) -> Snapshot:
        """One checkpoint, verified; FailedPrecondition naming the file and the problem otherwise."""
        try:
            return self._load(seq)
        except _Unusable as exc:
            raise FailedPrecondition(f"checkpoint {self._json(seq)}: {exc}") from None

    def newest(self) -> tuple[Snapshot | None, list[Refused]]:
        """The newest checkpoint that verifies (None if none does), and the newer ones refused,
        newest first, each with why."""
        refused = []
        for seq in reversed(self._sequences()):
            try:
                return self._load(seq), refused
            except _Unusable as exc:
                refused.append(Refused(str(self._json(seq)), str(exc)))
        return None, refused

    def latest(self) -> Snapshot | None:
        """The newest checkpoint that verifies; the refused ones are logged."""
        snap, refused = self.newest()
        for r in refused:
            log.error("checkpoint %s: %s; trying the previous checkpoint", r.path, r.why)
        return snap


class Checkpointer:
    """Writes a shard's checkpoints: on a timer, on request (RPC), and at drain. Serialized by
    its own lock so the three never interleave. Counts what it wrote and what failed."""

    def __init__(self, shard, store: CheckpointStore, job_json: dict, now: Callable[[], float] = time.monotonic):
        self.shard = shard
        self.store = store
        self.job_json = job_json
        self.now = now
        self.lock = threading.Lock()
        self.last_time: float | None = None
        self.last_version: int | None = None
        self.last_path: pathlib.Path | None = None
        self.written = 0
        self.failures = 0
        self.last_snapshot_gate: dict = {}
        self.token: str | None = None     # our claim on the directory (CheckpointStore.claim)
        self.superseded = 0

    def claim(self, incarnation: int) -> None:
        """Fence out earlier servers of this shard; a failed claim (a full disk) is logged and
        leaves this writer unfenced, as it would be without the fence."""
        try:
            self.token = self.store.claim(incarnation)
        except OSError as exc:
            log.warning("shard %d cannot claim %s (%s): its checkpoints are guarded by the lease alone",
                        self.shard.shard_id, self.store.dir, describe(exc))

    def write(self, final: bool = False, snapshot: Snapshot | None = None) -> pathlib.Path:
        """Write one checkpoint: of the shard now, or of `snapshot` (a copy the shard took at a
        chosen moment: a consistent cut). A failure, whatever raised it (a full disk, EFBIG, a
        permission, safetensors), is counted, logged once as one line naming its cause and
        raised as Internal; the previous checkpoint stays the newest one. Superseded, with
        nothing written, once a newer server claimed the directory."""
        with self.lock:
            try:
                self.store.check_owner(self.token)
            except Superseded:
                self.superseded += 1
                raise
            holder = {}

            def take(path):
                if snapshot is None:
                    holder["snap"] = self.shard.write_snapshot(path, self.job_json)
                else:
                    save_tensors(snapshot.tensors, path)
                    holder["snap"] = dataclasses.replace(snapshot, tensors={})
                return holder["snap"]
            try:
                path = self.store.write(take)
            except Exception as exc:  # noqa: BLE001 - any failure is the same to the shard: no checkpoint
                self.failures += 1
                message = self._failure(exc, final)
                log.error("%s", message)
                raise Internal(message) from exc
            self.last_path = path
            self.last_time = self.now()
            self.last_version = holder["snap"].shard_version
            self.last_snapshot_gate = holder["snap"].gate
            self.written += 1
            log.info("shard %d checkpoint %s at version %d", self.shard.shard_id, self.last_path.name,
                     self.last_version)
            return self.last_path

    def _failure(self, exc: BaseException, final: bool) -> str:
        what = "final checkpoint" if final else "checkpoint"
        if self.last_version is None:
            cost = ("leaving without it: this shard has no checkpoint, its state is lost" if final
                    else "this shard has no checkpoint yet")
        else:
            kept = f"version {self.last_version}" + (f" ({self.last_path.name})" if self.last_path else "")
            cost = (f"leaving without it: the updates after {kept} are lost" if final
                    else f"the newest is still {kept}")
        return f"shard {self.shard.shard_id} {what} into {self.store.dir} failed: {describe(exc)}; {cost}"

    def due(self) -> bool:
        """Something changed since the last checkpoint."""
        return self.last_version != self.shard.version

    def age_s(self) -> float:
        return -1.0 if self.last_time is None else self.now() - self.last_time

