"""Docker-published ports, whose NAT bypasses firewalld's zones (trap 9): find and warn.

Owns: reading Docker's API answer and docker-proxy command lines (pure), looking for
them on this host (Docker's socket and /proc), and the startup warning that names a
monitored port Docker publishes. Never fatal: a failed look is only logged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable

from ..config import FirewalldConfig, MonitoredPort

log = logging.getLogger("knocker.firewalld")


def docker_ports_from_api(body: bytes) -> set[tuple[int, str]]:
    """(host port, protocol) of every port published by a running container, from
    Docker's GET /containers/json answer."""
    containers = json.loads(body)
    found: set[tuple[int, str]] = set()
    if not isinstance(containers, list):
        return found
    for container in containers:
        ports = container.get("Ports") if isinstance(container, dict) else None
        for item in ports if isinstance(ports, list) else ():
            if isinstance(item, dict) and isinstance(item.get("PublicPort"), int):
                found.add((item["PublicPort"], str(item.get("Type", "tcp"))))
    return found


def docker_port_from_proxy(argv: list[str]) -> tuple[int, str] | None:
    """(host port, protocol) from a docker-proxy command line, else None."""
    if not argv or not argv[0].endswith("docker-proxy"):
        return None
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    try:
        port = int(options.get("-host-port", ""))
    except ValueError:
        return None
    return port, options.get("-proto", "tcp")


def docker_warnings(published: set[tuple[int, str]], ports: Iterable[MonitoredPort]) -> list[str]:
    return [
        f"monitored port {port.port}/{port.protocol} is published by Docker: Docker's NAT "
        "rules bypass firewalld zones, so it stays reachable without a knock. Publish it on "
        "127.0.0.1 only, or run that container with host networking (network_mode: host) "
        "so firewalld sees its traffic; see docs/firewalld.md"
        for port in ports
        if (port.port, port.protocol) in published
    ]


def docker_published_ports(
    socket_path: str = "/var/run/docker.sock", proc: str = "/proc"
) -> set[tuple[int, str]]:
    found: set[tuple[int, str]] = set()
    if os.path.exists(socket_path):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(socket_path)
                sock.sendall(b"GET /containers/json HTTP/1.0\r\nHost: docker\r\n\r\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                    if sum(map(len, chunks)) > 16 << 20:
                        break
            head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
            if head.split(b" ", 2)[1:2] == [b"200"]:
                found |= docker_ports_from_api(body)
        except (OSError, ValueError, IndexError) as exc:
            log.debug("firewalld: Docker API not readable: %s", exc)
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as handle:
                argv = [arg.decode(errors="replace") for arg in handle.read().split(b"\0") if arg]
        except OSError:
            continue
        port = docker_port_from_proxy(argv)
        if port is not None:
            found.add(port)
    return found


def warn_about_docker(config: FirewalldConfig) -> None:
    try:
        published = docker_published_ports()
    except Exception as exc:  # noqa: BLE001 - a warning must never stop the service
        log.debug("firewalld: Docker check failed: %s", exc)
        return
    for warning in docker_warnings(published, config.monitored_ports):
        log.warning("firewalld: %s", warning)
