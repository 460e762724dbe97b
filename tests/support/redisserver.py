"""A real redis-server (Debian's package) for tests: its own temp directory, loopback port
or unix socket, AOF on with `appendfsync always`, started and stopped by PID.

Nothing is shared with a system Redis: no config file is read, persistence goes to the
test's directory, and only the process this class started is ever signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from tests.support.net import free_port
from tests.support.polling import wait_until
from tests.support.resources import require

ENGINES = ("redis", "valkey")  # the servers the redis backend is tested against
# Valkey 8 from Debian 13, run by its own loader (tests/tools/fetch-valkey.sh): bookworm
# has no valkey package.
FETCHED_VALKEY = (
    Path(os.environ.get("KNOCKER_FWLAB_CACHE", "/var/cache/knocker-tests"))
    / "valkey-trixie/bin/valkey-server"
)


def redis_server_binary() -> str | None:
    return server_binary("redis")


def server_binary(engine: str) -> str | None:
    """redis-server (Debian's package) or valkey-server (on PATH, else the fetched one)."""
    if engine == "redis":
        return shutil.which("redis-server")
    if engine == "valkey":
        found = shutil.which("valkey-server")
        if found is None and os.access(FETCHED_VALKEY, os.X_OK):
            found = str(FETCHED_VALKEY)
        return found
    raise ValueError(f"unknown engine {engine!r}")


class RedisServer:
    def __init__(
        self,
        directory: Path,
        *,
        unix: bool = False,
        appendfsync: str = "always",
        tls: Path | None = None,
        engine: str = "redis",
    ) -> None:
        self.engine = engine
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = 0 if unix else free_port("127.0.0.1")
        self.socket_path = directory / "redis.sock" if unix else None
        self.appendfsync = appendfsync
        self.tls = tls  # a directory holding ca.crt, server.crt, server.key: TLS only
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0"
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = server_binary(self.engine)
        require(binary, f"{self.engine}-server")
        assert binary is not None
        args = [
            binary,
            "--bind",
            "127.0.0.1",
            *self.port_args(),
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.socket_path is not None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return args

    def port_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.tls / "server.crt"),
            "--tls-key-file",
            str(self.tls / "server.key"),
            "--tls-ca-cert-file",
            str(self.tls / "ca.crt"),
            "--tls-auth-clients",
            "no",
        ]

    def client(self) -> redis.Redis:
        tls = {"ssl_ca_certs": str(self.tls / "ca.crt")} if self.tls is not None else {}
        return redis.Redis.from_url(self.url, socket_timeout=5, decode_responses=True, **tls)

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, (
                f"redis-server exited; see {self.directory / 'redis.log'}"
            )
            try:
                with self.client() as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, 10, interval=0.05, what="redis-server to answer PING")
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        """kill -9: no shutdown, no final fsync."""
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # a paused server cannot exit
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


def make_tls_files(directory: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl), in `directory`."""
    openssl = shutil.which("openssl")
    require(openssl, "openssl")
    assert openssl is not None
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=knocker test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-out",
        "server.crt",
    )
    return directory


def wait_down(server: RedisServer, timeout: float = 10.0) -> None:
    """Until the server's process has exited (after SIGTERM)."""
    deadline = time.monotonic() + timeout
    while server.process is not None and server.process.poll() is None:
        assert time.monotonic() < deadline, "redis-server did not exit"
        time.sleep(0.05)
    server.process = None


SYNCHRONISED = "whitelist replica synchronised with redis"


def wait_followers(process: Any, timeout: float = 15) -> None:
    """Wait until every worker of a started `knocker serve` (tests.serverproc.KnockerProcess)
    with the redis backend has synchronised its own replica (each logs it once). /ready
    cannot tell: a request reaches whichever worker accepts it first."""
    wait_until(
        lambda: process.log().count(SYNCHRONISED) >= process.workers,
        timeout,
        interval=0.05,
        what=f"{process.workers} worker(s) synchronised with redis",
    )


@contextmanager
def serving(directory: Path, **options: Any) -> Iterator[RedisServer]:
    """A started RedisServer(directory, **options), stopped at the end."""
    server = RedisServer(directory, **options).start()
    try:
        yield server
    finally:
        server.stop()
