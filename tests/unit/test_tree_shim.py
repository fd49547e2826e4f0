"""bench/tree_shim.py: a shim folder on PYTHONPATH makes every shardps package load from the tree
it was built for, not from the editable install's working tree (which is where
`PYTHONPATH=TREE` alone sends the subpackages, since the repository maps them from top-level
folders). The tree here is a copy of this repository's packages in tmp_path, so a module that
came from the working tree instead is told apart by its path."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "tree_shim.py"
ROLES = ["shardps.pscommon", "shardps.psserver", "shardps.worker", "shardps.scheduler", "shardps.psctl"]


def _load():
    spec = importlib.util.spec_from_file_location("tree_shim_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


shim = _load()


@pytest.fixture
def tree(tmp_path):
    """A copy of the repository's mapped package folders and pyproject.toml."""
    copy = tmp_path / "tree"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    mapping, _ = shim.package_layout((ROOT / "pyproject.toml").read_text())
    for source in mapping.values():
        shutil.copytree(ROOT / source, copy / source, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def files_through(shim_dir: pathlib.Path, cwd: pathlib.Path, ahead: pathlib.Path, **env: str) -> dict[str, str]:
    """Each role package's resolved file, imported in a fresh interpreter with PYTHONPATH=shim_dir
    from cwd, after putting `ahead` first on sys.path as bench/ps_loop.py puts its own root."""
    code = ("import importlib, json, os, sys\n"
            f"sys.path.insert(0, {str(ahead)!r})\n"
            f"print(json.dumps({{n: os.path.realpath(importlib.import_module(n).__file__) for n in {ROLES!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=dict(os.environ, PYTHONPATH=str(shim_dir), **env),
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_every_role_loads_from_the_shimmed_tree(tree, tmp_path):
    shim.build(tree, tmp_path / "shim")
    neutral = tmp_path / "cwd"
    neutral.mkdir()
    # the working repository's root both as the working directory and ahead on sys.path: the
    # two ways a run used to pick up the working tree's packages
    record = tmp_path / "imports.jsonl"
    for cwd, ahead in ((neutral, tree), (ROOT, ROOT)):
        files = files_through(tmp_path / "shim", cwd, ahead, SHARDPS_SHIM_RECORD=str(record))
        assert sorted(files) == sorted(ROLES)
        for name, path in files.items():
            assert path.startswith(f"{tree.resolve()}/"), (name, path, cwd)
    assert shim.check(tree, tmp_path / "shim", packages=ROLES) >= len(ROLES) + 1
    # both processes recorded their modules at exit; they are the copy's, not the repository's
    procs, modules = shim.verify(tree, record)
    assert procs == 2 and modules >= 2 * (len(ROLES) + 1)
    with pytest.raises(shim.ShimError, match="not under"):
        shim.verify(ROOT, record)


def test_the_check_fails_when_the_tree_lacks_a_package(tree, tmp_path):
    shim.build(tree, tmp_path / "shim")
    shutil.rmtree(tree / "psctl")  # the link dangles: the editable install would answer instead
    with pytest.raises(shim.ShimError, match="shardps.psctl"):
        shim.check(tree, tmp_path / "shim", packages=ROLES)
    run = subprocess.run([sys.executable, str(SCRIPT), "check", str(tree), str(tmp_path / "shim")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "shardps.psctl" in run.stderr


def test_without_the_pin_a_root_ahead_on_the_path_wins(tree, tmp_path):
    """The links alone lose to a repository root put ahead of them (the bench scripts do so);
    sitecustomize.py's pin is what makes the shim hold."""
    shim.build(tree, tmp_path / "shim")
    (tmp_path / "shim" / "sitecustomize.py").unlink()
    with pytest.raises(shim.ShimError, match="not under"):
        shim.check(tree, tmp_path / "shim", packages=ROLES)


def test_build_refuses_a_tree_without_a_mapped_folder(tree, tmp_path):
    shutil.rmtree(tree / "worker")
    with pytest.raises(shim.ShimError, match="worker"):
        shim.build(tree, tmp_path / "shim")


def test_a_rebuild_replaces_the_previous_tree(tree, tmp_path):
    shim.build(ROOT, tmp_path / "shim")
    shim.build(tree, tmp_path / "shim")
    assert (tmp_path / "shim" / "shardps" / "psctl").resolve() == (tree / "psctl").resolve()
    assert (tmp_path / "shim" / "shardps" / "__init__.py").resolve() == (tree / "shardps" / "__init__.py").resolve()


def test_layout_from_pyproject():
    mapping = {"shardps": "shardps", "shardps.worker": "worker", "shardps.worker.models": "models"}
    assert shim.shim_entries(mapping) == [("shardps", "dir", "shardps"), ("shardps/worker", "dir", "worker"),
                                          ("shardps/worker/models", "link", "models")]
    legacy = '[tool.setuptools.packages.find]\ninclude = ["pscommon*", "worker*"]\n'  # before the namespace
    assert shim.package_layout(legacy) == ({"pscommon": "pscommon", "worker": "worker"}, ["pscommon", "worker"])
    with pytest.raises(shim.ShimError, match="package-dir"):
        shim.package_layout('[tool.setuptools.packages.find]\nwhere = ["."]\n')


def test_misplaced_names_modules_outside_the_tree():
    files = {"shardps": "/t/shardps/__init__.py", "shardps.worker": "/w/worker/__init__.py", "shardps.x": None}
    wrong = shim.misplaced(files, "/t")
    assert len(wrong) == 2 and "/w/worker" in wrong[0] and "namespace" in wrong[1]
    assert shim.misplaced({"shardps": "/tree2/shardps/__init__.py"}, "/tree") == ["shardps from /tree2/shardps/__init__.py"]
