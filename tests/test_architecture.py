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
CORE = frozenset({"config", "proxies", "whitelist", "policy", "ratelimit", "addresses", "errors"})
EDGE = frozenset({"store", "app", "cli", "firewall", "firewalld", "client", "webpage", "openapi",
                  "worker"})
FORBIDDEN_MODULES = frozenset({
    "os", "sys", "time", "datetime", "io", "pathlib", "shutil", "tempfile", "glob", "mmap",
    "fcntl", "select", "selectors", "signal", "subprocess", "threading", "multiprocessing",
    "asyncio", "logging", "http.client", "urllib.request", "random", "secrets",
})
PURE_SOCKET_NAMES = frozenset({"inet_pton", "inet_ntop", "AF_INET", "AF_INET6"})
FORBIDDEN_CALLS = frozenset({"open", "print", "input", "eval", "exec", "__import__"})


def imports_of(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import statement in a knocker module."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:  # relative: the package is `knocker` itself
                base = "knocker" + (f".{node.module}" if node.module else "")
                if node.module is None:  # `from . import x` imports the module knocker.x
                    found.extend((f"knocker.{name}", []) for name in names)
                    continue
                found.append((base, names))
            else:
                found.append((node.module or "", names))
    return found


def problems_in(source: str, name: str) -> list[str]:
    """Every breach of the rules above in one module's source."""
    tree = ast.parse(source)
    problems = []
    for module, names in imports_of(tree):
        top = module.split(".")[0]
        if module.startswith("knocker.") and module.split(".")[1] not in CORE:
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
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
    return {module.split(".")[1] for module, _ in imports_of(tree)
            if module.startswith("knocker.")}


def test_core_and_edge_lists_cover_every_module() -> None:
    """Every knocker module is classified, so a new module cannot dodge the rules."""
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
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
    source = (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
    assert problems_in(source, name) == []


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "from time import time",
        "import knocker.store",
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
