"""deploy/compose.redis.yaml (README "Several hosts") brought up for real with
podman-compose: two Knocker instances sharing one whitelist through Valkey.

CI cannot pull valkey/valkey:8 (no registry is reachable): the valkey service runs a
local stand-in, real Valkey 8 from Debian 13 (tests/tools/fetch-valkey.sh: Debian 12 has
no valkey package) on the same Debian stand-in base as the Knocker image
(tests/tools/debian-rootfs.sh, flavour valkey), as valkey-server and valkey-cli, so the
compose file's command and healthcheck run unchanged; users pull the real image.
podman-compose builds the Knocker image from this checkout on the python:3.11-slim
stand-in, as in tests/test_container.py, the way the header tells podman-compose users
(`build knocker-a`, then `up -d`).

The test changes only what CI must differ in: image names, the build context as an
absolute path, the published ports (on an address of a client network namespace) and the
project name. It writes knocker.yaml and .env as the compose file's header tells users.

Needs root and Podman (make test-deps); locally skipped without them, a failure under
CI=true.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import podman
from tests.podman import Resources, exec_, stage
from tests.proxies.process import free_port

pytestmark = [pytest.mark.container, pytest.mark.redis]

COMPOSE = podman.REPO / "deploy" / "compose.redis.yaml"
KNOCKERS = ("knocker-a", "knocker-b")
KEY = "ctr-" + secrets.token_urlsafe(24)
# The clients: a network namespace of the test's own, reaching the published ports on a
# host address (not loopback, which the kernel would masquerade to the bridge gateway).
NS_NET = "198.18.79"  # RFC 2544 benchmarking range, never routed
NS_HOST, NS_CLIENTS = f"{NS_NET}.1", [f"{NS_NET}.{n}" for n in range(2, 10)]
DURATIONS: list[tuple[str, float]] = []


def wait_until(
    what: str, check: Callable[[], bool], context: Callable[[], str], timeout: float
) -> None:
    """Poll check() (a failed connection counts as not yet) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except AssertionError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f}s\n{context()}")


class Stack:
    """The running project: HTTP from the client namespace to either instance."""

    def __init__(self, compose: podman.Compose, netns: str, ports: dict[str, int]) -> None:
        self.compose = compose
        self.netns = netns
        self.ports = ports

    def container(self, service: str) -> str:
        return self.compose.container(service)

    def request(
        self, service: str, source: str, path: str, method: str = "GET", key: str | None = None
    ) -> tuple[int, str]:
        return podman.curl(
            self.netns,
            source,
            f"http://{NS_HOST}:{self.ports[service]}{path}",
            method=method,
            headers=(("X-Api-Key", key),) if key else (),
            context=self.logs,
        )

    def knock(self, service: str, source: str, key: str = KEY) -> tuple[int, str]:
        return self.request(service, source, "/knock", method="POST", key=key)

    def verify(self, service: str, source: str) -> int:
        return self.request(service, source, "/verify")[0]

    def ready(self, service: str) -> int:
        return self.request(service, NS_CLIENTS[-1], "/ready")[0]

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 5) -> None:
        wait_until(what, check, self.logs, timeout)

    def wait_verified(self, service: str, source: str, timeout: float = 5) -> None:
        """Until `service` lets `source` in: a grant reaches the other instance through
        the server's change stream within milliseconds, not at once."""
        self.wait(
            f"{service} lets {source} in", lambda: self.verify(service, source) == 200, timeout
        )

    def wait_ready(self, status: int, timeout: float) -> None:
        for name in KNOCKERS:
            self.wait(f"{name} /ready {status}", lambda: self.ready(name) == status, timeout)

    def valkey_healthy(self) -> bool:
        """The valkey service's compose healthcheck passes (run as podman runs it)."""
        return (
            podman.run("healthcheck", "run", self.container("valkey"), check=False).returncode == 0
        )

    def stored(self, entry: str) -> bool:
        """The entry is in the server's whitelist (asked of the server, not of Knocker)."""
        return self.valkey_cli("ZSCORE", "knocker:whitelist", entry) != ""

    def since(self) -> dict[str, str]:
        """When each Knocker container last started, and how often it was restarted."""
        return {
            name: podman.run(
                "inspect",
                "--format",
                "{{.State.StartedAt}} {{.RestartCount}}",
                self.container(name),
            ).stdout.strip()
            for name in KNOCKERS
        }

    def valkey_cli(self, *args: str) -> str:
        """valkey-cli in the valkey container, authenticated the way its healthcheck is."""
        result = exec_(self.container("valkey"), "valkey-cli", *args)
        assert result.returncode == 0, (result.stdout, result.stderr)
        return result.stdout.strip()

    def logs(self) -> str:
        out = []
        for service in ("valkey", *KNOCKERS):
            result = podman.run("logs", self.container(service), check=False)
            out.append(f"--- {service} ---\n{(result.stdout + result.stderr)[-2000:]}")
        return "\n".join(out)


def documented_config() -> dict[str, Any]:
    """knocker.container.yaml with real keys, plus the lines the compose file's header
    says to add (read from the header itself)."""
    config: dict[str, Any] = yaml.safe_load(
        (podman.REPO / "deploy" / "knocker.container.yaml").read_text()
    )
    for entry in config["api_keys"]:
        entry["key"] = KEY if entry["name"] == "admin" else "ctr-" + secrets.token_urlsafe(24)
    header = COMPOSE.read_text().split("\nservices:")[0].splitlines()
    start = next(i for i, line in enumerate(header) if line.endswith("then add:")) + 1
    added_lines = []
    for line in header[start:]:
        if not line.startswith("#       "):
            break
        added_lines.append(line[len("#   ") :])
    added: dict[str, Any] = yaml.safe_load("\n".join(added_lines))
    assert set(added) == {"whitelist", "redis"}, added
    config.setdefault("whitelist", {}).update(added["whitelist"])
    config["redis"] = added["redis"]
    return config


def compose_files(
    directory: Path, knocker_image: str, valkey_image: str, ports: dict[str, int]
) -> Path:
    """compose.redis.yaml, knocker.yaml and .env as a user would have them next to each
    other, with only what CI must differ in swapped."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert services["valkey"]["image"] == "valkey/valkey:8"
    services["valkey"]["image"] = valkey_image
    for name in KNOCKERS:
        service = services[name]
        assert service["image"] == "localhost/knocker:latest"
        assert service["build"]["context"] in ("..", str(podman.REPO))  # shared by the merge
        # compose builds the image itself, from this checkout, under a name of the test's own
        service["build"]["context"] = str(podman.REPO)
        service["image"] = knocker_image
        [published] = service["ports"]
        assert published.endswith(":8000"), published
        service["ports"] = [f"{NS_HOST}:{ports[name]}:8000"]
    path = directory / "compose.redis.yaml"
    path.write_text(yaml.safe_dump(compose), encoding="utf-8")

    (directory / "knocker.yaml").write_text(yaml.safe_dump(documented_config()))
    (directory / "knocker.yaml").chmod(0o644)
    # The header's `openssl rand -hex 24`.
    assert "printf 'REDIS_PASSWORD=%s\\n'" in COMPOSE.read_text()
    (directory / ".env").write_text(f"REDIS_PASSWORD={secrets.token_hex(24)}\n")
    (directory / ".env").chmod(0o600)
    return path


@pytest.fixture(scope="module")
def resources(request: pytest.FixtureRequest) -> Iterator[Resources]:
    with podman.owned_resources(request, DURATIONS, []) as owned:
        yield owned


@pytest.fixture(scope="module")
def client_namespace() -> Iterator[str]:
    with podman.client_namespace("krc", NS_HOST, NS_CLIENTS) as name:
        yield name


@pytest.fixture(scope="module")
def stack(
    resources: Resources, client_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("compose-redis")
    directory.chmod(0o755)
    tag = uuid.uuid4().hex[:12]
    with stage(DURATIONS, "import stand-ins (python:3.11-slim, valkey/valkey:8)"):
        resources.stand_in("linux/amd64")
        valkey_image = f"localhost/knocker-test-valkey:{tag}"
        resources.valkey_stand_in(valkey_image)
    knocker_image = f"localhost/knocker-test-compose-redis:{tag}"
    project = f"knockerredis{tag[:8]}"
    ports = {name: free_port() for name in KNOCKERS}
    compose = podman.Compose(project, compose_files(directory, knocker_image, valkey_image, ports))
    stack = Stack(compose, client_namespace, ports)
    resources.networks.append(f"{project}_knocker_net")
    resources.volumes.extend(
        f"{project}_{v}" for v in ("valkey_data", "knocker_a_data", "knocker_b_data")
    )
    try:
        with stage(DURATIONS, "compose build (one image for both instances)"):
            try:
                # What the header tells podman-compose users: `up --build` would build
                # the image both services name twice, and leave one build untagged.
                compose.run("build", "knocker-a")
            finally:
                built = podman.run(
                    "image", "inspect", "--format", "{{.Id}}", knocker_image, check=False
                )
                if built.returncode == 0:
                    resources.images.append(built.stdout.strip())
        with stage(DURATIONS, "compose up, valkey healthy, both instances ready"):
            compose.up(healthchecks=("valkey",))
            stack.wait("valkey's compose healthcheck passes", stack.valkey_healthy, 60)
            stack.wait_ready(200, 60)
        yield stack
    finally:
        compose.down()


def test_valkey_runs_durable_and_refuses_clients_without_the_password(stack: Stack) -> None:
    """appendonly yes + appendfsync always on the running server; its compose healthcheck
    passes; a client on the network without the password (here from knocker-a) is
    refused, even a PING."""
    assert "server_name:valkey" in stack.valkey_cli("INFO", "server")  # Valkey, not Redis
    assert stack.valkey_cli("CONFIG", "GET", "appendonly").split() == ["appendonly", "yes"]
    assert stack.valkey_cli("CONFIG", "GET", "appendfsync").split() == ["appendfsync", "always"]
    health = podman.run("healthcheck", "run", stack.container("valkey"), check=False)
    assert health.returncode == 0, (health.stdout, health.stderr)
    probe = exec_(
        stack.container("knocker-a"),
        "python",
        "-c",
        "import socket\n"
        "s = socket.create_connection(('valkey', 6379), timeout=5)\n"
        "s.sendall(b'PING\\r\\n')\n"
        "print(s.recv(200).decode().strip())\n",
    )
    assert probe.stdout.strip().startswith("-NOAUTH"), (probe.stdout, probe.stderr)


def test_both_instances_are_ready_and_pass_their_compose_healthcheck(stack: Stack) -> None:
    """/ready answers 200 on both instances (each reaches the server), and their compose
    healthcheck, the one compose.yaml repeats from the image, passes."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    single = yaml.safe_load((podman.REPO / "deploy" / "compose.yaml").read_text())["services"]
    for name in KNOCKERS:
        assert services[name]["healthcheck"] == single["knocker"]["healthcheck"]
        status, body = stack.request(name, NS_CLIENTS[-1], "/ready")
        assert status == 200, body
        health = podman.run("healthcheck", "run", stack.container(name), check=False)
        assert health.returncode == 0, (health.stdout, health.stderr, stack.logs())


def test_a_knock_on_either_instance_is_honoured_by_the_other(stack: Stack) -> None:
    """A knock on knocker-a whitelists the client (its own address) on knocker-b too, and
    the other way round; a client that did not knock stays out on both."""
    first, second, bystander = NS_CLIENTS[0], NS_CLIENTS[1], NS_CLIENTS[2]
    for name in KNOCKERS:
        assert stack.verify(name, first) == 401
    status, body = stack.knock("knocker-a", first)
    assert status == 200, body
    assert json.loads(body)["whitelisted_entry"] == first
    stack.wait_verified("knocker-b", first)
    status, body = stack.knock("knocker-b", second)
    assert status == 200, body
    stack.wait_verified("knocker-a", second)
    for name in KNOCKERS:
        assert stack.verify(name, first) == 200
        assert stack.verify(name, second) == 200
        assert stack.verify(name, bystander) == 401


def test_a_knock_with_a_wrong_key_gains_nothing(stack: Stack) -> None:
    """A wrong key answers 401 and whitelists the client on neither instance, nor on
    the server."""
    client = NS_CLIENTS[3]
    status, body = stack.knock("knocker-a", client, key="ctr-" + secrets.token_urlsafe(24))
    assert status == 401, body
    assert not stack.stored(client)
    for name in KNOCKERS:
        assert stack.verify(name, client) == 401


def test_valkey_stopped_means_503_and_started_again_brings_both_back_without_a_restart(
    stack: Stack,
) -> None:
    """With the valkey container stopped (`podman stop`), knocks answer 503 and /ready
    503 on both instances while an earlier grant keeps verifying from their replicas;
    started again, both become ready on their own (neither Knocker container restarted)
    and the earlier grant is still honoured, by the server's data on its volume."""
    granted, late = NS_CLIENTS[4], NS_CLIENTS[5]
    status, body = stack.knock("knocker-a", granted)
    assert status == 200, body
    stack.wait_verified("knocker-b", granted)
    before = stack.since()
    podman.run("stop", "--time", "10", stack.container("valkey"))
    try:
        for name in KNOCKERS:
            status, body = stack.knock(name, late)
            assert status == 503, body
        stack.wait_ready(503, 30)
        for name in KNOCKERS:
            assert stack.verify(name, granted) == 200  # the instance's replica
            assert stack.verify(name, late) == 401
    finally:
        podman.run("start", stack.container("valkey"))
    stack.wait_ready(200, 60)
    assert stack.stored(granted) and not stack.stored(late)
    for name in KNOCKERS:
        assert stack.verify(name, granted) == 200
        assert stack.verify(name, late) == 401
    status, body = stack.knock("knocker-b", late)
    assert status == 200, body
    stack.wait_verified("knocker-a", late)
    assert stack.since() == before


def test_a_knocks_200_survives_a_crash_of_valkey(stack: Stack) -> None:
    """SIGKILL to the valkey container right after a knock's 200, so no shutdown save
    helps: the append-only file on the valkey_data volume already held the grant, and
    after `podman start` the server has it and both instances, ready again without a
    restart, let the client in. (appendfsync always, checked above, extends this to a
    crash of the host, which a test here cannot stage.)"""
    client = NS_CLIENTS[6]
    before = stack.since()
    status, body = stack.knock("knocker-b", client)
    assert status == 200, body
    podman.run("kill", "--signal", "KILL", stack.container("valkey"))
    try:
        stack.wait_ready(503, 30)
    finally:
        podman.run("start", stack.container("valkey"))
    stack.wait("valkey answers again", stack.valkey_healthy, 30)
    assert stack.stored(client), stack.logs()
    stack.wait_ready(200, 60)
    for name in KNOCKERS:
        stack.wait_verified(name, client)
    assert stack.since() == before
