"""Atomic file replacement: a reader sees the old file or the new one, never part of one."""
from __future__ import annotations

import errno
import os
import pathlib
import secrets
from typing import Callable, TypeVar

T = TypeVar("T")

# O_EXCL|O_NOFOLLOW: the temporary file is new and ours; a name planted in the directory
# (a symlink to somewhere else) is refused rather than written through.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[str], T], durable: bool = True,
                 mode: int = 0o666) -> T | None:
    """Replace `path` with `data`: bytes, or a writer called with the temporary file's path
    (for libraries that write by file name); returns what the writer returns. `mode` (before
    the umask) is the new file's from its creation: 0o600 for a secret is never wider.

    The temporary file sits in the same directory (so the rename cannot cross filesystems)
    and is removed if anything fails. `durable`: fsync the file before the rename and the
    directory after it, so the new contents survive a power loss once this returns.
    """
    final = pathlib.Path(path)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _CREATE, mode)
    try:
        result = _fill(fd, tmp, data)
        if durable:
            _fsync(tmp, os.O_NOFOLLOW)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        try:
            _fsync(final.parent, os.O_DIRECTORY)  # the rename itself
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem cannot sync a directory
                raise
    return result


def _fill(fd: int, tmp: pathlib.Path, data):
    """Write `data` into the new file and close `fd`; the writer's result, or None."""
    if not callable(data):
        with open(fd, "wb") as f:
            f.write(data)
        return None
    os.close(fd)
    return data(str(tmp))


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["write_atomic"]
