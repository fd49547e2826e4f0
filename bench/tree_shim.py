"""A folder that makes `import shardps` (and every subpackage) load from one source tree.

The repository maps its top-level folders into one import name (pyproject.toml's package-dir:
shardps.pscommon = ./pscommon, ...), and .venv installs it editable: a meta-path finder that maps
those names to the working tree. `PYTHONPATH=TREE` therefore selects only TREE/shardps (the
small API package); its subpackages are not inside it, so the editable finder hands out the
WORKING TREE's. A before/after run that way compares the working tree with itself.

The shim is DIR/shardps/ laid out as the package would be installed (TREE/shardps's files, and
a link per mapped subpackage), plus DIR/sitecustomize.py. With PYTHONPATH=DIR every process
(children of psctl up and of multiprocessing included) imports shardps from DIR at start-up,
before a script can put a repository root ahead of DIR on sys.path (bench/ps_loop.py and
bench/digits_peer.py do, at every revision), or a repository root as the working directory
(sys.path[0] of `python -m`) can shadow it. Only the top-level package is pinned; the
subpackages then resolve through its __path__, into TREE.

    python bench/tree_shim.py build TREE DIR   # (re)builds DIR for TREE
    python bench/tree_shim.py check TREE DIR   # exit 2, one line on stderr, unless every
                                               # package imports from TREE (fresh interpreter,
                                               # neutral working directory, TREE ahead on sys.path)
    python bench/tree_shim.py verify TREE REC  # the same for the processes that ran with
                                               # SHARDPS_SHIM_RECORD=REC (each appends, at exit,
                                               # the files its shardps modules came from)
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CHECK_TIMEOUT_S = 60


class ShimError(Exception):
    """The tree cannot be shimmed, or the shim does not select it: one line for the user."""


def package_layout(pyproject_text: str) -> tuple[dict[str, str], list[str]]:
    """(import name -> folder, packages to import) from a pyproject.toml's [tool.setuptools].

    A tree from before the shardps namespace (packages.find over top-level folders, such as
    0bf095a) maps each included top-level name to its own folder."""
    tool = tomllib.loads(pyproject_text).get("tool", {}).get("setuptools", {})
    mapping, packages = tool.get("package-dir"), tool.get("packages")
    if isinstance(mapping, dict) and mapping and isinstance(packages, list):
        return mapping, packages
    include = tool.get("packages", {}).get("find", {}).get("include") if isinstance(packages, dict) else None
    tops = sorted({pattern.rstrip("*").rstrip(".") for pattern in include or []} - {""})
    if not tops or any("." in top or "*" in top for top in tops):
        raise ShimError("pyproject.toml has neither [tool.setuptools] package-dir and packages nor "
                        "packages.find include patterns of top-level names")
    return {top: top for top in tops}, tops


def shim_entries(mapping: dict[str, str]) -> list[tuple[str, str, str]]:
    """What to make under DIR, parents first: (path in DIR, "dir" or "link", source in TREE).

    A package with a mapped subpackage becomes a real folder (filled with links to its source's
    entries by the executor), so that the subpackage's link can sit inside it."""
    entries = []
    for name in sorted(mapping, key=lambda n: n.count(".")):
        has_child = any(other.startswith(name + ".") for other in mapping)
        entries.append((name.replace(".", "/"), "dir" if has_child else "link", mapping[name]))
    return entries


def misplaced(files: dict[str, str | None], tree: str) -> list[str]:
    """The modules (name -> resolved file) that did not load from under tree, as messages."""
    root = os.path.join(os.path.realpath(tree), "")
    return [f"{name} from {path or 'no file (a namespace package)'}"
            for name, path in sorted(files.items()) if not (path and path.startswith(root))]


SITECUSTOMIZE = '''\
# Written by bench/tree_shim.py for {tree}
# Pins the top-level packages to this folder before any script or working directory can put a
# repository root ahead of it on sys.path; their subpackages follow their __path__.
import importlib.util
import os
import sys
from importlib.machinery import PathFinder

_HERE = os.path.dirname(os.path.abspath(__file__))


def _pin(names):
    for name in names:
        spec = PathFinder.find_spec(name, [_HERE])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _chain():
    # this file shadows any other sitecustomize on the path: run that one too
    rest = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _record(path):
    # at exit, which files this process's shardps modules came from: evidence from the measured
    # processes themselves, not only from the self-check
    import atexit
    import json

    def write():
        files = {{n: os.path.realpath(m.__file__) for n, m in list(sys.modules.items())
                 if n.split(".")[0] in {names!r} and getattr(m, "__file__", None)}}
        with open(path, "a") as f:
            f.write(json.dumps({{"pid": os.getpid(), "argv": sys.argv[:2], "files": files}}) + "\\n")

    atexit.register(write)


_pin({names!r})
_chain()
if os.environ.get("SHARDPS_SHIM_RECORD"):
    _record(os.environ["SHARDPS_SHIM_RECORD"])
'''


def build(tree: pathlib.Path, out: pathlib.Path) -> None:
    tree = tree.resolve()
    mapping, _ = package_layout((tree / "pyproject.toml").read_text())
    for _, _, source in shim_entries(mapping):
        if not (tree / source).is_dir():
            raise ShimError(f"{tree / source} is missing (pyproject.toml maps a package to it)")
    top = sorted({name.split(".")[0] for name in mapping})
    for name in top:  # a rebuild starts clean, so a stale link cannot survive
        target = out / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
    out.mkdir(parents=True, exist_ok=True)
    for rel, kind, source in shim_entries(mapping):
        if kind == "link":
            (out / rel).symlink_to(tree / source, target_is_directory=True)
            continue
        (out / rel).mkdir()
        mapped = {r for r, _, _ in shim_entries(mapping)}
        for child in sorted((tree / source).iterdir()):
            if child.name != "__pycache__" and f"{rel}/{child.name}" not in mapped:
                (out / rel / child.name).symlink_to(child)
    (out / "sitecustomize.py").write_text(SITECUSTOMIZE.format(tree=tree, names=top))


PROBE = '''\
import importlib, json, os, sys
tree, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, tree)  # what the bench scripts do: the shim must still win
errors = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
files = {n: (os.path.realpath(m.__file__) if getattr(m, "__file__", None) else None)
         for n, m in list(sys.modules.items()) if n.split(".")[0] in {x.split(".")[0] for x in names}}
print(json.dumps({"files": files, "errors": errors}))
'''


def check(tree: pathlib.Path, out: pathlib.Path, packages: list[str] | None = None,
          python: str = sys.executable) -> int:
    """Imports packages (default: every one of tree's pyproject.toml) through the shim; the
    number of shardps modules that loaded, all from under tree."""
    if packages is None:
        mapping, every = package_layout((tree / "pyproject.toml").read_text())
        check(tree, out, list(mapping), python)  # the mapped ones first: a broken link fails fast
        packages = every
    env = dict(os.environ, PYTHONPATH=str(out.resolve()))
    with tempfile.TemporaryDirectory(prefix="shardps-shim-cwd-") as neutral:
        proc = subprocess.run([python, "-c", PROBE, str(tree.resolve()), *packages], cwd=neutral, env=env,
                              capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ShimError(f"the import probe failed: {last}")
    report = json.loads(proc.stdout)
    if report["errors"]:
        name, why = sorted(report["errors"].items())[0]
        raise ShimError(f"{name} does not import through the shim: {why}")
    wrong = misplaced(report["files"], str(tree))
    if wrong:
        raise ShimError(f"{len(wrong)} module(s) not under {tree.resolve()}: {wrong[0]}")
    return len(report["files"])


def verify(tree: pathlib.Path, record: pathlib.Path) -> tuple[int, int]:
    """Reads a SHARDPS_SHIM_RECORD file: (processes, modules), all of them from under tree."""
    lines = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    if not lines:
        raise ShimError(f"{record} records no process")
    for entry in lines:
        wrong = misplaced(entry["files"], str(tree))
        if wrong:
            raise ShimError(f"pid {entry['pid']} {' '.join(entry['argv'])}: {wrong[0]}, not under {tree.resolve()}")
    return len(lines), sum(len(entry["files"]) for entry in lines)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("build", "check", "verify"):
        print("usage: python bench/tree_shim.py build|check TREE DIR | verify TREE RECORD", file=sys.stderr)
        return 2
    mode, tree, out = argv[0], pathlib.Path(argv[1]), pathlib.Path(argv[2])
    try:
        if mode == "build":
            build(tree, out)
        elif mode == "check":
            count = check(tree, out)
            print(f"tree_shim: {count} modules of the packages import from {tree.resolve()}", file=sys.stderr)
        else:
            procs, modules = verify(tree, out)
            print(f"tree_shim: {procs} processes recorded, their {modules} module loads of the packages all "
                  f"from {tree.resolve()}", file=sys.stderr)
    except (ShimError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        print(f"tree_shim {mode}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
