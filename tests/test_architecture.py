"""The pure core stays pure (STYLE "The shape"): core modules import no edge module, directly
or through other core modules, and do no I/O, read no clock and no environment.

Rules checked on the source (AST), imports anywhere in a module included (also inside
functions):
- a core module imports only core modules of knocker (transitively);
- no core module imports a module that reads the clock, the environment or the disk, or
  starts processes or threads: os, sys, time, datetime, io, pathlib, shutil, tempfile,
  glob, mmap, fcntl, select, selectors, signal, subprocess, threading, multiprocessing,
  asyncio, logging, http.client, urllib.request, random, secrets;
- `socket` is allowed only for its pure conversions (inet_pton, inet_ntop, AF_INET,
  AF_INET6), which whitelist.py uses at C speed;
- no core module calls open, print, input, eval, exec or __import__.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "knocker"
# Modules by dotted name below knocker; a subpackage's __init__ goes by the package name.
CORE = frozenset({"config", "proxies", "whitelist", "policy", "ratelimit", "addresses", "errors",
                  "store.formats", "store.backend"})
EDGE = frozenset({"store", "store.files", "store.shm", "store.journal", "store.snapshot",
                  "store.filestore", "app", "cli", "firewall", "firewalld", "client",
                  "webpage", "openapi"})
FORBIDDEN_MODULES = frozenset({
    "os", "sys", "time", "datetime", "io", "pathlib", "shutil", "tempfile", "glob", "mmap",
    "fcntl", "select", "selectors", "signal", "subprocess", "threading", "multiprocessing",
    "asyncio", "logging", "http.client", "urllib.request", "random", "secrets",
})
PURE_SOCKET_NAMES = frozenset({"inet_pton", "inet_ntop", "AF_INET", "AF_INET6"})
FORBIDDEN_CALLS = frozenset({"open", "print", "input", "eval", "exec", "__import__"})


def imports_of(tree: ast.AST, package: str = "knocker") -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import statement in a module of
    `package` (relative imports resolved against it)."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:  # relative to `package`, one level up per extra dot
                parent = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = parent + (f".{node.module}" if node.module else "")
                if node.module is None:  # `from . import x` imports the module parent.x
                    found.extend((f"{parent}.{name}", []) for name in names)
                    continue
                found.append((base, names))
            else:
                found.append((node.module or "", names))
    return found


def classify(module: str) -> str:
    """The CORE/EDGE name of an absolute knocker.* module (or of its package)."""
    name = module.removeprefix("knocker.")
    while name not in CORE | EDGE and "." in name:
        name = name.rpartition(".")[0]
    return name


def package_of(name: str) -> str:
    """The package a module's relative imports start from."""
    path = PACKAGE / name.replace(".", "/")
    return f"knocker.{name}" if path.is_dir() else f"knocker.{name}".rpartition(".")[0]


def source_of(name: str) -> Path:
    path = PACKAGE / name.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def problems_in(source: str, name: str) -> list[str]:
    """Every breach of the rules above in one module's source."""
    tree = ast.parse(source)
    problems = []
    package = package_of(name) if name in CORE | EDGE else "knocker"
    for module, names in imports_of(tree, package):
        top = module.split(".")[0]
        if module.startswith("knocker.") and classify(module) not in CORE:
            problems.append(f"{name} imports edge module {module}")
        if module in FORBIDDEN_MODULES or top in FORBIDDEN_MODULES:
            problems.append(f"{name} imports {module}")
        if module == "socket" and names and not set(names) <= PURE_SOCKET_NAMES:
            problems.append(f"{name} imports {sorted(set(names) - PURE_SOCKET_NAMES)} "
                            "from socket")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "socket" and node.attr not in PURE_SOCKET_NAMES):
            problems.append(f"{name} uses socket.{node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in FORBIDDEN_CALLS):
            problems.append(f"{name} calls {node.func.id}()")
    return problems


def knocker_imports(name: str) -> set[str]:
    tree = ast.parse(source_of(name).read_text(encoding="utf-8"))
    return {classify(module) for module, _ in imports_of(tree, package_of(name))
            if module.startswith("knocker.")}


def test_core_and_edge_lists_cover_every_module() -> None:
    """Every knocker module is classified, so a new module cannot dodge the rules."""
    modules = {".".join(path.relative_to(PACKAGE).with_suffix("").parts)
               for path in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    modules = {name.removesuffix(".__init__") for name in modules}
    assert modules <= CORE | EDGE, sorted(modules - CORE - EDGE)
    assert modules >= CORE


@pytest.mark.parametrize("name", sorted(CORE))
def test_core_module_reaches_no_edge_module(name: str) -> None:
    """Following imports through core modules never reaches an edge module."""
    seen: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        reached = knocker_imports(current)
        assert not reached & EDGE, f"{current} imports {sorted(reached & EDGE)}"
        pending.extend(reached & CORE)
    assert seen <= CORE


@pytest.mark.parametrize("name", sorted(CORE | {"__init__"}))
def test_core_module_does_no_io_and_reads_no_clock(name: str) -> None:
    """Core modules import nothing that touches the clock, environment, disk or processes."""
    source = (source_of(name) if name != "__init__" else PACKAGE / "__init__.py").read_text(
        encoding="utf-8")
    assert problems_in(source, name) == []


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "from time import time",
        "import knocker.store",
        "from knocker.store.shm import SharedMemory",
        "from .app import App",
        "from . import firewall",
        "def f():\n    from .cli import main",
        "import socket\nsocket.create_connection(('x', 1))",
        "from socket import socket",
        "open('x')",
        "import logging.handlers",
    ],
)
def test_rule_checker_catches_each_kind_of_breach(source: str) -> None:
    """The checker itself flags every kind of breach it exists for."""
    assert problems_in(source, "sample")


def test_rule_checker_accepts_pure_imports() -> None:
    """Pure stdlib, core and the allowed socket conversions pass."""
    source = ("import socket\nimport ipaddress\nfrom .addresses import parse_ip\n"
              "from knocker.errors import ConfigError\nsocket.inet_pton(socket.AF_INET, 'x')")
    assert problems_in(source, "sample") == []


def test_rule_checker_resolves_relative_imports_inside_a_subpackage() -> None:
    """In a pure module of a subpackage, `.sibling` names the sibling, `..x` knocker.x."""
    assert problems_in("from .files import atomic_write", "store.formats")
    assert problems_in("from .. import app", "store.formats")
    assert problems_in("from .backend import KnockResult\nfrom ..whitelist import Key",
                       "store.formats") == []
