"""The checked-in stubs are exactly what `make proto` generates from protos/ (fails on drift)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos" / "shardps" / "pscommon" / "wire" / "v1").glob("*.proto"))
CHECKED_IN = ROOT / "pscommon" / "wire" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_protos_exist():
    assert {p.stem for p in PROTOS} >= {"job", "ps", "scheduler", "tensor"}


def test_generated_stubs_match_checked_in(tmp_path):
    # the Makefile's `proto` target, into a temporary directory, in a fresh interpreter
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}",
           f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
           *[str(p.relative_to(ROOT)) for p in PROTOS]]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    generated = tmp_path / "shardps" / "pscommon" / "wire" / "v1"
    expected = sorted(p.stem + s for p in PROTOS for s in SUFFIXES)
    assert sorted(f.name for f in generated.iterdir() if f.is_file()) == expected
    drifted = [name for name in expected
               if not (CHECKED_IN / name).is_file()
               or (CHECKED_IN / name).read_bytes() != (generated / name).read_bytes()]
    assert not drifted, f"stubs differ from protos/ (run `make proto`): {drifted}"
    # nothing generated-looking is checked in without a proto behind it
    stale = [f.name for f in CHECKED_IN.iterdir() if f.name.endswith(SUFFIXES) and f.name not in expected]
    assert not stale, f"checked-in stubs without a .proto: {stale}"
