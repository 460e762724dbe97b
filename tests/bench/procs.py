"""Processes the benchmark starts on loopback: the bare-WSGI floor under gunicorn, nginx
and Caddy. Each runs in its own session from its own temporary directory and is stopped
by the PID this module started (the process group as a last resort): never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Debian puts nginx in /usr/sbin, which a non-root PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def free_port() -> int:
    """A TCP port no socket uses on any address (a wildcard bind), so that neither a
    server bound to 127.0.0.1 nor one bound to every address collides with the source
    port of a load generator's connection from another loopback address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args!r} exited with {process.returncode}:\n"
                + log.read_text(errors="replace")[-4000:]
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n"
                    + log.read_text(errors="replace")[-4000:]
                ) from None
            time.sleep(0.02)


class Proc:
    """One foreground server process; `ports` are waited for after the start."""

    def __init__(
        self,
        name: str,
        command: list[str],
        workdir: Path,
        ports: list[int],
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.workdir = workdir
        self.ports = ports
        self.env = {**os.environ, **(env or {})}
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> Proc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for port in self.ports:
            wait_port(port, self.process, self.log_path, timeout)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Our own session (start_new_session): the group id is the PID we started.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def floor_server(
    workdir: Path, port: int, workers: int, threads: int, worker_class: str = "gthread"
) -> Proc:
    """tests.bench.floor:app under gunicorn with the options `knocker serve` uses for
    `worker_class` (gthread, or gevent: Knocker's own worker, deadlines included)."""
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    repo = Path(__file__).resolve().parents[2]
    if worker_class == "gevent":
        model = [
            "--worker-class",
            "knocker.worker.KnockerWorker",
            "--worker-connections",
            "1000",
            "--keep-alive",
            "10",
        ]
    else:
        model = [
            "--threads",
            str(threads),
            "--worker-class",
            "gthread" if threads > 1 else "sync",
            "--keep-alive",
            "30",
        ]
    return Proc(
        f"floor-{worker_class}",
        [
            gunicorn,
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            *model,
            # As `knocker serve` does: no control socket (gunicorn >= 25.1 opens one at a
            # per-user path by default, taking over another server's).
            "--no-control-socket",
            "--log-level",
            "warning",
            "--chdir",
            str(repo),
            "tests.bench.floor:app",
        ],
        workdir,
        [port],
    )


def nginx_server(workdir: Path, ports: list[int]) -> Proc:
    """nginx answering `return 200` on every port (the upstream and the auth floor)."""
    exe = which("nginx")
    assert exe is not None
    servers = "".join(
        f"    server {{ listen 127.0.0.1:{port}; location / {{ return 200; }} }}\n"
        for port in ports
    )
    temp = "".join(
        f"    {kind}_temp_path {workdir}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "nginx.conf"
    config.write_text(
        "daemon off;\nmaster_process on;\nworker_processes 1;\n"
        f"pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n    access_log off;\n    keepalive_requests 1000000;\n"
        f"{temp}{servers}}}\n"
    )
    # -e: nginx opens its error log before reading the config; keep it out of /var/log.
    return Proc(
        "nginx",
        [exe, "-e", str(workdir / "error.log"), "-p", f"{workdir}/", "-c", str(config)],
        workdir,
        ports,
    )


def caddy_server(
    workdir: Path,
    sites: dict[int, int],
    upstream: int | None,
    respond_ports: list[int] | None = None,
) -> Proc:
    """Caddy with one site per port: forward_auth to sites[port]'s /verify, then the
    upstream (nginx `return 200`), or a `respond 200` when there is no nginx; plus a bare
    `respond 200` site on each of respond_ports (an auth floor without nginx).

    127.0.0.1 is a trusted proxy for forward_auth, so the X-Forwarded-For that wrk sends
    reaches the auth service with 127.0.0.1 appended, as a second proxy in a chain would.
    """
    exe = which("caddy")
    assert exe is not None
    then = f"reverse_proxy 127.0.0.1:{upstream}" if upstream is not None else "respond 200"
    blocks = []
    for port, auth in sites.items():
        # Caddy 2.6 has no server-wide trusted_proxies yet; this reverse_proxy option
        # (Caddy 2.5+) makes forward_auth keep the X-Forwarded-For it received.
        blocks.append(f"""http://127.0.0.1:{port} {{
    bind 127.0.0.1
    forward_auth 127.0.0.1:{auth} {{
        uri /verify
        trusted_proxies 127.0.0.1/32
    }}
    {then}
}}
""")
    blocks += [
        f"http://127.0.0.1:{port} {{\n    bind 127.0.0.1\n    respond 200\n}}\n"
        for port in respond_ports or []
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "Caddyfile"
    config.write_text("{\n    admin off\n    auto_https off\n}\n" + "".join(blocks))
    # Caddy keeps its state under $HOME and $XDG_*: keep it in our directory.
    env = {
        "HOME": str(workdir),
        "XDG_DATA_HOME": str(workdir / "data"),
        "XDG_CONFIG_HOME": str(workdir / "config"),
    }
    return Proc(
        "caddy",
        [exe, "run", "--adapter", "caddyfile", "--config", str(config)],
        workdir,
        [*sites, *(respond_ports or [])],
        env,
    )
