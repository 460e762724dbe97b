"""Podman as the container tests drive it: one command line, stand-in bases, cleanup.

What this machine kind needs (and users with a normal Docker or Podman do not): the runc
runtime with cgroupfs (crun refuses a hybrid cgroup layout), explicit ulimits at or
below the current limits (Podman's defaults exceed the hard ones), and base images that
cannot be pulled. Everything a test creates is recorded here and removed by its ID.
podman-compose gets the same settings (compose_env), and a network namespace of the
test's own plays the clients of a compose stack (client_namespace, curl).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"
ROOTFS_SCRIPT = REPO / "tests" / "tools" / "debian-rootfs.sh"
# The name the Containerfile's FROM resolves to (short names resolve to Docker Hub).
PYTHON_BASE = "docker.io/library/python:3.11-slim"
# What the official python:3.11-slim sets and a plain `podman import` would not.
STAND_IN_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
# What the official valkey/valkey:8 image sets (its entrypoint drops to its server user;
# the stand-in starts as that user), for the `redis` flavour of debian-rootfs.sh.
VALKEY_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "USER valkey",
    "WORKDIR /data",
    "VOLUME /data",
    "EXPOSE 6379",
    'CMD ["valkey-server"]',
)
# platform -> (Debian architecture, OCI architecture, OCI variant)
PLATFORMS = {
    "linux/amd64": ("amd64", "amd64", ""),
    "linux/arm64": ("arm64", "arm64", ""),
    "linux/arm/v7": ("armhf", "arm", "v7"),
}


def _limit(kind: int, cap: int) -> int:
    soft, hard = resource.getrlimit(kind)
    values = [v for v in (soft, hard) if v != resource.RLIM_INFINITY]
    return min([cap, *values])


NOFILE = _limit(resource.RLIMIT_NOFILE, 65536)
NPROC = _limit(resource.RLIMIT_NPROC, 4096)
ULIMITS = [f"--ulimit=nofile={NOFILE}:{NOFILE}", f"--ulimit=nproc={NPROC}:{NPROC}"]


def available() -> str | None:
    """None when podman can run here, else what is missing."""
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} is not installed (make test-deps installs it)"
    if os.geteuid() != 0:
        return "the container tests run podman as root"
    return None


def require() -> None:
    """Skip the test where podman cannot run; under CI=true that is a failure."""
    missing = available()
    if missing is None:
        return
    if IN_CI:
        pytest.fail(f"{missing} (make test-deps must provide it in CI)")
    pytest.skip(missing)


def run(
    *args: str, timeout: float = 600, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", *args]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, input=input
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


class Resources:
    """Every container, volume, network and image a test run created, removed by ID."""

    def __init__(self) -> None:
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self.images: list[str] = []
        self.networks: list[str] = []

    def cleanup(self) -> None:
        for container in reversed(self.containers):
            run("rm", "--force", "--time", "0", container, check=False, timeout=60)
        for volume in self.volumes:
            run("volume", "rm", "--force", volume, check=False, timeout=60)
        for network in self.networks:
            run("network", "rm", "--force", network, check=False, timeout=60)
        for image in reversed(self.images):
            run("rmi", "--force", image, check=False, timeout=120)
        self.containers.clear()
        self.volumes.clear()
        self.images.clear()
        self.networks.clear()

    def image_id(self, name: str) -> str:
        return run("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()

    def stand_in(self, platform: str) -> str:
        """Import the Debian stand-in for python:3.11-slim for `platform` under the
        official name (moving the name if another architecture held it); its image ID."""
        arch, oci_arch, variant = PLATFORMS[platform]
        tarball = subprocess.run(
            ["bash", str(ROOTFS_SCRIPT), "python", arch],
            capture_output=True,
            text=True,
            timeout=1800,
            check=True,
        ).stdout.strip()
        args = ["import", "--arch", oci_arch]
        if variant:
            args += ["--variant", variant]
        for change in STAND_IN_CHANGES:
            args += ["--change", change]
        image = run(*args, tarball, PYTHON_BASE, timeout=600).stdout.strip().splitlines()[-1]
        self.images.append(image)
        return image

    def valkey_stand_in(self, tag: str) -> str:
        """Import the stand-in for valkey/valkey:8 (amd64) as `tag`: Valkey 8 from
        Debian 13 on the Debian stand-in base; its image ID."""
        tarball = subprocess.run(
            ["bash", str(ROOTFS_SCRIPT), "valkey", PLATFORMS["linux/amd64"][0]],
            capture_output=True,
            text=True,
            timeout=1800,
            check=True,
        ).stdout.strip()
        args = ["import", "--arch", "amd64"]
        for change in VALKEY_CHANGES:
            args += ["--change", change]
        image = run(*args, tarball, tag, timeout=600).stdout.strip().splitlines()[-1]
        self.images.append(image)
        return image

    def build(self, tag: str, platform: str, containerfile: Path, context: Path) -> str:
        """`podman build` of an unchanged Containerfile; returns the image ID.

        --format docker keeps HEALTHCHECK (Podman's default OCI format drops it; Docker
        keeps it anyway). The host's CA bundle is bound read-only into the RUN steps so
        pip reaches the package index through this machine's certificates: a build-time
        mount, in no layer, and not needed where the real index is reachable.
        --layers=false leaves no intermediate images behind.
        """
        run(
            "build",
            "--pull=never",
            "--layers=false",
            "--format",
            "docker",
            "--platform",
            platform,
            *ULIMITS,
            "--volume",
            "/etc/ssl/certs:/etc/ssl/certs:ro",
            "--file",
            str(containerfile),
            "--tag",
            tag,
            str(context),
            timeout=3600,
        )
        image = self.image_id(tag)
        self.images.append(image)
        return image

    def volume(self, name: str) -> str:
        run("volume", "create", name)
        self.volumes.append(name)
        return name

    def container(self, *args: str) -> str:
        """`podman run --detach ARGS`; the container's ID (removed at cleanup)."""
        cid = run("run", "--detach", *ULIMITS, *args, timeout=120).stdout.strip()
        self.containers.append(cid)
        return cid


def volume_path(name: str) -> Path:
    return Path(run("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())


def exec_(container: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run("exec", container, *cmd, timeout=timeout, check=False)


@contextmanager
def owned_resources(
    request: pytest.FixtureRequest, durations: list[tuple[str, float]], notes: list[str]
) -> Iterator[Resources]:
    """A module's Podman resources: removed at the end, then its stage durations and
    notes reported (the body of each container test module's `resources` fixture)."""
    require()
    owned = Resources()
    try:
        yield owned
    finally:
        with stage(durations, "cleanup"):
            owned.cleanup()
        report(request, [f"{name}: {seconds:.1f}s" for name, seconds in durations] + notes)


def report(request: pytest.FixtureRequest, lines: list[str]) -> None:
    """Print `lines` (stage durations, notes) on the terminal although pytest captures
    the test's output."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not lines:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(f"container: {line}")


@contextmanager
def stage(report: list[tuple[str, float]], name: str) -> Iterator[None]:
    """Time a stage; the test module prints them all at the end."""
    start = time.monotonic()
    try:
        yield
    finally:
        report.append((name, time.monotonic() - start))


# --------------------------------------------------------------------------- compose

# `podman-compose --podman-build-args`: the same build settings as Resources.build (stand-in
# base, CA bundle for pip in the RUN steps only, HEALTHCHECK kept, no intermediate images).
COMPOSE_BUILD_ARGS = (
    "--pull=never --layers=false --format=docker --volume=/etc/ssl/certs:/etc/ssl/certs:ro"
)


def compose_binary() -> str:
    """The podman-compose of this venv (the test extra); skip, or fail under CI, without."""
    found = shutil.which(
        "podman-compose", path=f"{Path(sys.executable).parent}:" + os.environ.get("PATH", "")
    )
    if found is None:
        message = "podman-compose is not installed (the test extra installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def compose_env(directory: Path) -> dict[str, str]:
    """podman-compose calls plain `podman`: give it this machine's runtime settings
    through a containers.conf of the test's own (CONTAINERS_CONF), not the host's."""
    conf = directory / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={NOFILE}:{NOFILE}", "nproc={NPROC}:{NPROC}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


class Compose:
    """One podman-compose project of a test, run with this machine's settings."""

    def __init__(self, project: str, file: Path) -> None:
        self.project = project
        self.directory = file.parent
        self.env = compose_env(self.directory)
        self.command = [
            compose_binary(),
            "--project-name",
            project,
            "--file",
            str(file),
            "--podman-build-args",
            COMPOSE_BUILD_ARGS,
        ]

    def container(self, service: str) -> str:
        """The name podman-compose gives the (only) container of `service`."""
        return f"{self.project}_{service}_1"

    def run(self, *args: str, timeout: float = 600) -> str:
        """`podman-compose ARGS`; its output, AssertionError when it fails."""
        result = subprocess.run(
            [*self.command, *args],
            env=self.env,
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"podman-compose {' '.join(args)}:\n{output[-4000:]}"
        return output

    def up(self, *args: str, healthchecks: tuple[str, ...] = (), timeout: float = 300) -> str:
        """`podman-compose up --detach ARGS` while playing the HEALTHCHECK timer of the
        `healthchecks` services; its output, AssertionError when it fails.

        podman-compose waits for `condition: service_healthy` only with Podman 4.6+
        (Debian 12 has 4.3: it warns and starts the dependent service at once). Where it
        waits, Podman runs the HEALTHCHECK from a systemd timer, and CI machines have no
        systemd: run the checks every second while `up` runs.
        """
        up = subprocess.Popen(
            [*self.command, "up", "--detach", *args],
            env=self.env,
            cwd=self.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        while up.poll() is None and time.monotonic() < deadline:
            for service in healthchecks:
                run("healthcheck", "run", self.container(service), check=False, timeout=30)
            time.sleep(1)
        if up.poll() is None:
            up.kill()
        output = up.communicate(timeout=30)[0]
        assert up.returncode == 0, output[-4000:]
        return output

    def down(self) -> None:
        """`podman-compose down --volumes`, errors ignored (cleanup)."""
        subprocess.run(
            [*self.command, "down", "--volumes", "--timeout", "5"],
            env=self.env,
            cwd=self.directory,
            capture_output=True,
            timeout=300,
            check=False,
        )


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@contextmanager
def client_namespace(prefix: str, host: str, clients: list[str]) -> Iterator[str]:
    """A network namespace holding `clients` (addresses in the /24 `prefix`), joined to
    the host by a veth pair whose host end is `host`: its packets reach a port published
    on `host` as a LAN or Internet client's do. Yields the namespace's name."""
    name = f"{prefix}{os.urandom(4).hex()}"
    host_if, ns_if = f"{name}h", f"{name}n"
    _sh("ip", "netns", "add", name)
    try:
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _sh("ip", "link", "set", ns_if, "netns", name)
        _sh("ip", "addr", "add", f"{host}/24", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        for address in clients:
            _sh("ip", "-n", name, "addr", "add", f"{address}/24", "dev", ns_if)
        _sh("ip", "-n", name, "link", "set", ns_if, "up")
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def curl(
    netns: str | None,
    source: str,
    url: str,
    *,
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
    context: Callable[[], str] = str,
) -> tuple[int, str]:
    """curl from `source` inside `netns` (None: from the host, e.g. 127.0.0.1); (status,
    body). A failed transfer raises AssertionError with context() (the stack's logs)."""
    cmd = ["curl", "-sS", "--max-time", "15", "--interface", source, "-X", method]
    cmd += ["-o", "-", "-w", "\n%{http_code}"]
    for name, value in headers:
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(url)
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise AssertionError(f"curl {method} {url} from {source}: {result.stderr}\n{context()}")
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body
