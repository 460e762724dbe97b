"""Files in the state directory that make a service's processes act as one.

Owns: FileLock (flock(2): one mutation at a time machine-wide, one prepare per service
start, one elected watcher), the shared status file that tells every worker's /ready
what the watcher saw, and which service start a process belongs to (its gunicorn master).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable

from ..store.files import atomic_write

STATUS_STALE = 15.0  # a status older than this means nobody is watching firewalld

# Knocker's names inside the state directory (next to whitelist.json).
PREPARE_LOCK = ".knocker-firewalld-prepare.lock"
PREPARED_MARKER = ".knocker-firewalld-prepared"
MUTATION_LOCK = ".knocker-firewalld-mutation.lock"
WATCHER_LOCK = ".knocker-firewalld-watcher.lock"
STATUS_FILE = ".knocker-firewalld-status.json"


class LockTimeout(Exception):
    pass


class FileLock:
    """flock(2) on a file in the state directory. flock belongs to the open file, so each
    process opens its own (after fork); threads of one process must take turns by other
    means (FirewalldFirewall's thread lock)."""

    def __init__(
        self,
        path: str,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.path = path
        self._monotonic = monotonic
        # looked up now, not at import: under gevent, time.sleep is the patched one
        self._sleep = sleep or time.sleep
        self._fd = -1
        self._pid = 0

    def _file(self) -> int:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._file(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self, timeout: float) -> None:
        deadline = self._monotonic() + timeout
        while not self.try_acquire():
            if self._monotonic() >= deadline:
                raise LockTimeout(f"{os.path.basename(self.path)} held for {timeout:.0f} s")
            self._sleep(0.005)

    def release(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Closing the file also releases the lock."""
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1


def write_status(path: str, ok: bool, reason: str) -> None:
    """Replace the shared status: in place or not, why not, and who says so."""
    # atomic: readers see the old status or the new one, never half of one
    status = json.dumps({"ok": ok, "reason": reason, "pid": os.getpid()})
    atomic_write(path, [status.encode()], mode=0o644)


def read_status(path: str, now: float, stale_after: float = STATUS_STALE) -> str | None:
    """None when the shared status says firewalld is in place and is fresh, else why not."""
    try:
        age = now - os.stat(path).st_mtime
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return "firewalld integration has not been set up"
    except (OSError, ValueError) as exc:
        return f"firewalld status unreadable: {exc}"
    if not isinstance(data, dict):
        return "firewalld status unreadable"
    if not data.get("ok"):
        return str(data.get("reason") or "firewalld is not in place")
    if age > stale_after:
        return f"no Knocker process is watching firewalld (status {age:.0f} s old)"
    return None


def _process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            # starttime is field 22; fields after the ")" that ends the name start at 3
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def service_id() -> str:
    """Which service start this process belongs to: its gunicorn master. `knocker serve`
    prepares in the master itself; under a plain `gunicorn knocker.app:create_app()` the
    workers prepare, and they are forks of the master with its very command line."""
    pid, parent = os.getpid(), os.getppid()
    master = parent if parent > 1 and _cmdline(pid) == _cmdline(parent) else pid
    return f"{master}:{_process_start(master)}"
