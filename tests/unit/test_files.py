"""pscommon.files.write_atomic on a real directory."""
from __future__ import annotations

import os

import pytest

from shardps.pscommon.files import write_atomic


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("durable", [True, False])
def test_bytes_replace_the_file_and_leave_no_temporary(tmp_path, durable):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    assert write_atomic(target, b"new", durable=durable) is None
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["state.json"]


def test_a_writer_gets_a_fresh_file_beside_the_target_and_its_result_comes_back(tmp_path):
    target = tmp_path / "t.safetensors"
    seen = {}

    def writer(path: str) -> str:
        seen["path"] = path
        seen["size"] = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(b"tensors")
        return "snapshot"
    assert write_atomic(str(target), writer) == "snapshot"
    assert os.path.dirname(seen["path"]) == str(tmp_path) and seen["size"] == 0
    assert os.path.basename(seen["path"]).startswith(".t.safetensors.")
    assert target.read_bytes() == b"tensors" and _names(tmp_path) == ["t.safetensors"]


def test_a_failing_writer_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "ckpt.json"
    target.write_bytes(b"old")

    def writer(path: str):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, writer)
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["ckpt.json"]


def test_a_symlink_at_the_target_is_replaced_not_written_through(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"keep")
    target = tmp_path / "ready"
    target.symlink_to(elsewhere)
    write_atomic(target, b"addr\n", durable=False)
    assert not target.is_symlink() and target.read_bytes() == b"addr\n"
    assert elsewhere.read_bytes() == b"keep"


def test_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "absent" / "f", b"x")
