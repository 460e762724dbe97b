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
- jeepney builds and parses D-Bus messages in pure code and keeps its I/O in `jeepney.io`:
  a core module may import jeepney's top level (Message, new_method_call, DBusAddress,
  MatchRule, ...) and `jeepney.bus_messages`, never `jeepney.io`, nor the parts that read
  the environment or a socket (`jeepney.bus` and its find_*_bus, `jeepney.auth`,
  `jeepney.fds`);
- no core module calls open, print, input, eval, exec or __import__.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "knocker"
# Modules by dotted name below knocker/ ("firewalld.rules" is knocker/firewalld/rules.py,
# "firewalld" its package's __init__.py).
FIREWALLD_CORE = frozenset(
    {"firewalld.rules", "firewalld.messages", "firewalld.failures", "firewalld.schedule"}
)
FIREWALLD_EDGE = frozenset(
    {
        "firewalld",
        "firewalld.backend",
        "firewalld.bus",
        "firewalld.calls",
        "firewalld.coordination",
        "firewalld.docker",
        "firewalld.watcher",
    }
)
STORE_CORE = frozenset(
    {"store.formats", "store.backend", "store.grant_format", "store.redisscripts"}
)
STORE_EDGE = frozenset(
    {
        "store",
        "store.files",
        "store.shm",
        "store.journal",
        "store.snapshot",
        "store.filestore",
        "store.grantlog",
        "store.redisstore",
        "store.migrate",
        "store.plans",
    }
)
CLIENT_CORE = frozenset({"client.journal_format"})
CLIENT_EDGE = frozenset(
    {
        "client",
        "client.commands",
        "client.events",
        "client.journald",
        "client.knock",
        "client.loop",
        "client.service",
        "client.settings",
        "client.grants",
    }
)
CORE = (
    frozenset(
        {"config", "proxies", "whitelist", "policy", "ratelimit", "addresses", "scopes", "errors"}
    )
    | FIREWALLD_CORE
    | STORE_CORE
    | CLIENT_CORE
)
EDGE = (
    frozenset(
        {
            "app",
            "cli",
            "firewall",
            "client",
            "webpage",
            "openapi",
            "audit",
            "events",
            "metrics",
            "apidocs",
            "worker",
        }
    )
    | FIREWALLD_EDGE
    | STORE_EDGE
    | CLIENT_EDGE
)
FORBIDDEN_MODULES = frozenset(
    {
        "os",
        "sys",
        "time",
        "datetime",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
        "glob",
        "mmap",
        "fcntl",
        "select",
        "selectors",
        "signal",
        "subprocess",
        "threading",
        "multiprocessing",
        "asyncio",
        "logging",
        "http.client",
        "urllib.request",
        "random",
        "secrets",
        "jeepney.io",
        "jeepney.bus",
        "jeepney.auth",
        "jeepney.fds",
        "jeepney.find_session_bus",
        "jeepney.find_system_bus",
    }
)
PURE_SOCKET_NAMES = frozenset({"inet_pton", "inet_ntop", "AF_INET", "AF_INET6"})
FORBIDDEN_CALLS = frozenset({"open", "print", "input", "eval", "exec", "__import__"})


def imports_of(tree: ast.AST, package: str = "knocker") -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import statement in a module of
    `package` (relative imports are resolved against it)."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:  # relative: `.` is `package`, `..` its parent, ...
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = anchor + (f".{node.module}" if node.module else "")
                if node.module is None:  # `from . import x` imports the module <anchor>.x
                    found.extend((f"{anchor}.{name}", []) for name in names)
                    continue
                found.append((base, names))
            else:
                found.append((node.module or "", names))
    return found


def classified(module: str) -> str:
    """The CORE/EDGE name of an absolute knocker module: the longest one it lies in."""
    parts = module.split(".")[1:]
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in CORE | EDGE:
            return ".".join(parts[:end])
    return parts[0]


def forbidden(module: str, names: list[str]) -> str | None:
    """The forbidden module (or module.name) an import reaches, if any."""
    for target in [module, *(f"{module}.{name}" for name in names)]:
        parts = target.split(".")
        for end in range(1, len(parts) + 1):
            if ".".join(parts[:end]) in FORBIDDEN_MODULES:
                return target
    return None


def problems_in(source: str, name: str, package: str = "knocker") -> list[str]:
    """Every breach of the rules above in one module's source."""
    tree = ast.parse(source)
    problems = []
    for module, names in imports_of(tree, package):
        if module.startswith("knocker.") and classified(module) not in CORE:
            problems.append(f"{name} imports edge module {module}")
        if (reached := forbidden(module, names)) is not None:
            problems.append(f"{name} imports {reached}")
        if module == "socket" and names and not set(names) <= PURE_SOCKET_NAMES:
            problems.append(f"{name} imports {sorted(set(names) - PURE_SOCKET_NAMES)} from socket")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "socket"
            and node.attr not in PURE_SOCKET_NAMES
        ):
            problems.append(f"{name} uses socket.{node.attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FORBIDDEN_CALLS
        ):
            problems.append(f"{name} calls {node.func.id}()")
    return problems


def path_of(name: str) -> Path:
    """knocker/<name>.py, or the __init__.py of the package <name>."""
    path = PACKAGE.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def package_of(name: str) -> str:
    """The package a module's relative imports start from."""
    if name == "__init__" or path_of(name).name == "__init__.py":
        return "knocker" if name == "__init__" else f"knocker.{name}"
    return "knocker." + name.rpartition(".")[0] if "." in name else "knocker"


def knocker_imports(name: str) -> set[str]:
    tree = ast.parse(path_of(name).read_text(encoding="utf-8"))
    return {
        classified(module)
        for module, _ in imports_of(tree, package_of(name))
        if module.startswith("knocker.")
    }


def test_core_and_edge_lists_cover_every_module() -> None:
    """Every knocker module is classified, so a new module cannot dodge the rules."""
    modules = {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
    } - {"__init__", "__main__"}
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
    source = path_of(name).read_text(encoding="utf-8")
    assert problems_in(source, name, package_of(name)) == []


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
        "from jeepney.io.blocking import open_dbus_connection",
        "from jeepney import io",
        "from jeepney import find_system_bus",
        "import jeepney.auth",
    ],
)
def test_rule_checker_catches_each_kind_of_breach(source: str) -> None:
    """The checker itself flags every kind of breach it exists for."""
    assert problems_in(source, "sample")


def test_rule_checker_accepts_pure_imports() -> None:
    """Pure stdlib, core and the allowed socket conversions pass."""
    source = (
        "import socket\nimport ipaddress\nfrom .addresses import parse_ip\n"
        "from knocker.errors import ConfigError\nsocket.inet_pton(socket.AF_INET, 'x')"
    )
    assert problems_in(source, "sample") == []


def test_rule_checker_resolves_relative_imports_inside_a_subpackage() -> None:
    """In knocker/firewalld/, `.x` is a sibling and `..x` a knocker module."""
    package = "knocker.firewalld"
    assert problems_in("from .rules import accept_rule", "sample", package) == []
    assert problems_in("from ..addresses import canonical", "sample", package) == []
    assert problems_in("from .bus import BusConnection", "sample", package)
    assert problems_in("from ..app import create_app", "sample", package)
    assert problems_in("from . import backend", "sample", package)
    store = "knocker.store"
    assert problems_in("from .files import atomic_write", "sample", store)
    assert (
        problems_in(
            "from .backend import KnockResult\nfrom ..whitelist import Key", "sample", store
        )
        == []
    )


def test_pure_firewalld_modules_may_build_messages_with_jeepney() -> None:
    """jeepney's message construction is pure: building a call passes the checker."""
    source = (
        "from jeepney import DBusAddress, MatchRule, Message, new_method_call\n"
        "from jeepney.bus_messages import message_bus"
    )
    assert problems_in(source, "sample", "knocker.firewalld") == []
