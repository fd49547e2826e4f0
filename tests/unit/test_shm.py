"""Shared-memory regions (pscommon/shm.py): round trips of every dtype's bytes, refusal of
regions another user could have written or that were truncated or corrupted, readers racing a
writer in another process never keep a torn version, and kill -9 leaves nothing once a
survivor sweeps."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardps.pscommon import shm
from shardps.pscommon.errors import InvalidArgument, Unavailable

pytestmark = pytest.mark.skipif(not os.path.isdir(shm.SHM_DIR), reason="no /dev/shm on this machine")

DTYPES = [np.float32, np.float16, np.uint16, np.int8, np.int64, np.float64]


def ours() -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(shm.PREFIX)}


@pytest.fixture
def region():
    r = shm.Region.create(1 << 16)
    yield r
    r.close()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5)])
def test_outbox_round_trip_of_every_dtype_and_shape(region, dtype, shape):
    value = (np.arange(int(np.prod(shape)), dtype=np.float64) * 1.5 - 3).astype(dtype).reshape(shape)
    length, crc = region.write(64, [b"head", value])
    assert length == 4 + value.nbytes
    peer = shm.Region.open(region.name)
    try:
        got = peer.read(64, length, crc)
        assert bytes(got[:4]) == b"head"
        np.testing.assert_array_equal(np.frombuffer(got[4:], dtype).reshape(shape), value)
    finally:
        del got
        peer.close()
    assert region.name in ours()   # only the creator removes the name


def test_a_corrupted_range_or_one_outside_the_region_is_refused_and_nothing_changes(region):
    length, crc = region.write(0, [np.arange(100, dtype=np.float32)])
    peer = shm.Region.open(region.name)
    try:
        before = bytes(peer.view[:length])
        region.view[17] ^= 0xFF
        with pytest.raises(InvalidArgument, match="does not match its checksum"):
            peer.read(0, length, crc)
        assert bytes(peer.view[:length]) != before and bytes(peer.view[:length])[:17] == before[:17]
        with pytest.raises(InvalidArgument, match="outside region"):
            peer.read(region.size - 8, 16, None)
        with pytest.raises(InvalidArgument, match="outside region"):
            peer.read(-1, 4, None)
        with pytest.raises(InvalidArgument, match="do not fit"):
            region.write(region.size - 4, [b"12345678"])
    finally:
        peer.close()


def test_a_region_is_private_to_its_user_and_mode_600_whatever_the_umask(region):
    old = os.umask(0)
    try:
        r = shm.Region.create(16)
    finally:
        os.umask(old)
    try:
        assert os.stat(r.path).st_mode & 0o777 == 0o600
        os.chmod(r.path, 0o644)
        with pytest.raises(InvalidArgument, match="lets other users in"):
            shm.Region.open(r.name)
    finally:
        r.close()


@pytest.mark.parametrize("name", ["../../etc/passwd", "shardps-1-2-zz", "other-file", f"shardps-1-2-{'a' * 16}/x"])
def test_names_that_are_not_a_regions_are_refused(name):
    with pytest.raises(InvalidArgument, match="not a shared-memory region's name"):
        shm.Region.open(name)


def test_a_symlink_or_a_directory_in_a_regions_place_is_refused(region, tmp_path):
    fake = f"shardps-{os.getpid()}-1-{'b' * 16}"
    os.symlink(region.path, os.path.join(tmp_path, fake))
    with pytest.raises(InvalidArgument, match="cannot be opened"):
        shm.Region.open(fake, str(tmp_path))
    os.mkdir(os.path.join(tmp_path, fake.replace("b", "c")))
    with pytest.raises(InvalidArgument):
        shm.Region.open(fake.replace("b", "c"), str(tmp_path))
    with pytest.raises(Unavailable, match="does not exist"):
        shm.Region.open(fake.replace("b", "d"), str(tmp_path))


def test_a_truncated_published_region_is_refused():
    pub = shm.Published.create(4096)
    try:
        pub.publish(1, [b"x" * 100])
        os.truncate(pub.region.path, pub.layout.size - 1)
        with pytest.raises(InvalidArgument, match="truncated"):
            shm.Published.open(pub.region.name)
        os.truncate(pub.region.path, 8)
        with pytest.raises(InvalidArgument, match="truncated"):
            shm.Published.open(pub.region.name)
    finally:
        pub.close()


def test_a_region_that_holds_no_published_values_is_refused(region):
    with pytest.raises(InvalidArgument, match="bad magic"):
        shm.Published.open(region.name)


def test_published_versions_round_trip_into_a_callers_buffer():
    pub = shm.Published.create(1024)
    try:
        reader = shm.Published.open(pub.region.name)
        pub.publish(7, [np.full(10, 7, np.uint64)])
        into = np.zeros(1024, np.uint8)
        version, got = reader.read(into, verify=True)
        assert version == 7 and np.shares_memory(got, into)
        assert np.array_equal(got.view(np.uint64), np.full(10, 7, np.uint64))
        pub.publish(8, [b""])
        assert reader.read()[0] == 8 and len(reader.read()[1]) == 0
        pub.publish(9, [b"z" * 100])
        with pytest.raises(InvalidArgument, match="cannot hold"):
            reader.read(np.zeros(10, np.uint8))
        with pytest.raises(InvalidArgument, match="do not fit"):
            pub.publish(10, [b"z" * 1025])
        reader.close()
    finally:
        pub.close()


def test_a_slot_being_written_is_never_read():
    """A writer that died between making a slot's count odd and even leaves it unreadable:
    the reader gives up with Unavailable rather than return half a version."""
    pub = shm.Published.create(64)
    try:
        pub.publish(1, [b"a" * 64])
        slot = pub.layout.slot(1)          # the current slot after one publish
        count = int.from_bytes(pub.region.buf[slot:slot + 8], "little")
        pub.region.buf[slot:slot + 8] = (count + 1).to_bytes(8, "little")
        with pytest.raises(Unavailable, match="no complete version"):
            shm.Published.open(pub.region.name).read()
    finally:
        pub.close()


# -- a writer in another process ---------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, numpy as np
    from shardps.pscommon import shm
    capacity = int(sys.argv[1])
    pub = shm.Published.create(capacity)
    print(pub.region.name, flush=True)
    v = 0
    while True:
        v += 1
        n = (v * 7919) % (capacity // 8) + 1          # lengths change from version to version
        pub.publish(v, [np.full(n, v, np.uint64)])
""")


def expected_words(version: int, capacity: int) -> int:
    return (version * 7919) % (capacity // 8) + 1


@pytest.fixture(scope="module")
def writer():
    capacity = 1 << 20
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(capacity)], stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    yield name, capacity
    proc.kill()
    proc.wait(30)
    os.unlink(os.path.join(shm.SHM_DIR, name))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reads=st.integers(1, 40), into=st.booleans(), verify=st.booleans())
def test_readers_racing_a_writer_never_keep_a_torn_version(writer, reads, into, verify):
    name, capacity = writer
    reader = shm.Published.open(name)
    buf = np.empty(capacity, np.uint8) if into else None
    last = 0
    try:
        for _ in range(reads):
            version, got = reader.read(buf, verify=verify)
            words = got.view(np.uint64)
            assert len(words) == expected_words(version, capacity), (version, len(words))
            assert (words == version).all(), f"version {version} holds {np.unique(words)[:5]}"
            assert version >= last
            last = version
    finally:
        reader.close()


def test_host_identity_is_shared_by_processes_on_this_host_and_names_the_tmpfs(tmp_path):
    here = shm.host_identity()
    there = subprocess.run([sys.executable, "-c", "from shardps.pscommon import shm; print(shm.host_identity())"],
                           capture_output=True, text=True, timeout=60).stdout.strip()
    assert here == there
    assert shm.host_identity(str(tmp_path)) != here   # another filesystem: no region in common


def test_regions_of_a_process_killed_by_sigkill_are_swept_and_live_ones_are_not(region):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from shardps.pscommon import shm
        r, p = shm.Region.create(4096), shm.Published.create(4096)
        print(r.name, p.region.name, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    names = child.stdout.readline().split()
    assert set(names) <= ours()
    assert not set(shm.sweep()) & set(names)   # alive: kept
    assert set(names) <= ours()
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert set(names) <= ours()   # nobody closed them
    swept = set(shm.sweep())
    assert set(names) <= swept and not set(names) & ours()
    assert region.name in ours()   # this process's region stays
