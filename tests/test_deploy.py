"""Deployment paths: Containerfile, deploy/compose.yaml, the systemd units, release artifacts.

No container engine and no service manager run here, so each file is checked against the
project (its paths, console script, routes) and every command it would run is run for
real: the Containerfile's RUN steps in a fresh virtualenv, the image's CMD and HEALTHCHECK
and the unit's ExecStart/ExecReload in a network namespace of their own (so the fixed
port 8000 they use is free and nothing listens on the machine's interfaces), and
systemd-analyze on the unit files.
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.polling import wait_until
from tests.support.resources import require

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CONTAINERFILE = REPO / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
CONTAINER_CONFIG = DEPLOY / "knocker.container.yaml"
CADDYFILE = DEPLOY / "caddy" / "Caddyfile"
UNIT = DEPLOY / "systemd" / "knocker.service"
DROP_IN = DEPLOY / "systemd" / "knocker-firewalld.conf"
# The console script of the environment running the tests (the repo's venv in `make test`).
REPO_KNOCKER = Path(sys.executable).with_name("knocker")

KEY = "deploy-test-key-0123456789abcdefghijklmnopqrstuvwxyz"
SECOND_KEY = "deploy-second-key-0123456789abcdefghijklmnopqrstuvwxyz"
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "*.egg-info",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "test-artifacts",
    "bench-results",
    "node_modules",
)


def require_netns() -> None:
    require(os.geteuid() == 0, "root (for network namespaces)")
    for tool in ("unshare", "nsenter", "ip"):
        require(shutil.which(tool), tool)


# --------------------------------------------------------------------------- Containerfile


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def parse_containerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (Dockerfile rules:
    a comment line inside a continuation is removed, not a terminator)."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword.upper(), args.strip()))
        pending = ""
    return instructions


def split_flags(args: str) -> tuple[dict[str, str], str]:
    """`--from=build --chown=1 a b` -> ({"from": "build", "chown": "1"}, "a b")."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        name, _, value = token[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


def env_pairs(args: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(args))


@pytest.fixture(scope="module")
def containerfile() -> list[Instruction]:
    return parse_containerfile(CONTAINERFILE.read_text())


def only(
    instructions: list[Instruction], keyword: str, stage: int | None = None
) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword and (stage is None or i.stage == stage)]


def final_stage(instructions: list[Instruction]) -> int:
    return max(i.stage for i in instructions)


def image_paths(instructions: list[Instruction]) -> dict[str, str]:
    """The image-side paths the tests remap: wheel dir, venv, config dir, state volume."""
    runs = " ".join(i.args for i in only(instructions, "RUN"))
    wheel_dir = re.search(r"--wheel-dir\s+(\S+)", runs)
    venv = re.search(r"-m venv\s+(\S+)", runs)
    assert wheel_dir and venv, "stage 1 must `pip wheel --wheel-dir`, stage 2 `python -m venv`"
    env = env_pairs(" ".join(i.args for i in only(instructions, "ENV")))
    volumes = [v for i in only(instructions, "VOLUME") for v in shlex.split(i.args)]
    return {
        "wheels": wheel_dir.group(1),
        "venv": venv.group(1),
        "config": env["KNOCKER_CONFIG_PATH"],
        "data": volumes[0],
    }


def healthcheck_argv(instructions: list[Instruction]) -> list[str]:
    (check,) = only(instructions, "HEALTHCHECK")
    _, command = split_flags(check.args)
    assert command.startswith("CMD ["), "HEALTHCHECK should use the exec form"
    argv: list[str] = json.loads(command[len("CMD ") :])
    return argv


def exposed_port(instructions: list[Instruction]) -> int:
    (expose,) = only(instructions, "EXPOSE")
    return int(expose.args.split("/")[0])


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines)


def test_containerfile_builds_in_two_stages_on_python_311_slim(containerfile):
    """Both stages start from the official python:3.11-slim image; the first is named."""
    froms = only(containerfile, "FROM")
    assert [shlex.split(f.args)[0] for f in froms] == ["python:3.11-slim"] * 2
    assert re.fullmatch(r"\S+\s+AS\s+\w+", froms[0].args, re.IGNORECASE)


def test_containerfile_copies_only_files_the_repo_has(containerfile):
    """Every COPY source exists, and they include every file the package build reads."""
    sources = []
    for copy in only(containerfile, "COPY"):
        flags, rest = split_flags(copy.args)
        if "from" in flags:
            continue
        sources += shlex.split(rest)[:-1]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    metadata = configparser.ConfigParser()
    metadata.read(REPO / "setup.cfg")
    read_by_build = {"pyproject.toml", "setup.cfg", "knocker"} | {
        value.split(":", 1)[1].strip()
        for value in metadata["metadata"].values()
        if value.startswith("file:")
    }
    assert read_by_build <= {s.rstrip("/").removeprefix("./") for s in sources}


def test_containerfile_command_is_the_knocker_console_script(containerfile):
    """CMD runs `knocker serve`, a console script of the package, on the exposed port."""
    from knocker.cli import DEFAULT_BIND, build_parser

    (cmd,) = only(containerfile, "CMD")
    argv = json.loads(cmd.args)
    assert argv == ["knocker", "serve"]
    assert console_scripts()["knocker"] == "knocker.cli:main"
    assert build_parser().parse_args(argv[1:]).command == "serve"
    assert f"0.0.0.0:{exposed_port(containerfile)}" == DEFAULT_BIND


def test_containerfile_healthcheck_probes_a_route_that_answers_200(
    containerfile, tmp_path, monkeypatch
):
    """The HEALTHCHECK is python urllib (no curl) against a path the app serves with 200."""
    from webtest import TestApp

    from knocker.app import create_app

    argv = healthcheck_argv(containerfile)
    assert argv[:2] == ["python", "-c"] and "urllib.request" in argv[2]
    url = urllib.parse.urlsplit(re.search(r"http://[^'\"]+", argv[2]).group(0))
    assert (url.hostname, url.port) == ("127.0.0.1", exposed_port(containerfile))
    config = tmp_path / "knocker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "api_keys": [{"name": "k", "key": KEY, "max_ttl": 60}],
                "whitelist": {"storage_path": str(tmp_path / "whitelist.json")},
            }
        )
    )
    monkeypatch.setenv("KNOCKER_CONFIG_PATH", str(config))  # as the image's ENV does
    app = create_app()
    try:
        response = TestApp(app).get(url.path)
    finally:
        app.close()
    assert response.status_int == 200
    assert response.json == {"status": "ok"}


def test_containerfile_runs_as_uid_1001_with_data_volume(containerfile):
    """Non-root 1001 (the upstream image's uid) owns /data; config path and port are set."""
    last = final_stage(containerfile)
    (user,) = only(containerfile, "USER", last)
    assert user.args.split(":")[0] == "1001"
    assert [v for i in only(containerfile, "VOLUME") for v in shlex.split(i.args)] == ["/data"]
    assert exposed_port(containerfile) == 8000
    env = env_pairs(" ".join(i.args for i in only(containerfile, "ENV", last)))
    assert env["KNOCKER_CONFIG_PATH"] == "/app/knocker.yaml"
    runs = " ".join(i.args for i in only(containerfile, "RUN", last))
    assert re.search(r"useradd .*--uid 1001", runs)
    assert "chown 1001:1001 /data" in runs


@pytest.fixture(scope="module")
def image_root(containerfile, tmp_path_factory) -> Path:
    """Replays the Containerfile's build: stage 1's RUN in a directory holding only what
    stage 1 COPYs, stage 2's install RUN into a fresh venv; image paths live under root."""
    root = tmp_path_factory.mktemp("image")
    paths = image_paths(containerfile)
    remap = {path: str(root / path.lstrip("/")) for path in paths.values()}
    # `pip` and `python` as in the image, backed by the interpreter running the tests.
    tools = root / "tools"
    tools.mkdir()
    for name, command in {"python": [sys.executable], "pip": [sys.executable, "-m", "pip"]}.items():
        (tools / name).write_text("#!/bin/sh\nexec " + shlex.join(command) + ' "$@"\n')
        (tools / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)

    def run_stage(stage: int, workdir: Path) -> None:
        for run in only(containerfile, "RUN", stage):
            flags, command = split_flags(run.args)
            if "pip" not in command:
                continue  # user creation: checked statically, needs a real image
            for image_path, local in sorted(remap.items(), key=lambda kv: -len(kv[0])):
                command = command.replace(image_path, local)
            if "mount" in flags:
                mount = dict(part.split("=", 1) for part in flags["mount"].split(","))
                assert mount["source"] == paths["wheels"] == mount["target"]
            result = subprocess.run(
                ["sh", "-ec", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"

    src = root / "src"  # stage 1's WORKDIR: only what it COPYs
    src.mkdir()
    for copy in only(containerfile, "COPY", 0):
        *sources, destination = shlex.split(split_flags(copy.args)[1])
        into_directory = destination.endswith("/") or len(sources) > 1
        for source in sources:
            if (REPO / source).is_dir():  # a directory's contents go to the destination
                shutil.copytree(REPO / source, src / destination, ignore=COPY_IGNORE)
            else:
                target = (
                    src / destination / Path(source).name if into_directory else src / destination
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / source, target)
    run_stage(0, src)
    assert any(Path(remap[paths["wheels"]]).glob("knocker-*.whl"))
    run_stage(final_stage(containerfile), root)
    Path(remap[paths["data"]]).mkdir(parents=True)
    Path(remap[paths["config"]]).parent.mkdir(parents=True)
    return root


def image_env(containerfile: list[Instruction], root: Path) -> dict[str, str]:
    """The image's ENV with its paths moved under `root`."""
    paths = image_paths(containerfile)
    last = final_stage(containerfile)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    for name, value in env_pairs(
        " ".join(i.args for i in only(containerfile, "ENV", last))
    ).items():
        for path in sorted(paths.values(), key=len, reverse=True):
            value = value.replace(path, str(root / path.lstrip("/")))
        env[name] = value.replace("$PATH", os.environ["PATH"])
    return env


def container_config(root: Path | None = None, data_dir: str = "/data") -> str:
    """deploy/knocker.container.yaml with real keys (and its /data moved under root)."""
    text = CONTAINER_CONFIG.read_text()
    text = text.replace("REPLACE_WITH_A_GENERATED_KEY_2", SECOND_KEY)
    text = text.replace("REPLACE_WITH_A_GENERATED_KEY", KEY)
    if root is not None:
        text = text.replace(f"{data_dir}/", f"{root}{data_dir}/")
    return text


def installed_knocker_runs(root: Path, venv: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / venv.lstrip("/") / "bin" / "knocker"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )


@pytest.mark.server
def test_wheel_installed_as_the_image_does_gives_a_working_knocker(containerfile, image_root):
    """The venv built by the Containerfile's steps holds the wheel (with its web assets) and
    its `knocker` generates keys and validates configs."""
    venv = image_paths(containerfile)["venv"]
    python = image_root / venv.lstrip("/") / "bin" / "python"
    where = subprocess.run(
        [str(python), "-c", "import knocker; print(knocker.__file__)"],
        capture_output=True,
        text=True,
        cwd=image_root,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    package = Path(where.stdout.strip()).parent
    assert package.is_relative_to(image_root), "knocker was imported from outside the venv"
    for asset in (REPO / "knocker" / "web").rglob("*"):
        if asset.is_file():
            assert (package / asset.relative_to(REPO / "knocker")).is_file(), asset.name

    key = installed_knocker_runs(image_root, venv, "gen-key")
    assert key.returncode == 0 and re.fullmatch(r"[A-Za-z0-9_-]{43,}\n", key.stdout)
    good = image_root / "good.yaml"
    good.write_text(container_config(image_root))
    assert installed_knocker_runs(image_root, venv, "check-config", str(good)).returncode == 0
    shipped = image_root / "shipped.yaml"
    shipped.write_text(CONTAINER_CONFIG.read_text())
    refused = installed_knocker_runs(image_root, venv, "check-config", str(shipped))
    assert refused.returncode == 1 and "api_keys[0].key" in refused.stderr


# ------------------------------------------------------------- processes in a network namespace


class Netns:
    """A command started as PID 1-of-its-network: `unshare --net`, loopback up, exec'd so
    that its PID is the command's (the gunicorn master). Probes join with nsenter."""

    def __init__(
        self, argv: list[str], *, cwd: Path, env: dict[str, str], log: Path, umask: int = -1
    ) -> None:
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                ["unshare", "--net", "sh", "-ec", 'ip link set lo up; exec "$@"', "sh", *argv],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                umask=umask,
            )
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def run(
        self, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--net=/proc/{self.pid}/ns/net", *argv],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )

    def http(self, method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        script = (
            "import json, sys, urllib.request, urllib.error\n"
            "method, url, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
            "request = urllib.request.Request(url, method=method, headers=headers)\n"
            "try:\n"
            "    response = urllib.request.urlopen(request, timeout=10)\n"
            "except urllib.error.HTTPError as error:\n"
            "    response = error\n"
            "body = response.read().decode()\n"
            "print(json.dumps([response.status, json.loads(body) if body else None]))\n"
        )
        result = self.run([sys.executable, "-c", script, method, url, json.dumps(headers or {})])
        assert result.returncode == 0, result.stderr + self.output()
        status, body = json.loads(result.stdout)
        return status, body

    def wait_until(self, probe: Any, what: str, timeout: float = 30.0) -> None:
        def alive_and_done() -> bool:
            assert self.process.poll() is None, (
                f"exited {self.process.returncode}\n" + self.output()
            )
            return bool(probe())

        try:
            wait_until(alive_and_done, timeout, interval=0.2, what=what)
        except AssertionError as error:
            pytest.fail(f"{error}\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # our own session only
            self.process.wait(10)


@pytest.fixture
def netns_processes() -> Iterator[list[Netns]]:
    started: list[Netns] = []
    yield started
    for proc in started:
        proc.kill()


@pytest.mark.server
def test_image_command_and_healthcheck_serve_as_in_a_container(
    containerfile, image_root, netns_processes
):
    """CMD as written (default bind 0.0.0.0:8000), the image's ENV and WORKDIR: the
    HEALTHCHECK passes, a knock lands in /data, and SIGTERM (docker stop) exits 0."""
    require_netns()
    paths = image_paths(containerfile)
    config = Path(image_env(containerfile, image_root)["KNOCKER_CONFIG_PATH"])
    config.write_text(container_config(image_root, paths["data"]))
    data = image_root / paths["data"].lstrip("/")
    (workdir,) = only(containerfile, "WORKDIR", final_stage(containerfile))
    assert workdir.args == paths["data"]
    env = image_env(containerfile, image_root)
    server = Netns(
        json.loads(only(containerfile, "CMD")[0].args),
        cwd=data,
        env=env,
        log=image_root / "cmd.log",
    )
    netns_processes.append(server)
    healthcheck = healthcheck_argv(containerfile)
    server.wait_until(lambda: server.run(healthcheck, env=env).returncode == 0, "HEALTHCHECK")
    assert server.http("GET", "http://127.0.0.1:8000/health") == (200, {"status": "ok"})
    status, body = server.http("POST", "http://127.0.0.1:8000/knock", {"X-Api-Key": KEY})
    assert (status, body["whitelisted_entry"]) == (200, "127.0.0.1")
    assert server.terminate(timeout=30) == 0  # SIGTERM leaves whitelist.json current
    assert "127.0.0.1" in json.loads((data / "whitelist.json").read_text())


@pytest.mark.server
def test_healthcheck_reports_unhealthy_when_nothing_answers(containerfile):
    """With no server, the HEALTHCHECK command exits 1 (unhealthy), not 0 or 2."""
    require_netns()
    python_first = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["unshare", "--net", *healthcheck_argv(containerfile)],
        capture_output=True,
        text=True,
        timeout=30,
        env=python_first,
    )
    assert result.returncode == 1, result.stderr


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts.append((source, target))
    return mounts


def test_compose_mounts_files_that_deploy_has(compose):
    """Every host path compose mounts exists under deploy/; knocker.yaml is the user's
    copy of knocker.container.yaml, and named volumes are declared."""
    for name, service in compose["services"].items():
        for source, _ in bind_mounts(service):
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                if path == DEPLOY / "knocker.yaml":
                    assert CONTAINER_CONFIG.is_file()
                    continue
                assert path.exists(), f"{name} mounts {source}, missing from deploy/"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} undeclared"
    assert ("./caddy/Caddyfile", "/etc/caddy/Caddyfile") in bind_mounts(
        compose["services"]["caddy"]
    )


def test_compose_knocker_service_uses_the_image_paths(compose, containerfile):
    """compose builds this Containerfile and mounts knocker.yaml and the data volume where
    the image expects them (the upstream image's paths)."""
    knocker = compose["services"]["knocker"]
    assert (DEPLOY / knocker["build"]["context"]).resolve() == REPO
    assert knocker["build"]["dockerfile"] == CONTAINERFILE.name
    paths = image_paths(containerfile)
    targets = dict((t, s) for s, t in bind_mounts(knocker))
    assert targets[paths["config"]] == "./knocker.yaml"
    assert targets[paths["data"]] in compose["volumes"]
    assert yaml.safe_load(container_config())["whitelist"]["storage_path"].startswith(
        paths["data"] + "/"
    )


def test_compose_network_is_dual_stack_and_trusts_only_caddy(compose):
    """The network has one IPv4 and one IPv6 subnet; the fixed service addresses lie in
    them, and knocker.container.yaml trusts exactly Caddy's two addresses."""
    (network_name,) = compose["networks"]
    network = compose["networks"][network_name]
    assert network["enable_ipv6"] is True
    subnets = [ipaddress.ip_network(c["subnet"]) for c in network["ipam"]["config"]]
    assert sorted(s.version for s in subnets) == [4, 6]
    caddy_addresses = set()
    for name, service in compose["services"].items():
        attachment = service["networks"][network_name]
        for key in ("ipv4_address", "ipv6_address"):
            address = ipaddress.ip_address(attachment[key])
            assert any(address in subnet for subnet in subnets), f"{name} {key}"
            if name == "caddy":
                caddy_addresses.add(address)
    trusted = yaml.safe_load(container_config())["server"]["trusted_proxies"]
    assert {ipaddress.ip_address(t) for t in trusted} == caddy_addresses


def test_compose_healthcheck_is_the_image_healthcheck(compose, containerfile):
    """compose repeats the image's HEALTHCHECK (Podman's OCI images drop it) word for word,
    so Caddy's wait for a healthy Knocker works with either engine."""
    (check,) = only(containerfile, "HEALTHCHECK")
    flags, _ = split_flags(check.args)
    healthcheck = compose["services"]["knocker"]["healthcheck"]
    assert healthcheck["test"] == ["CMD", *healthcheck_argv(containerfile)]
    for flag in ("interval", "timeout", "start-period", "retries"):
        assert str(healthcheck[flag.replace("-", "_")]) == flags[flag], flag
    assert compose["services"]["caddy"]["depends_on"]["knocker"] == {"condition": "service_healthy"}


def test_container_example_config_is_valid_once_keys_are_set():
    """deploy/knocker.container.yaml passes validation with real keys, and is refused as
    shipped (placeholder keys)."""
    from knocker.config import load_config_text
    from knocker.errors import ConfigError

    config = load_config_text(container_config())
    assert config.whitelist.storage_path == "/data/whitelist.json"
    with pytest.raises(ConfigError, match=r"api_keys\[0\]\.key"):
        load_config_text(CONTAINER_CONFIG.read_text())


def caddy_placeholders(text: str, env: dict[str, str]) -> str:
    """Caddy's parse-time {$VAR} / {$VAR:default} substitution."""

    def value(match: re.Match[str]) -> str:
        return env.get(match.group(1), match.group(2) or "")

    return re.sub(r"\{\$([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}", value, text)


def test_compose_points_caddy_at_the_knocker_service(compose, containerfile):
    """With compose's environment, the shared Caddyfile asks knocker:8000 for /verify and
    proxies the knock site there (127.0.0.1 would be Caddy's own container)."""
    env = {k: str(v) for k, v in compose["services"]["caddy"].get("environment", {}).items()}
    text = caddy_placeholders(CADDYFILE.read_text(), env)
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    upstream = f"knocker:{exposed_port(containerfile)}"
    assert re.findall(r"forward_auth\s+(\S+)", code) == [upstream]
    assert upstream in re.findall(r"reverse_proxy\s+(\S+)", code)
    assert ":8000" not in code.replace(upstream, "")


@pytest.mark.server
def test_compose_bind_serves_ipv4_and_ipv6_and_passes_the_healthcheck(
    compose, containerfile, image_root, netns_processes
):
    """compose's `--bind [::]:8000` answers on ::1 and on 127.0.0.1 (the HEALTHCHECK), and
    an IPv4 client arriving as ::ffff:127.0.0.1 is whitelisted as 127.0.0.1."""
    require_netns()
    paths = image_paths(containerfile)
    env = image_env(containerfile, image_root)
    Path(env["KNOCKER_CONFIG_PATH"]).write_text(container_config(image_root, paths["data"]))
    data = image_root / paths["data"].lstrip("/")
    server = Netns(
        compose["services"]["knocker"]["command"], cwd=data, env=env, log=image_root / "compose.log"
    )
    netns_processes.append(server)
    healthcheck = healthcheck_argv(containerfile)
    server.wait_until(lambda: server.run(healthcheck, env=env).returncode == 0, "HEALTHCHECK")
    assert server.http("GET", "http://[::1]:8000/health") == (200, {"status": "ok"})
    status, body = server.http("POST", "http://127.0.0.1:8000/knock", {"X-Api-Key": KEY})
    assert (status, body["whitelisted_entry"]) == (200, "127.0.0.1")
    assert server.terminate(timeout=30) == 0


# --------------------------------------------------------------------------- systemd


def unit_directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys kept, as systemd does."""
    directives, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.append((section, key.strip(), value.strip()))
    return directives


def service_values(path: Path, key: str) -> list[str]:
    return [v for s, k, v in unit_directives(path) if s == "Service" and k == key]


def test_systemd_unit_runs_the_venv_knocker_with_its_state_directory():
    """ExecStart is the documented venv's `knocker serve --config /etc/knocker/knocker.yaml`,
    state stays in StateDirectory (where the documented storage_path points), reload is
    SIGHUP and the issue's hardening is on."""
    (exec_start,) = service_values(UNIT, "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[:2] == ["/opt/knocker/venv/bin/knocker", "serve"]
    assert argv[argv.index("--config") + 1] == "/etc/knocker/knocker.yaml"
    assert service_values(UNIT, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    (state,) = service_values(UNIT, "StateDirectory")
    assert service_values(UNIT, "WorkingDirectory") == [f"/var/lib/{state}"]
    assert f"storage_path: /var/lib/{state}/whitelist.json" in UNIT.read_text()
    required = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
        "Restart": "on-failure",
    }
    for key, value in required.items():
        assert value in service_values(UNIT, key), f"{key}={value}"


@pytest.fixture
def systemd_root(tmp_path) -> Path:
    """A root for `systemd-analyze --root`: the host's unit library (for sysinit.target and
    friends), our unit, and the programs its Exec lines name at their written paths."""
    require(shutil.which("systemd-analyze"), "systemd-analyze (Debian package systemd)")
    root = tmp_path / "root"
    library = next(
        p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()
    )
    shutil.copytree(library, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy2(UNIT, root / "etc/systemd/system/knocker.service")
    for key in ("ExecStart", "ExecReload"):
        for line in service_values(UNIT, key):
            program = Path(shlex.split(line)[0].lstrip("-@:+!"))
            real = (
                REPO_KNOCKER
                if program.name == "knocker"
                else Path(shutil.which(program.name) or program)
            )
            require(real.is_file(), str(real))
            target = root / program.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real, target)
    return root


def systemd_analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", f"--root={root}", *args], capture_output=True, text=True, timeout=120
    )


def our_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "knocker" in line]


def add_drop_in(root: Path) -> None:
    drop_ins = root / "etc/systemd/system/knocker.service.d"
    drop_ins.mkdir()
    shutil.copy2(DROP_IN, drop_ins / "firewalld.conf")


def test_systemd_units_pass_systemd_analyze_verify(systemd_root):
    """`systemd-analyze verify` accepts knocker.service alone and with the firewalld drop-in,
    without a single warning (unknown keys and bad values are only warnings to systemd)."""
    for with_drop_in in (False, True):
        if with_drop_in:
            add_drop_in(systemd_root)
        result = systemd_analyze(systemd_root, "verify", "knocker.service")
        assert result.returncode == 0, result.stderr
        assert our_messages(result.stderr) == [], result.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(systemd_root):
    """The verify harness above can fail: a misspelt key and a missing program are reported."""
    unit = systemd_root / "etc/systemd/system/knocker.service"
    unit.write_text(unit.read_text().replace("ProtectHome=", "ProtectHomme="))
    (systemd_root / "opt/knocker/venv/bin/knocker").unlink()
    result = systemd_analyze(systemd_root, "verify", "knocker.service")
    assert result.returncode != 0
    messages = "\n".join(our_messages(result.stderr))
    assert "ProtectHomme" in messages and "/opt/knocker/venv/bin/knocker" in messages


def test_systemd_unit_exposure_is_rated_ok(systemd_root):
    """`systemd-analyze security` rates the unit's exposure at most 2.0 ("OK"), with the
    firewalld drop-in too."""
    for with_drop_in in (False, True):
        if with_drop_in:
            add_drop_in(systemd_root)
        result = systemd_analyze(
            systemd_root, "security", "--offline=true", "--threshold=20", "knocker.service"
        )
        level = re.search(r"Overall exposure level for knocker.service: ([0-9.]+)", result.stdout)
        assert level, result.stdout + result.stderr
        assert float(level.group(1)) <= 2.0 and result.returncode == 0, result.stdout


def ready_sender(notify: socket.socket, timeout: float) -> int:
    """Wait for READY=1 on a NOTIFY_SOCKET and return the sender's PID (SCM_CREDENTIALS)."""
    notify.settimeout(timeout)
    while True:
        message, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
        if b"READY=1" in message.split(b"\n"):
            for level, kind, data in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    return int(struct.unpack("iII", data[:12])[0])
            raise AssertionError("READY=1 without credentials")


@pytest.mark.server
def test_systemd_execstart_as_written_serves_notifies_reloads_and_stops(tmp_path, netns_processes):
    """The unit's ExecStart with only paths substituted (venv, config, state directory):
    the main PID sends READY=1 (Type=notify, NotifyAccess=main), /health answers on the
    unit's bind, ExecReload picks up a new key, keeps serving on an invalid config, and
    SIGTERM to the main PID (KillMode=mixed) exits 0."""
    require_netns()
    require(REPO_KNOCKER.is_file(), "the repo venv's knocker")
    assert service_values(UNIT, "Type") == ["notify"]
    assert service_values(UNIT, "NotifyAccess") == ["main"]
    assert service_values(UNIT, "KillMode") == ["mixed"]
    (state,) = service_values(UNIT, "StateDirectory")
    state_dir = tmp_path / "var/lib" / state
    state_dir.mkdir(parents=True)
    config = tmp_path / "etc/knocker/knocker.yaml"
    config.parent.mkdir(parents=True)
    settings: dict[str, Any] = {
        "api_keys": [{"name": "first", "key": KEY, "max_ttl": 600}],
        "whitelist": {"storage_path": "/var/lib/knocker/whitelist.json"},
        # the polling below knocks with a key that is not valid yet
        "security": {"knock_rate_limit": {"failed_requests": 0}},
    }
    substitutions = {
        "/opt/knocker/venv/bin/knocker": str(REPO_KNOCKER),
        "/etc/knocker/knocker.yaml": str(config),
        "/var/lib/knocker": str(state_dir),
    }

    def substitute(text: str) -> str:
        for written, local in substitutions.items():
            text = text.replace(written, local)
        return text

    def write_config(value: dict[str, Any] | str) -> None:
        text = value if isinstance(value, str) else yaml.safe_dump(value)
        config.write_text(substitute(text))

    write_config(settings)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KNOCKER_CONFIG_PATH")}
    for assignment in service_values(UNIT, "Environment"):
        for pair in shlex.split(assignment):
            name, _, value = pair.partition("=")
            env[name] = value
    (exec_start,) = service_values(UNIT, "ExecStart")
    # systemd expands ${VAR} to one argument: the same as substituting before splitting
    # when the value has no spaces.
    argv = shlex.split(substitute(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], exec_start)))
    bind = argv[argv.index("--bind") + 1]
    (umask,) = service_values(UNIT, "UMask")
    (workdir,) = service_values(UNIT, "WorkingDirectory")

    notify_dir = Path(tempfile.mkdtemp(prefix="knocker-notify-", dir="/tmp"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.bind(str(notify_dir / "notify"))
        env["NOTIFY_SOCKET"] = str(notify_dir / "notify")
        server = Netns(
            argv,
            cwd=Path(substitute(workdir)),
            env=env,
            log=tmp_path / "service.log",
            umask=int(umask, 8),
        )
        netns_processes.append(server)
        assert ready_sender(notify, timeout=30) == server.pid, server.output()
    finally:
        notify.close()
        shutil.rmtree(notify_dir)

    base = f"http://{bind}"
    server.wait_until(lambda: server.http("GET", f"{base}/health")[0] == 200, "/health")
    assert server.http("POST", f"{base}/knock", {"X-Api-Key": KEY})[0] == 200
    # whitelist.json follows the fsynced journal about a second behind
    server.wait_until(lambda: (state_dir / "whitelist.json").is_file(), "whitelist.json")

    def reload() -> None:
        (exec_reload,) = service_values(UNIT, "ExecReload")
        command = shlex.split(exec_reload.replace("$MAINPID", str(server.pid)))
        subprocess.run(command, check=True, timeout=10)

    assert server.http("POST", f"{base}/knock", {"X-Api-Key": SECOND_KEY})[0] == 401
    settings["api_keys"].append({"name": "second", "key": SECOND_KEY, "max_ttl": 600})
    write_config(settings)
    reload()
    server.wait_until(
        lambda: server.http("POST", f"{base}/knock", {"X-Api-Key": SECOND_KEY})[0] == 200,
        "the reloaded config's new key",
    )

    write_config("api_keys: [\n")  # broken YAML: the running config must stay
    reload()
    time.sleep(2)  # no event marks "reload refused" from outside; give it the chance to fail
    assert server.http("POST", f"{base}/knock", {"X-Api-Key": SECOND_KEY})[0] == 200
    (stop_timeout,) = service_values(UNIT, "TimeoutStopSec")
    assert server.terminate(timeout=float(stop_timeout)) == 0


# --------------------------------------------------------------------------- make dist


def test_dist_sdist_and_wheel_carry_the_whole_package(tmp_path):
    """`python -m build` (what `make dist` runs) makes an sdist and, from it, a wheel that
    holds every package file, the web assets and the `knocker` console script."""
    # Run from tmp_path: in the repo, a leftover ./build directory would shadow the package.
    probe = subprocess.run(
        [sys.executable, "-c", "import build.__main__"], cwd=tmp_path, capture_output=True
    )
    require(probe.returncode == 0, "the `build` package (test extra)")
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=COPY_IGNORE)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("knocker-*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("knocker-*.whl")
    package_files = {
        str(p.relative_to(REPO))
        for p in (REPO / "knocker").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "knocker = knocker.cli:main" in archive.read(entry_points).decode()
    assert package_files <= names, sorted(package_files - names)
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        members = {name.removeprefix(top + "/") for name in archive.getnames()}
    assert {"setup.cfg", "pyproject.toml", "README.md"} | package_files <= members
