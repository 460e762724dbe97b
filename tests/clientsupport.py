"""Shared pieces of the client tests: the console script as a subprocess (run_cli, Watch),
small loopback HTTP stubs, and the Go client's event names."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.serverproc import KNOCKER, KnockerProcess, base_config

GO_CLI_EVENTS = {
    "ServiceState",
    "StatusSnapshot",
    "WhitelistApplied",
    "WhitelistExpired",
    "NextKnockUpdated",
    "KnockTriggered",
    "Error",
}
WRONG_KEY = "wrong-key-ZZZZ-0123456789-this-must-never-be-printed"


# ---------------------------------------------------------------------------------------
# helpers


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without Knocker settings or proxies, HOME set to `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("KNOCKER_") and "PROXY" not in k.upper()
    }
    env["HOME"] = str(home)
    env.update(extra)
    return env


def run_cli(
    args: list[str], home: Path, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KNOCKER, *args],
        env=client_env(home, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_secret_absent(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout
        assert secret not in result.stderr


def lenient_limits() -> dict[str, Any]:
    # Every test knocks from 127.0.0.1: the default budget would turn later tests into 429s.
    return {"knock_rate_limit": {"successful_requests": 0, "failed_requests": 0}}


Responder = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


class Stub:
    """A loopback HTTP server that records every request and answers via `respond`."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                with stub.lock:
                    stub.requests.append(
                        {
                            "time": time.monotonic(),
                            "method": self.command,
                            "path": self.path,
                            "headers": headers,
                            "body": body,
                        }
                    )
                status, extra, payload = stub.respond(self.command, self.path, headers, body)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def matching(self, method: str, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stubs() -> Iterator[Callable[[Responder], Stub]]:
    made: list[Stub] = []

    def make(respond: Responder) -> Stub:
        made.append(Stub(respond))
        return made[-1]

    yield make
    for stub in made:
        stub.close()


def grant_body(entry: str = "127.0.0.1", ttl: int = 3600) -> bytes:
    now = int(time.time())
    return json.dumps(
        {"whitelisted_entry": entry, "expires_at": now + ttl, "expires_in_seconds": ttl}
    ).encode()


JSON_HEADERS = {"Content-Type": "application/json"}


class Watch:
    """A `knocker watch` subprocess whose stdout lines are collected with arrival times."""

    def __init__(self, args: list[str], home: Path, **env: str) -> None:
        self.process = subprocess.Popen(
            [KNOCKER, "watch", *args],
            env=client_env(home, **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.stderr = ""
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first new line satisfying predicate (all lines are kept in self.lines)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching line within {timeout}s:\n" + self.dump())
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("watch exited early:\n" + self.dump())
            self.lines.append(line)
            if predicate(line):
                return line

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM it and collect the rest of its output; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(5)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def events(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.lines]

    def dump(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr ---\n" + self.stderr

    def output(self) -> str:
        return "\n".join(self.lines) + self.stderr


def is_event(name: str, **fields: str) -> Callable[[str], bool]:
    def match(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return record.get("KNOCKER_EVENT") == name and all(
            record.get(k) == v for k, v in fields.items()
        )

    return match


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnockerProcess]:
    directory = tmp_path_factory.mktemp("client-server")
    config = base_config(directory, security=lenient_limits())
    with KnockerProcess(directory, config) as process:
        yield process
