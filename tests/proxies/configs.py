"""Runnable proxy configurations generated from the shipped files in deploy/.

The end-to-end tests must prove the files users copy, not look-alikes, so each
generator reads deploy/<proxy>/... and only swaps the documented placeholders
(ports, addresses, paths) for test values. Every swap asserts that its placeholder
still occurs on a non-comment line: if someone edits a deploy file so that a
placeholder disappears, the harness fails loudly instead of testing something else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# The placeholders the deploy files document in their headers.
KNOCKER_PLACEHOLDER = "127.0.0.1:8000"
UPSTREAM_PLACEHOLDER = "127.0.0.1:8080"
KNOCK_HOST = "knock.example.com"
APP_HOST = "app.example.com"


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """Where the generated proxy listens and what it talks to (all loopback)."""

    port: int  # listened on at 127.0.0.1 and [::1]
    knocker: str  # "127.0.0.1:PORT" of the real `knocker serve`
    upstream: str  # "127.0.0.1:PORT" of the protected test service


class PlaceholderMissing(AssertionError):
    """A deploy file no longer contains a placeholder the harness substitutes."""


def _code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def substitute(text: str, old: str, new: str, *, source: Path) -> str:
    """Replace every `old` by `new`, insisting that `old` is used outside comments."""
    needle = old.strip("\n")
    if not any(needle in line for line in _code_lines(text)):
        raise PlaceholderMissing(f"{source}: placeholder {old!r} not found outside comments")
    return text.replace(old, new)


def caddy(endpoints: Endpoints, workdir: Path) -> Path:
    """Write a runnable Caddyfile from deploy/caddy/Caddyfile; return its path."""
    source = DEPLOY / "caddy" / "Caddyfile"
    text = source.read_text(encoding="utf-8")
    for old, new in (
        (KNOCKER_PLACEHOLDER, endpoints.knocker),
        (UPSTREAM_PLACEHOLDER, endpoints.upstream),
        # Site addresses: plain HTTP on a test port instead of automatic HTTPS on 443.
        (f"\n{KNOCK_HOST} {{", f"\nhttp://{KNOCK_HOST}:{endpoints.port} {{"),
        (f"\n{APP_HOST} {{", f"\nhttp://{APP_HOST}:{endpoints.port} {{"),
    ):
        text = substitute(text, old, new, source=source)
    # The shipped file has no global options block (users have their own); the test
    # one keeps Caddy off the admin port and the network, and makes SIGTERM quick.
    global_options = "\n".join(
        [
            "{",
            "\tadmin off",
            "\tauto_https off",
            "\tdefault_bind 127.0.0.1 [::1]",
            "\tgrace_period 1s",
            f"\tstorage file_system {{\n\t\troot {workdir / 'storage'}\n\t}}",
            "}",
            "",
        ]
    )
    path = workdir / "Caddyfile"
    path.write_text(global_options + text, encoding="utf-8")
    return path


def nginx(endpoints: Endpoints, workdir: Path) -> Path:
    """Write nginx.conf including a runnable copy of deploy/nginx/knocker.conf."""
    source = DEPLOY / "nginx" / "knocker.conf"
    text = source.read_text(encoding="utf-8")
    for old, new in (
        (KNOCKER_PLACEHOLDER, endpoints.knocker),
        (UPSTREAM_PLACEHOLDER, endpoints.upstream),
        ("listen 80;", f"listen 127.0.0.1:{endpoints.port};"),
        ("listen [::]:80;", f"listen [::1]:{endpoints.port};"),
    ):
        text = substitute(text, old, new, source=source)
    site = workdir / "knocker.conf"
    site.write_text(text, encoding="utf-8")
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    # The shipped file is http-level (conf.d); this is the minimal main file around it,
    # with every path nginx writes inside the test's own directory.
    main = f"""\
daemon off;
master_process on;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} info;
events {{
    worker_connections 256;
}}
http {{
    access_log {workdir / "access.log"};
    client_body_temp_path {workdir / "client_body"};
    proxy_temp_path {workdir / "proxy"};
    fastcgi_temp_path {workdir / "fastcgi"};
    uwsgi_temp_path {workdir / "uwsgi"};
    scgi_temp_path {workdir / "scgi"};
    include {site};
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(main, encoding="utf-8")
    return path


def haproxy(endpoints: Endpoints, workdir: Path) -> Path:
    """Write a runnable haproxy.cfg from deploy/haproxy/ (loading the shipped Lua file)."""
    source = DEPLOY / "haproxy" / "haproxy.cfg"
    text = source.read_text(encoding="utf-8")
    lua = DEPLOY / "haproxy" / "knocker.lua"
    for old, new in (
        (KNOCKER_PLACEHOLDER, endpoints.knocker),
        (UPSTREAM_PLACEHOLDER, endpoints.upstream),
        ("lua-load /etc/haproxy/knocker.lua", f"lua-load {lua}"),
        ("bind :80\n", f"bind 127.0.0.1:{endpoints.port}\n"),
        ("bind :::80 v6only\n", f"bind [::1]:{endpoints.port}\n"),
    ):
        text = substitute(text, old, new, source=source)
    path = workdir / "haproxy.cfg"
    path.write_text(text, encoding="utf-8")
    return path


def traefik(endpoints: Endpoints, workdir: Path) -> Path:
    """Write a runnable static traefik.yml plus dynamic/knocker.yml from deploy/traefik/."""
    source = DEPLOY / "traefik" / "dynamic" / "knocker.yml"
    text = source.read_text(encoding="utf-8")
    for old, new in (
        (KNOCKER_PLACEHOLDER, endpoints.knocker),
        (UPSTREAM_PLACEHOLDER, endpoints.upstream),
        # Plain HTTP on the test port: a router with `tls` only matches TLS requests.
        ("      tls: {}\n", ""),
        ('entryPoints: ["websecure"]', 'entryPoints: ["websecure", "websecure6"]'),
    ):
        text = substitute(text, old, new, source=source)
    dynamic = workdir / "dynamic"
    dynamic.mkdir(exist_ok=True)
    (dynamic / "knocker.yml").write_text(text, encoding="utf-8")

    static_source = DEPLOY / "traefik" / "traefik.yml"
    static = yaml.safe_load(static_source.read_text(encoding="utf-8"))
    websecure = static["entryPoints"]["websecure"]
    if websecure.get("address") != ":443" or "forwardedHeaders" in websecure:
        raise PlaceholderMissing(f"{static_source}: websecure is no longer a plain :443")
    if static["providers"]["file"].get("directory") != "/etc/traefik/dynamic":
        raise PlaceholderMissing(f"{static_source}: file provider directory moved")
    # One entry point per loopback family (Traefik binds one address per entry point);
    # a short grace period so SIGTERM ends the test proxy at once.
    lifecycle = {"lifeCycle": {"graceTimeOut": "0s", "requestAcceptGraceTimeout": "0s"}}
    static["entryPoints"] = {
        "websecure": {"address": f"127.0.0.1:{endpoints.port}", "transport": lifecycle},
        "websecure6": {"address": f"[::1]:{endpoints.port}", "transport": lifecycle},
    }
    static["providers"]["file"]["directory"] = str(dynamic)
    static["providers"]["file"]["watch"] = False
    # No network: no update check, no usage report (the shipped file leaves these to users).
    static["global"] = {"checkNewVersion": False, "sendAnonymousUsage": False}
    static["log"] = {"level": "INFO"}
    path = workdir / "traefik.yml"
    path.write_text(yaml.safe_dump(static), encoding="utf-8")
    return path


GENERATORS = {"caddy": caddy, "nginx": nginx, "haproxy": haproxy, "traefik": traefik}
