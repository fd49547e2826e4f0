"""`psctl export`: gather every shard's parameters into one safetensors file.

The file holds the model under its original parameter names and shapes (float32), so
`model.load_state_dict(safetensors.torch.load_file(path), strict=True)` works on a fresh
torch model. A model with embedding tables gets a second file beside it,
`<name>.tables.safetensors`: per table `<table>.ids` (uint64) and `<table>.values` (float32
[rows, dim]), every stored row of every shard; the first file stays loadable strictly.
Read-only: the exporter attaches as an observer and never joins the job.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import stat
import threading

import numpy as np

from shardps.pscommon.config import CodecConfig
from shardps.pscommon.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from shardps.pscommon.files import write_atomic
from shardps.pscommon.security import NO_SECURITY, Security
from shardps.pscommon.sharding import ShardMap

# safetensors metadata is str -> str; "format": "pt" is what torch-side loaders expect.
META_PREFIX = "shardps."


def _one_line(text: str) -> str:
    # psctl prints errors as one line; gRPC details can carry newlines.
    return " ".join(str(text).split())


class _Recorded:
    """One parameter's flat buffer that remembers which [start, stop) ranges were written.

    ShardClient.pull writes each received key as `into[param][offset:offset + length] = v`;
    recording those writes lets export refuse to save a file with holes (a shard that did
    not send a key would otherwise leave uninitialised memory in the tensor).
    """

    def __init__(self, numel: int, lock: threading.Lock):
        self.array = np.empty(numel, np.float32)
        # a set: a retried shard stream writes its keys again
        self.written: set[tuple[int, int]] = set()
        self._lock = lock

    def __setitem__(self, index, value) -> None:
        if not isinstance(index, slice):
            raise TypeError(f"expected a slice, got {index!r}")
        self.array[index] = value
        start, stop, _ = index.indices(self.array.size)
        with self._lock:
            self.written.add((start, stop))


def _check_complete(shard_map: ShardMap, buffers: dict[str, _Recorded]) -> None:
    """Every key of the shard map arrived: otherwise name the missing keys and their shards."""
    missing = []
    for k in shard_map.keys:
        if (k.offset, k.offset + k.length) not in buffers[k.param].written:
            missing.append(f"{k.key} (shard {k.shard})")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FailedPrecondition(f"the servers did not return every key: missing {shown}")
    for p in shard_map.params:  # the map itself must tile each parameter exactly
        spans = sorted(buffers[p.name].written)
        end = 0
        for start, stop in spans:
            if start != end:
                raise FailedPrecondition(f"the shard map does not tile parameter {p.name!r} "
                                         f"(gap or overlap at element {end})")
            end = stop
        if end != p.numel:
            raise FailedPrecondition(f"parameter {p.name!r}: keys cover {end} of {p.numel} elements")


def gather(scheduler: str, timeout: float, security: Security = NO_SECURITY
           ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, np.ndarray]]:
    """The served parameters by original name and shape (float32), metadata (all str), and
    the embedding tables' rows (`<table>.ids`, `<table>.values`; empty without tables)."""
    from shardps.worker.client import ClientConfig, ShardClient

    client = ShardClient(ClientConfig(scheduler=scheduler, control_timeout_s=timeout,
                                      data_timeout_s=timeout, connect_timeout_s=timeout,
                                      retry_deadline_s=timeout, security=security,
                                      # the float32 master weights, not the job's (possibly
                                      # lossy, bf16/fp16) pull encoding
                                      pull_codec=CodecConfig("fp32")))
    try:
        try:
            shard_map = client.attach()
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"nothing to export from {scheduler}: no model has been declared "
                                     f"in this job yet (a worker declares it when it starts)") from exc
        except (Unavailable, DeadlineExceeded) as exc:
            raise type(exc)(f"cannot reach scheduler at {scheduler}: {_one_line(exc)}") from None
        # Waits (up to timeout) for a live server on every shard, else Unavailable naming the count.
        client.wait_for_servers()
        job = client.job  # the metadata describes the job as configured
        lock = threading.Lock()
        buffers = {p.name: _Recorded(p.numel, lock) for p in shard_map.params}
        client.pull(buffers)
        _check_complete(shard_map, buffers)
        tensors = {p.name: buffers[p.name].array.reshape(p.shape) for p in shard_map.params}
        rows = {}
        for table, dim in sorted(client.table_dims().items()):
            rows[f"{table}.ids"], rows[f"{table}.values"] = client.scan_rows(table, dim)
        versions = dict(sorted(client.shard_versions().items()))
        metadata = {
            "format": "pt",
            META_PREFIX + "model_fingerprint": shard_map.fingerprint,
            META_PREFIX + "shard_versions": json.dumps({str(s): v for s, v in versions.items()}),
            META_PREFIX + "mode": job.mode,
            META_PREFIX + "job": json.dumps(job.describe(), sort_keys=True),
            META_PREFIX + "exported_at": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"),
            META_PREFIX + "scheduler": scheduler,
        }
        return tensors, metadata, rows
    finally:
        client.leave()  # an observer never joined: this only stops its thread pool


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISLNK, "a symlink that does not resolve"))


def target(out: pathlib.Path, follow_symlinks: bool = False) -> pathlib.Path:
    """The file the export replaces: `out` itself, or with `follow_symlinks` the file a
    symlink at `out` points to. Refused (InvalidArgument): a symlink without
    `follow_symlinks` (someone who can write the directory could have planted it), and
    anything that exists but is not a regular file: the rename would replace a device node
    or a FIFO with our file, and a directory cannot be replaced at all."""
    if out.is_symlink():
        if not follow_symlinks:
            raise InvalidArgument(f"refusing to write {out}: it is a symlink (to {os.readlink(out)!r}); "
                                  f"pass --follow-symlinks to replace the file it points to")
        out = pathlib.Path(os.path.realpath(out))
    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise InvalidArgument(f"cannot write {out}: {exc.strerror or exc}") from None
    for is_kind, kind in _KINDS:
        if is_kind(mode):
            raise InvalidArgument(f"refusing to write {out}: it is {kind}, not a regular file")
    if not stat.S_ISREG(mode):
        raise InvalidArgument(f"refusing to write {out}: it is not a regular file")
    return out


def _check_writable(out: pathlib.Path) -> None:
    """Create the output's parent and check it takes a new file: before contacting the
    cluster, so a bad path fails before a large model is pulled."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgument(f"cannot write {out}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"cannot write {out}: {out.parent} is not writable")


def write(out: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str],
          follow_symlinks: bool = False) -> int:
    """Write `tensors` to `out` atomically (temp file, fsync, rename); returns the file size.
    The path is checked again just before the rename: gathering a large model takes long
    enough for it to change."""
    from safetensors.numpy import save_file

    out = target(pathlib.Path(out), follow_symlinks)
    # float32 parameters; a tables file's ids stay uint64
    arrays = {n: np.ascontiguousarray(a, a.dtype if a.dtype == np.uint64 else np.float32) for n, a in tensors.items()}
    try:
        write_atomic(out, lambda tmp: save_file(arrays, tmp, metadata))
    except OSError as exc:
        raise InvalidArgument(f"cannot write {out}: {exc.strerror or exc}") from None
    return out.stat().st_size


def run(scheduler: str, out: str, timeout: float, security: Security = NO_SECURITY,
        follow_symlinks: bool = False) -> int:
    path = pathlib.Path(out)
    _check_writable(target(path, follow_symlinks))
    tensors, metadata, rows = gather(scheduler, timeout, security)
    size = write(path, tensors, metadata, follow_symlinks)
    versions = json.loads(metadata[META_PREFIX + "shard_versions"])
    print(f"{path}: {len(tensors)} tensors, {size} bytes "
          f"(model {metadata[META_PREFIX + 'model_fingerprint']}, shard versions "
          f"{' '.join(f'{s}:{v}' for s, v in versions.items())})", flush=True)
    if rows:
        side = tables_path(path)
        size = write(side, rows, metadata, follow_symlinks)
        counts = ", ".join(f"{n[:-len('.ids')]} {len(a)} rows" for n, a in rows.items() if n.endswith(".ids"))
        print(f"{side}: {counts}, {size} bytes", flush=True)
    return 0


def tables_path(out: pathlib.Path) -> pathlib.Path:
    """Where export writes the embedding tables of a model exported to `out`."""
    return out.with_name(f"{out.stem}.tables{out.suffix or '.safetensors'}")
