"""A real `knocker serve` process for black-box tests.

KnockerProcess writes knocker.yaml from a dict into its own directory, starts
`knocker serve --bind HOST:PORT` (optionally behind a command prefix such as
`ip netns exec NS`), waits for /health, and stops only the process group it started,
by PID. Everything it talks to is on loopback unless the caller's prefix says otherwise.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from knocker.store.formats import decode_journal
from knocker.whitelist import entry_text
from tests.support.config import ADMIN_KEY, TEST_KEY, base_config
from tests.support.net import free_port
from tests.support.polling import wait_until

KNOCKER = str(Path(sys.executable).with_name("knocker"))

# Re-exported: other harnesses and tests import these from here.
__all__ = ["ADMIN_KEY", "KNOCKER", "TEST_KEY", "KnockerProcess", "base_config", "free_port"]


class KnockerProcess:
    def __init__(
        self,
        directory: Path,
        config: dict[str, Any] | None = None,
        *,
        workers: int = 1,
        threads: int = 4,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.config = config if config is not None else base_config(directory)
        self.config_path = directory / "knocker.yaml"
        self.write_config(self.config)
        self.host = host
        self.port = port or free_port(host)
        self.workers = workers
        self.threads = threads
        self.prefix = prefix or []
        self.env = env or {}
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "knocker.log"

    # ------------------------------------------------------------------ config
    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def storage_path(self) -> Path:
        return Path(self.config["whitelist"]["storage_path"])

    def whitelist_file(self) -> dict[str, int]:
        """The whitelist as a restart would load it: whitelist.json, which follows the
        journal about a second behind, with the journal's records applied on top."""
        data: dict[str, int] = json.loads(self.storage_path.read_text())
        journal = Path(f"{self.storage_path}.journal")
        if journal.exists():
            for key, expiry in decode_journal(journal.read_bytes()).records:
                if expiry < 0:
                    data.pop(entry_text(key), None)
                else:
                    data[entry_text(key)] = max(expiry, data.get(entry_text(key), 0))
        return data

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ process
    def command(self) -> list[str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [
            *self.prefix,
            KNOCKER,
            "serve",
            "--bind",
            f"{host}:{self.port}",
            "--workers",
            str(self.workers),
            "--threads",
            str(self.threads),
            *self.extra_args,
        ]

    def start(self, wait: bool = True, timeout: float = 20.0) -> KnockerProcess:
        env = {**os.environ, "KNOCKER_CONFIG_PATH": str(self.config_path), **self.env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.directory,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        if wait:
            try:
                self.wait_healthy(timeout)
            except BaseException:
                self.kill9()  # never leave a half-started server behind
                raise
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        def healthy() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"knocker exited with {self.process.returncode}:\n" + self.log())
            try:
                return self.request("GET", "/health")[0] == 200
            except OSError:
                return False

        try:
            wait_until(healthy, timeout, interval=0.05, what="/health")
        except AssertionError:
            raise RuntimeError("knocker did not become healthy:\n" + self.log()) from None

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM our process (the gunicorn master), wait; SIGKILL the group if stuck."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def kill9(self) -> None:
        """SIGKILL the whole process tree we started (master and workers): a crash."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # our own session: start_new_session
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def restart(self) -> KnockerProcess:
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> KnockerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                pass

    # ------------------------------------------------------------------ HTTP
    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        source: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection (optionally from a loopback source address)."""
        conn = http.client.HTTPConnection(
            self.host, self.port, timeout=timeout, source_address=(source, 0) if source else None
        )
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def knock(
        self, key: str = TEST_KEY, body: dict[str, Any] | None = None, source: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"X-Api-Key": key}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        status, _, raw = self.request("POST", "/knock", headers, data, source)
        return status, json.loads(raw) if raw else {}

    def verify(self, source: str | None = None, headers: dict[str, str] | None = None) -> int:
        return self.request("GET", "/verify", headers, source=source)[0]
