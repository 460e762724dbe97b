"""The protected service: a trivial HTTP server in a thread of the test process.

It answers every GET and HEAD with 200 and a marker body, and records what reached
it, so a test can show both that an allowed request got through and that a denied
one never did.
"""

from __future__ import annotations

import dataclasses
import http.server
import sys
import threading
from typing import Any

MARKER = b"knocker-e2e-protected-upstream"


@dataclasses.dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _answer(self) -> None:
        self.server.record(Seen(self.command, self.path, list(self.headers.items())))
        body = MARKER + b" " + self.path.encode("utf-8", "replace")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = _answer
    do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean; Seen records are the log


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Proxies drop idle keep-alive connections to the upstream at will; a reset
        # there is not a test failure and must not litter the output.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)


class Upstream:
    """Start with `with Upstream() as up:`; `up.address` is "127.0.0.1:PORT"."""

    def __init__(self) -> None:
        self._server = _Server()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        port = self._server.server_address[1]
        return f"127.0.0.1:{port}"

    def seen_paths(self) -> list[str]:
        return [s.path for s in self._server.seen()]

    def seen(self) -> list[Seen]:
        return self._server.seen()

    def __enter__(self) -> Upstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
