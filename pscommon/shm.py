"""Shared-memory regions for the same-host data path: the foundation of issue 15's item 2.

When a worker and a shard run on one host, tensor payloads can move through memory both
processes map, and gRPC carry only a control message (which region, offset, length, checksum,
version). This module is that memory: no gRPC, no policy, just regions and the two ways the
path uses them.

- **Who may map a region.** A region is a regular file in a tmpfs (`/dev/shm`), created new
  (O_CREAT | O_EXCL | O_NOFOLLOW, so a planted name or symlink is refused) with mode 0o600:
  only processes of the same user can open it, and `Region.open` refuses any file that is not
  a regular file owned by this user with no group or other permission bits. A caller must
  still authenticate on the control RPC; the name alone grants nothing across users.
- **Same host.** `host_identity()` is what two processes compare before trying: the boot id,
  the network namespace and the tmpfs instance. Containers on one machine share the boot id
  but not their /dev/shm; two processes that differ in any of the three use TCP.
- **Outbox (worker -> server pushes).** The writer owns the region and does not touch a range
  it named in a call until that call is answered, so the reader needs no lock: it checks the
  range against the region's size and the CRC-32 the control message carries, then reads in
  place. A truncated region or a corrupted range is refused (InvalidArgument) before anything
  is decoded.
- **Published values (server -> worker pulls).** `Published` keeps two slots, each with a
  sequence count (a seqlock): the writer makes a slot's count odd, writes, then makes it even
  and points `current` at it; a reader copies the current slot and keeps the copy only if the
  count was the same even number before and after. So a reader never keeps a half-written
  version, and the writer never waits for readers. The checks rely on stores and loads not
  being reordered (x86-64's memory model); elsewhere readers also verify each slot's CRC.
- **Leaks.** A region's name holds its creator's pid and process start time. The creator
  unlinks it when closed; if it was killed (kill -9), `sweep()` by any survivor unlinks the
  regions whose creator no longer runs (a reused pid has another start time).
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import platform
import re
import secrets
import stat
import struct
import zlib
from typing import Iterable

import numpy as np

from shardps.pscommon.errors import InvalidArgument, Unavailable

SHM_DIR = "/dev/shm"
PREFIX = "shardps-"
_NAME = re.compile(r"^shardps-(\d+)-(\d+)-[0-9a-f]{16}$")
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
# a seqlock's reads are ordered only where the hardware keeps loads and stores in order
VERIFY_READS = platform.machine().lower() not in ("x86_64", "amd64")


def host_identity(shm_dir: str = SHM_DIR) -> str:
    """Equal in two processes when they can share a region: one boot of one machine, one
    network namespace, one tmpfs instance."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    net = os.stat("/proc/self/ns/net").st_ino
    shm = os.stat(shm_dir)
    return f"{boot}/{net}/{shm.st_dev}:{shm.st_ino}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if
    it does not run."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces or parentheses
    return int(data[data.rindex(b")") + 2:].split()[19])


def checksum(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


class Region:
    """A named shared-memory file mapped into this process."""

    def __init__(self, name: str, path: str, fd: int, size: int, owner: bool):
        self.name, self.path, self.size, self.owner = name, path, size, owner
        self._fd = fd
        self.buf = mmap.mmap(fd, size) if size else mmap.mmap(-1, 1)
        self.view = memoryview(self.buf)[:size]

    @classmethod
    def create(cls, size: int, shm_dir: str = SHM_DIR) -> "Region":
        if size < 0:
            raise InvalidArgument(f"region size {size} must be >= 0")
        name = f"{PREFIX}{os.getpid()}-{_start_time(os.getpid())}-{secrets.token_hex(8)}"
        path = os.path.join(shm_dir, name)
        fd = os.open(path, _CREATE, 0o600)
        try:
            os.fchmod(fd, 0o600)   # the umask can only narrow it; make it exactly owner-only
            os.ftruncate(fd, size)
            return cls(name, path, fd, size, owner=True)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise

    @classmethod
    def open(cls, name: str, shm_dir: str = SHM_DIR, min_size: int = 0) -> "Region":
        """Map a region another process of this user created. InvalidArgument for a name that
        is not a region's, a file that is not a private regular file of this user, or one
        shorter than `min_size`; Unavailable when it does not exist (its creator is gone)."""
        if not _NAME.match(name):
            raise InvalidArgument(f"{name!r} is not a shared-memory region's name")
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, _OPEN)
        except FileNotFoundError:
            raise Unavailable(f"shared-memory region {name} does not exist (its creator closed it or died)") from None
        except OSError as exc:   # ELOOP: a symlink in its place
            raise InvalidArgument(f"shared-memory region {name} cannot be opened: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            problem = _unsafe(st, min_size)
            if problem:
                raise InvalidArgument(f"shared-memory region {name} is refused: {problem}")
            return cls(name, path, fd, st.st_size, owner=False)
        except BaseException:
            os.close(fd)
            raise

    def read(self, offset: int, length: int, crc: int | None) -> memoryview:
        """The bytes [offset, offset + length), in place, once they check: within the region and
        (`crc` given) with that CRC-32. InvalidArgument names what is wrong."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"range [{offset}, {offset + length}) is outside region {self.name} "
                                  f"of {self.size} bytes")
        data = self.view[offset:offset + length]
        if crc is not None and checksum(data) != crc:
            raise InvalidArgument(f"range [{offset}, {offset + length}) of region {self.name} does not "
                                  f"match its checksum {crc:#010x}: corrupted or overwritten")
        return data

    def write(self, offset: int, parts: Iterable) -> tuple[int, int]:
        """Copy `parts` (bytes-like) one after another from `offset`; (length, CRC-32)."""
        pos, crc = offset, 0
        for part in parts:
            part = memoryview(part).cast("B")
            end = pos + part.nbytes
            if end > self.size:
                raise InvalidArgument(f"{end - offset} bytes from offset {offset} do not fit region "
                                      f"{self.name} of {self.size} bytes")
            self.view[pos:end] = part
            crc = zlib.crc32(part, crc)
            pos = end
        return pos - offset, crc & 0xFFFFFFFF

    def close(self) -> None:
        """Unmap; the creator also removes the name (a mapping elsewhere stays valid)."""
        if self._fd < 0:
            return
        self.view.release()
        self.buf.close()
        os.close(self._fd)
        self._fd = -1
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unsafe(st: os.stat_result, min_size: int) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not this process's {os.geteuid()}"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):o} lets other users in; a region is 600"
    if st.st_size < min_size:
        return f"{st.st_size} bytes, shorter than the {min_size} its header needs (truncated)"
    return None


def sweep(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove the regions whose creator no longer runs (killed before it could close them);
    returns their names. A region of a live process is left alone."""
    removed = []
    for name in os.listdir(shm_dir):
        m = _NAME.match(name)
        if not m:
            continue
        pid, started = int(m.group(1)), int(m.group(2))
        if _start_time(pid) == started:
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except FileNotFoundError:
            pass   # another survivor swept it first
    return removed


# -- published values: two slots, each behind a seqlock ------------------------------------------
_HEADER = struct.Struct("<8sQQ")            # magic, slot capacity, current slot
_SLOT = struct.Struct("<QQQI4x")            # seq, version, length, crc
_MAGIC = b"SPSPUB1\0"
_SLOTS = 2
_READ_TRIES = 1000


@dataclasses.dataclass(frozen=True)
class Layout:
    capacity: int

    @property
    def size(self) -> int:
        return _HEADER.size + _SLOTS * (_SLOT.size + self.capacity)

    def slot(self, i: int) -> int:
        return _HEADER.size + i * (_SLOT.size + self.capacity)


class Published:
    """Versions of one payload (a shard's values) that readers copy without a lock."""

    def __init__(self, region: Region):
        self.region = region
        magic, capacity, _ = _HEADER.unpack_from(region.buf, 0) if region.size >= _HEADER.size else (b"", 0, 0)
        if magic != _MAGIC:
            raise InvalidArgument(f"region {region.name} holds no published values (bad magic)")
        self.layout = Layout(capacity)
        if region.size < self.layout.size:
            raise InvalidArgument(f"region {region.name} is {region.size} bytes; its header says "
                                  f"{self.layout.size} (truncated)")

    @classmethod
    def create(cls, capacity: int, shm_dir: str = SHM_DIR) -> "Published":
        region = Region.create(Layout(capacity).size, shm_dir)
        _HEADER.pack_into(region.buf, 0, _MAGIC, capacity, 0)
        return cls(region)

    @classmethod
    def open(cls, name: str, shm_dir: str = SHM_DIR) -> "Published":
        return cls(Region.open(name, shm_dir, min_size=_HEADER.size))

    def publish(self, version: int, parts: Iterable) -> None:
        """Make `parts` (bytes-like, at most `capacity` bytes in all) the current version. One
        writer at a time (the shard's lock)."""
        parts = [memoryview(p).cast("B") for p in parts]
        total = sum(p.nbytes for p in parts)
        if total > self.layout.capacity:
            raise InvalidArgument(f"{total} bytes do not fit a published slot of {self.layout.capacity} "
                                  f"in region {self.region.name}")
        buf = self.region.buf
        current = _HEADER.unpack_from(buf, 0)[2]
        slot = self.layout.slot(1 - current)
        seq = _SLOT.unpack_from(buf, slot)[0]
        struct.pack_into("<Q", buf, slot, seq + 1)                  # odd: being written
        length, crc = self.region.write(slot + _SLOT.size, parts)
        _SLOT.pack_into(buf, slot, seq + 1, version, length, crc)
        struct.pack_into("<Q", buf, slot, seq + 2)                  # even: complete
        struct.pack_into("<Q", buf, 16, 1 - current)

    def read(self, into: np.ndarray | None = None, verify: bool = VERIFY_READS) -> tuple[int, np.ndarray]:
        """(version, payload bytes as uint8) of a complete version, copied once (into `into`
        when given, a uint8 array of at least the payload's length)."""
        buf = self.region.buf
        for _ in range(_READ_TRIES):
            current = _HEADER.unpack_from(buf, 0)[2]
            slot = self.layout.slot(current)
            seq, version, length, crc = _SLOT.unpack_from(buf, slot)
            if seq % 2 or length > self.layout.capacity:
                continue
            if into is not None and len(into) < length:
                raise InvalidArgument(f"a buffer of {len(into)} bytes cannot hold version {version}'s {length}")
            out = into[:length] if into is not None else np.empty(length, np.uint8)
            out[:] = np.frombuffer(buf, np.uint8, length, slot + _SLOT.size)
            if _SLOT.unpack_from(buf, slot)[0] != seq:
                continue   # overwritten while we copied
            if verify and checksum(out) != crc:
                continue
            return version, out
        raise Unavailable(f"region {self.region.name}: no complete version in {_READ_TRIES} tries "
                          "(the writer publishes faster than a copy takes)")

    def close(self) -> None:
        self.region.close()
