"""Attacks through paths: `psctl export --out` aimed at something that is not a regular file
(a device node, a FIFO, a directory) or through a symlink planted where the operator writes.
Each is refused before anything is written (one line on stderr, exit 2), the path is left as
it was, and the job keeps serving: the same export to a plain path then works."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from safetensors.numpy import load_file

from shardps.pscommon.config import JobSpec
from shardps.psctl import cli

from .helpers import trains, worker

SHAPES = {"w": 64, "b": 8}


@pytest.fixture
def job(cluster, monkeypatch):
    monkeypatch.setenv("SHARDPS_MALLOC_TUNING", "0")
    c = cluster(JobSpec(num_servers=2))
    client = worker(c.address)
    client.declare({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    trains(client, SHAPES)
    yield c, client
    client.leave()


def export(address: str, out, *flags: str) -> int:
    return cli.main(["export", "--scheduler", address, "--out", str(out), "--timeout", "30", *flags])


def refused_one_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def still_serves(c, client, tmp_path, capsys) -> None:
    trains(client, SHAPES)
    good = tmp_path / "good.safetensors"
    assert export(c.address, good) == 0
    capsys.readouterr()
    assert set(load_file(str(good))) == set(SHAPES)


def _no_temp_files(directory) -> bool:
    return not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_export_refuses_a_device_node(job, tmp_path, capsys):
    c, client = job
    if os.geteuid() == 0:   # a node of our own, so a broken check cannot touch the real /dev/full
        node = tmp_path / "full"
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 7))
    else:                   # without root /dev cannot be written into at all
        node = "/dev/full"
    before = os.lstat(node)
    line = refused_one_line(capsys, export(c.address, node))
    assert str(node) in line and "regular file" in line
    after = os.lstat(node)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert _no_temp_files(os.path.dirname(node))
    still_serves(c, client, tmp_path, capsys)


def test_export_refuses_a_fifo(job, tmp_path, capsys):
    c, client = job
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    line = refused_one_line(capsys, export(c.address, fifo))
    assert str(fifo) in line and "regular file" in line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert _no_temp_files(tmp_path)
    still_serves(c, client, tmp_path, capsys)


def test_export_refuses_a_directory(job, tmp_path, capsys):
    c, client = job
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    line = refused_one_line(capsys, export(c.address, d))
    assert str(d) in line
    assert d.is_dir() and not any(d.iterdir())
    still_serves(c, client, tmp_path, capsys)


@pytest.mark.parametrize("dangling", [False, True])
def test_export_refuses_a_symlink_unless_told_to_follow_it(job, tmp_path, capsys, dangling):
    c, client = job
    target = tmp_path / "elsewhere" / "victim"
    target.parent.mkdir()
    if not dangling:
        target.write_bytes(b"precious")
    link = tmp_path / "model.safetensors"
    link.symlink_to(target)

    line = refused_one_line(capsys, export(c.address, link))
    assert str(link) in line and "symlink" in line and "--follow-symlinks" in line
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target.read_bytes() == b"precious") if not dangling else not target.exists()
    assert _no_temp_files(tmp_path) and _no_temp_files(target.parent)

    # told to follow it: the target is replaced, the link stays a link
    assert export(c.address, link, "--follow-symlinks") == 0
    capsys.readouterr()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert set(load_file(str(target))) == set(SHAPES)
    still_serves(c, client, tmp_path, capsys)


def test_export_replaces_a_regular_file(job, tmp_path, capsys):
    c, client = job
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"old export")
    assert export(c.address, out) == 0
    capsys.readouterr()
    assert set(load_file(str(out))) == set(SHAPES)
    trains(client, SHAPES)
