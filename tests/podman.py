"""Podman as the container tests drive it: one command line, stand-in bases, cleanup.

What this machine kind needs (and users with a normal Docker or Podman do not): the runc
runtime with cgroupfs (crun refuses a hybrid cgroup layout), explicit ulimits at or
below the current limits (Podman's defaults exceed the hard ones), and base images that
cannot be pulled. Everything a test creates is recorded here and removed by its ID.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTFS_SCRIPT = REPO / "tests" / "tools" / "debian-rootfs.sh"
# The name the Containerfile's FROM resolves to (short names resolve to Docker Hub).
PYTHON_BASE = "docker.io/library/python:3.11-slim"
# What the official python:3.11-slim sets and a plain `podman import` would not.
STAND_IN_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
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
def stage(report: list[tuple[str, float]], name: str) -> Iterator[None]:
    """Time a stage; the test module prints them all at the end."""
    start = time.monotonic()
    try:
        yield
    finally:
        report.append((name, time.monotonic() - start))
