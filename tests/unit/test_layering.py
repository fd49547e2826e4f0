"""The import layering of docs/design.md ("Layout and layering"), checked statically.

The roles meet only over the wire; an import across them would work in one process and
silently couple what deploys apart. So every module of the five role folders is parsed with
`ast` (nothing is imported or run, imports inside functions count too, relative imports are
resolved against the module's place in the shardps namespace) and held to:

- pscommon imports no role (psserver, worker, scheduler, psctl);
- psserver, worker and scheduler never import each other, nor psctl;
- only psctl imports every role;
- nothing imports the old top-level names (`import worker`, `from pscommon import x`);
  bench/, examples/ and tests/ may import anything under shardps, but not those names.

It also checks that the package folders and pyproject.toml's `[tool.setuptools] packages`
agree: a folder missing there is silently left out of the wheel.

The checkers take a root folder, so the self-tests at the bottom run them on a synthetic tree
with known violations: a checker that reported nothing would fail them.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = pathlib.Path(__file__).resolve().parents[2]
ROOT_PACKAGE = "shardps"
ROLES = ("pscommon", "psserver", "worker", "scheduler", "psctl")
# bench/, examples/ and tests/: free to import any of shardps, held only to the old-names rule
FREE_FOLDERS = ("bench", "examples", "tests")
SKIP_DIRS = {"__pycache__", ".venv", "build", ".git"}

RULE_COMMON = "pscommon imports no role"
RULE_ROLES = "psserver, worker and scheduler never import each other"
RULE_TOP = "only psctl imports psctl"
RULE_OLD = "no import of the old top-level names"
RULE_RELATIVE = "relative import beyond the shardps package"
RULE_SYNTAX = "module does not parse"


@dataclasses.dataclass(frozen=True)
class Violation:
    path: str  # relative to the checked root
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.detail}"


def python_files(folder: pathlib.Path):
    for path in sorted(folder.rglob("*.py")):
        if not SKIP_DIRS.intersection(path.relative_to(folder).parts):
            yield path


def module_of(root: pathlib.Path, path: pathlib.Path) -> tuple[str, bool]:
    """(dotted name in the shardps namespace, is a package) of a file under a role folder:
    psserver/consistency/sync.py -> shardps.psserver.consistency.sync."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[-1] == "__init__"
    if package:
        parts.pop()
    return ".".join([ROOT_PACKAGE, *parts]), package


def statements(tree: ast.AST):
    """Every statement, at any depth (function and class bodies, branches, handlers). Imports
    are statements, so expressions are not descended into: a third of ast.walk's time."""
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.expr):
                todo.append(child)
        if isinstance(node, ast.stmt):
            yield node


def imported_names(tree: ast.AST, module: str | None, package: bool):
    """(line, absolute module name or None, text) per import anywhere in the tree, functions
    and conditionals included. `from a import b` yields a.b too, since b may be a module.
    module None: the file is not in the shardps namespace, relative imports are skipped."""
    for node in statements(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            names = ", ".join(a.name for a in node.names)
            text = f"from {'.' * node.level}{node.module or ''} import {names}"
            if node.level == 0:
                base = node.module
            elif module is None:
                continue  # a relative import in tests/ or bench/: stays in that folder
            else:
                # the package a relative import starts from: the module's own for __init__.py
                anchor = module.split(".") if package else module.split(".")[:-1]
                if node.level - 1 >= len(anchor):
                    yield node.lineno, None, text
                    continue
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            yield node.lineno, base, text
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}", text


def role_of(name: str, root_exports: dict[str, str]) -> str | None:
    """The role a module name belongs to. `from shardps import PSClient` counts as importing
    what the root package loads for that name (shardps/__init__.py resolves it lazily)."""
    parts = name.split(".")
    if parts[0] != ROOT_PACKAGE or len(parts) < 2:
        return None
    if parts[1] in ROLES:
        return parts[1]
    if len(parts) == 2 and parts[1] in root_exports:
        return role_of(root_exports[parts[1]], {})
    return None


def root_exports(root: pathlib.Path) -> dict[str, str]:
    """name -> module for every `from M import name` in shardps/__init__.py (also inside its
    lazy __getattr__)."""
    init = root / ROOT_PACKAGE / "__init__.py"
    if not init.is_file():
        return {}
    out = {}
    for node in ast.walk(ast.parse(init.read_text(), str(init))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                out[alias.asname or alias.name] = node.module
    return out


def broken_rule(src: str, dst: str) -> str | None:
    if dst == src:
        return None
    if src == "pscommon":
        return RULE_COMMON
    if src == "psctl":
        return None
    if dst == "psctl":
        return RULE_TOP
    if dst != "pscommon":
        return RULE_ROLES
    return None


def check_imports(root: pathlib.Path) -> list[Violation]:
    """Every layering violation under `root` (a checkout, or a synthetic tree in a test)."""
    exports = root_exports(root)
    found = []
    folders = [(r, True) for r in ROLES] + [(f, False) for f in FREE_FOLDERS]
    for folder, is_role in folders:
        for path in python_files(root / folder):
            rel = path.relative_to(root).as_posix()
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), rel)
            except SyntaxError as exc:
                found.append(Violation(rel, exc.lineno or 0, RULE_SYNTAX, str(exc.msg)))
                continue
            module, package = module_of(root, path) if is_role else (None, False)
            for line, name, text in imported_names(tree, module, package):
                if name is None:
                    found.append(Violation(rel, line, RULE_RELATIVE, f"`{text}` climbs out of {module}"))
                    continue
                top = name.split(".")[0]
                if top in ROLES:
                    found.append(Violation(rel, line, RULE_OLD,
                                           f"`{text}` imports `{top}`; the package is `{ROOT_PACKAGE}.{top}`"))
                    continue
                if not is_role:
                    continue
                dst = role_of(name, exports)
                rule = broken_rule(folder, dst) if dst else None
                if rule:
                    found.append(Violation(rel, line, rule, f"{folder} imports {ROOT_PACKAGE}.{dst}: `{text}`"))
    # `from a import b` yields a and a.b: report one line once per rule
    return sorted(set(found), key=lambda v: (v.path, v.line, v.rule))


def package_folders(root: pathlib.Path, package_dir: dict[str, str]) -> set[str]:
    """Dotted names of every folder with an __init__.py under each mapped package folder."""
    names = set()
    for package, folder in package_dir.items():
        base = root / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if SKIP_DIRS.intersection(rel.parts):
                continue
            names.add(".".join([package, *rel.parts]))
    return names


def check_packages(root: pathlib.Path) -> list[str]:
    """Where pyproject.toml's package list and the package folders disagree."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir, listed = cfg.get("package-dir", {}), set(cfg.get("packages", []))
    problems = []
    for role in ROLES:
        want = f"{ROOT_PACKAGE}.{role}"
        if package_dir.get(want) != role:
            problems.append(f"pyproject.toml: [tool.setuptools] package-dir maps {want!r} to "
                            f"{package_dir.get(want)!r}, expected {role!r}")
    on_disk = package_folders(root, package_dir)
    for name in sorted(on_disk - listed):
        problems.append(f"pyproject.toml: package {name!r} has an __init__.py but is not in "
                        "[tool.setuptools] packages (it would be left out of the install)")
    for name in sorted(listed - on_disk):
        problems.append(f"pyproject.toml: [tool.setuptools] packages lists {name!r}, which has "
                        "no folder with an __init__.py")
    for role in ROLES:  # modules in a folder without __init__.py are not installed either
        for path in python_files(root / role):
            if not (path.parent / "__init__.py").is_file():
                problems.append(f"{path.relative_to(root).as_posix()}: its folder has no __init__.py, "
                                "so it is not part of any installed package")
    return problems


# -- the repository ----------------------------------------------------------------------------
def test_repository_layering():
    found = check_imports(REPO)
    assert not found, "layering broken:\n" + "\n".join(map(str, found))


def test_repository_packages_match_pyproject():
    problems = check_packages(REPO)
    assert not problems, "\n".join(problems)


def test_every_role_folder_was_checked():
    # an empty walk (a folder renamed, a bad REPO) would pass the two tests above vacuously
    for role in ROLES:
        assert any(python_files(REPO / role)), f"no Python files found under {role}/"


# -- the checkers themselves: they must fail on a violation ------------------------------------
def write(root: pathlib.Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tree(tmp_path):
    """A tree that keeps every rule, to which each test adds its own breach."""
    write(tmp_path, "shardps/__init__.py",
          "def __getattr__(name):\n    from shardps.worker.api import PSClient\n    return PSClient\n")
    for role in ROLES:
        write(tmp_path, f"{role}/__init__.py")
    write(tmp_path, "pscommon/errors.py", "import numpy\n")
    write(tmp_path, "psserver/shard.py", "from shardps.pscommon import errors\nfrom . import ledger\n")
    write(tmp_path, "psserver/ledger.py", "from .shard import Shard\nfrom ..pscommon.errors import X\n")
    write(tmp_path, "psctl/cli.py", "from shardps.psserver import shard\nfrom shardps.worker import api\n"
                                   "import shardps.scheduler.core\n")
    write(tmp_path, "bench/run.py", "from shardps.worker import api\nfrom shardps.psserver import shard\n")
    write(tmp_path, "tests/test_x.py", "from shardps.scheduler import core\nfrom .helpers import h\n")
    return tmp_path


def test_checker_accepts_a_clean_tree(tree):
    assert check_imports(tree) == []


def test_checker_reports_a_role_importing_another(tree):
    write(tree, "psserver/bad.py", "import os\n\nfrom shardps.worker import api\n")
    found = check_imports(tree)
    assert [str(v) for v in found] == [
        f"psserver/bad.py:3: [{RULE_ROLES}] psserver imports shardps.worker: `from shardps.worker import api`"]


def test_checker_counts_relative_and_function_level_imports(tree):
    write(tree, "pscommon/codecs/__init__.py",
          "def load():\n    from ...psctl import cli\n    return cli\n")  # shardps.pscommon.codecs -> shardps
    write(tree, "scheduler/core.py", "class C:\n    def f(self):\n        from .. import worker\n")
    write(tree, "worker/deep.py", "from .... import x\n")
    found = {(v.path, v.line, v.rule) for v in check_imports(tree)}
    assert found == {("pscommon/codecs/__init__.py", 2, RULE_COMMON),
                     ("scheduler/core.py", 3, RULE_ROLES),
                     ("worker/deep.py", 1, RULE_RELATIVE)}


def test_checker_reports_psctl_below_a_role_and_the_lazy_root_export(tree):
    write(tree, "worker/cli_hook.py", "import shardps.psctl.cli\n")
    write(tree, "scheduler/client.py", "from shardps import PSClient\n")  # loads shardps.worker
    found = {(v.path, v.rule) for v in check_imports(tree)}
    assert found == {("worker/cli_hook.py", RULE_TOP), ("scheduler/client.py", RULE_ROLES)}


def test_checker_reports_old_top_level_names_everywhere(tree):
    write(tree, "psctl/old.py", "import worker.api\n")
    write(tree, "bench/old.py", "from pscommon import errors\n")
    write(tree, "tests/test_old.py", "def f():\n    import scheduler\n")
    found = {(v.path, v.line, v.rule) for v in check_imports(tree)}
    assert found == {("psctl/old.py", 1, RULE_OLD), ("bench/old.py", 1, RULE_OLD),
                     ("tests/test_old.py", 2, RULE_OLD)}


def test_package_check_reports_both_directions(tree):
    write(tree, "psserver/consistency/__init__.py")
    write(tree, "worker/loose/mod.py", "x = 1\n")
    listed = ["shardps", *(f"shardps.{r}" for r in ROLES), "shardps.worker.gone"]
    dirs = ", ".join(f'"shardps.{r}" = "{r}"' for r in ROLES)
    write(tree, "pyproject.toml", "[tool.setuptools]\n"
          f'package-dir = {{ "shardps" = "shardps", {dirs} }}\n'
          f"packages = {listed!r}\n".replace("'", '"'))
    problems = check_packages(tree)
    assert len(problems) == 3, problems
    assert "'shardps.psserver.consistency' has an __init__.py but is not in" in problems[0]
    assert "lists 'shardps.worker.gone', which has no folder" in problems[1]
    assert problems[2].startswith("worker/loose/mod.py: its folder has no __init__.py")
