"""No code path deserializes with pickle: tensors travel and persist as protobuf/safetensors.

Unpickling runs arbitrary code, so a pickle reader on the wire or on a checkpoint would turn
anyone who can reach a port or write a file into someone who runs code on every node. This
scans the shipped packages' source with `ast` (comments and strings do not count).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pscommon", "psserver", "worker", "scheduler", "psctl")

BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve"}
# Loaders that unpickle whatever they are given.
BANNED_CALLS = {"torch.load", "pickle.load", "pickle.loads", "pandas.read_pickle"}
# Loaders that unpickle only when asked to.
PICKLE_FLAG_CALLS = {"numpy.load": "allow_pickle"}
MODULE_ALIASES = {"np": "numpy", "pd": "pandas"}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


class _Scanner(ast.NodeVisitor):
    def __init__(self):
        self.aliases: dict[str, str] = {}   # local name -> dotted name it was imported as
        self.found: list[tuple[int, str]] = []

    def _banned_module(self, lineno: int, module: str) -> None:
        if module.split(".")[0] in BANNED_MODULES:
            self.found.append((lineno, f"imports {module}"))

    def visit_Import(self, node: ast.Import):
        for a in node.names:
            self._banned_module(node.lineno, a.name)
            local = a.asname or a.name.split(".")[0]
            self.aliases[local] = a.name if a.asname else local
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        module = node.module or ""
        if node.level == 0:
            self._banned_module(node.lineno, module)
            for a in node.names:
                self._banned_module(node.lineno, f"{module}.{a.name}" if module else a.name)
                self.aliases[a.asname or a.name] = f"{module}.{a.name}"
        self.generic_visit(node)

    def _resolve(self, name: str) -> str:
        head, _, rest = name.partition(".")
        base = self.aliases.get(head, MODULE_ALIASES.get(head, head))
        return f"{base}.{rest}" if rest else base

    def visit_Call(self, node: ast.Call):
        name = _dotted(node.func)
        if name is not None:
            full = self._resolve(name)
            if full in BANNED_CALLS:
                self.found.append((node.lineno, f"calls {full}"))
            flag = PICKLE_FLAG_CALLS.get(full)
            if flag is not None:
                for kw in node.keywords:
                    if kw.arg == flag and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        self.found.append((node.lineno, f"calls {full} with {flag}={ast.unparse(kw.value)}"))
            # __import__("pickle") / importlib.import_module("pickle")
            if full in ("__import__", "importlib.import_module") and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                self._banned_module(node.lineno, node.args[0].value)
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    scanner = _Scanner()
    scanner.visit(ast.parse(source, filename))
    return sorted(scanner.found)


def _python_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_shipped_code_never_unpickles():
    files = _python_files()
    # Guard against a vacuous pass if the layout moves.
    assert len(files) > 20 and all((ROOT / pkg).is_dir() for pkg in PACKAGES)
    offences = []
    for path in files:
        for lineno, what in scan_source(path.read_text(encoding="utf-8"), str(path)):
            offences.append(f"{path.relative_to(ROOT)}:{lineno}: {what}")
    for line in offences:
        print(line)
    assert not offences, "pickle-capable deserialization found:\n" + "\n".join(offences)


@pytest.mark.parametrize("source", [
    "import pickle",
    "import cloudpickle as cp",
    "import dill.settings",
    "from marshal import loads",
    "import shelve",
    "from _pickle import Unpickler",
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=True)",
    "from torch import load\nload('x.pt')",
    "import torch as th\nth.load('x.pt')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import numpy\nnumpy.load('x.npy', allow_pickle=flag)",
    "from numpy import load as npl\nnpl('x.npy', allow_pickle=True)",
    "pickle.loads(b'')",
    "__import__('pickle')",
    "import importlib\nimportlib.import_module('dill')",
])
def test_scanner_flags(source):
    assert scan_source(source), source


@pytest.mark.parametrize("source", [
    "import json\njson.loads('{}')",
    "import numpy as np\nnp.load('x.npy')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
    "from safetensors.numpy import load_file\nload_file('x.safetensors')",
    "# import pickle\nx = 'torch.load'",
    "from . import pickle_free",
])
def test_scanner_allows(source):
    assert scan_source(source) == [], source
