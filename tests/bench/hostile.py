"""The "hostile clients" row of `make bench` (issue 11, item 1).

`hostile_round` holds COUNT connections open against one server, a quarter of each kind
(idle, trickled head, trickled wrong-key body, trickled chunked body), from SOURCES
loopback addresses 127.0.0.2 and up, reopening any the server closes (as an attacker
would), while a well-behaved client at 127.0.0.250 alternates /verify and /knock on fresh
connections and records each latency. Bounded: `duration` seconds, COUNT sockets.
"""

from __future__ import annotations

import errno
import http.client
import random
import resource
import selectors
import socket
import threading
import time
from typing import Any

COUNT, SOURCES = 1000, 100
KINDS = ("idle", "head", "body", "chunked")
TRICKLE_EVERY = 1.0
PROBE_SOURCE = "127.0.0.250"
PROBE_EVERY = 0.02

_OPENING = {
    "idle": b"",
    "head": b"GET /verify HTTP/1.1\r\nHost: x\r\n",
    "body": b"POST /knock HTTP/1.1\r\nHost: x\r\nX-Api-Key: wrong-key\r\n"
    b"Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n{",
    "chunked": b"POST /knock HTTP/1.1\r\nHost: x\r\nX-Api-Key: wrong-key\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
}
_TRICKLE = {"idle": b"", "head": b"X", "body": b" ", "chunked": b"1\r\n \r\n"}


def raise_fd_limit(wanted: int) -> int:
    """The soft limit of open files raised towards `wanted` (at most the hard limit);
    children started afterwards (the servers) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


class _Attackers:
    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.kind: dict[socket.socket, str] = {}
        self.opened = self.reopened = self.refused = 0
        for number in range(count):
            self.open(KINDS[number % len(KINDS)], number)

    def open(self, kind: str, number: int) -> None:
        source = f"127.0.0.{2 + number % SOURCES}"
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.port), timeout=2, source_address=(source, 0)
            )
            sock.sendall(_OPENING[kind])
        except OSError:
            self.refused += 1
            return
        sock.setblocking(False)
        self.kind[sock] = kind
        self.selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def drop(self, sock: socket.socket) -> str:
        kind = self.kind.pop(sock)
        self.selector.unregister(sock)
        sock.close()
        return kind

    def run(self, until: float) -> None:
        last = 0.0
        number = 0
        closed: list[tuple[float, str]] = []
        jitter = random.Random(7)
        while time.monotonic() < until:
            # Keep the pressure on: what the server closed comes back 0.5-1.5 s later
            # (at once would make it a connection flood, another test).
            due = [kind for when, kind in closed if when <= time.monotonic()]
            closed = [(when, kind) for when, kind in closed if when > time.monotonic()]
            for kind in due:
                number += 1
                self.reopened += 1
                self.open(kind, number)
            if time.monotonic() - last >= TRICKLE_EVERY:
                last = time.monotonic()
                for sock, kind in list(self.kind.items()):
                    if not _TRICKLE[kind]:
                        continue
                    try:
                        sock.send(_TRICKLE[kind])
                    except OSError as error:
                        if error.errno != errno.EAGAIN:
                            self.drop(sock)
            for key, _ in self.selector.select(timeout=0.02):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data and sock in self.kind:
                    closed.append((time.monotonic() + jitter.uniform(0.5, 1.5), self.drop(sock)))

    def close(self) -> None:
        for sock in list(self.kind):
            self.drop(sock)
        self.selector.close()


def _probe(port: int, method: str, path: str, key: str) -> tuple[float, int]:
    started = time.monotonic()
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10, source_address=(PROBE_SOURCE, 0)
    )
    try:
        conn.request(method, path, headers={"X-Api-Key": key} if key else {})
        response = conn.getresponse()
        response.read()
        return time.monotonic() - started, response.status
    except OSError:
        return time.monotonic() - started, 0
    finally:
        conn.close()


def hostile_round(port: int, key: str, duration: float, count: int = COUNT) -> dict[str, Any]:
    """One round: attackers and probes for `duration` s; latencies and failures."""
    attackers = _Attackers(port, count)
    held = len(attackers.kind)
    until = time.monotonic() + duration
    thread = threading.Thread(target=attackers.run, args=(until,), daemon=True)
    thread.start()
    latencies: list[float] = []
    by_path: dict[str, list[float]] = {"/knock": [], "/verify": []}
    failures = 0
    probes = 0
    try:
        while time.monotonic() < until:
            for method, path, want in (("POST", "/knock", 200), ("GET", "/verify", 200)):
                seconds, status = _probe(port, method, path, key if method == "POST" else "")
                probes += 1
                latencies.append(seconds)
                by_path[path].append(seconds)
                failures += status != want
            time.sleep(PROBE_EVERY)
    finally:
        thread.join(duration + 10)
        still_open = len(attackers.kind)
        attackers.close()
    latencies.sort()
    return {
        **{f"{path[1:]}_p99_ms": _p99(values) for path, values in by_path.items()},
        "probes": probes,
        "failures": failures,
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
        "p99_ms": _p99(latencies),
        "max_ms": round(1000 * latencies[-1], 2) if latencies else None,
        "hostile_open_at_start": held,
        "hostile_open_at_end": still_open,
        "hostile_reopened": attackers.reopened,
        "hostile_refused": attackers.refused,
    }


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ranked = sorted(values)
    return round(1000 * ranked[min(len(ranked) - 1, int(len(ranked) * 0.99))], 2)
