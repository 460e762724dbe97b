"""Edge: whitelist.json.journal, the append-only log that makes a knock durable.

Owns the journal file and the service-wide writer lock (flock on it plus a thread lock):
appending records, group commit (one fdatasync covers every knock appended before it),
truncation once a snapshot holds everything, and keeping a damaged journal aside.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import StorageError
from .files import open_storage
from .shm import SharedMemory

log = logging.getLogger("knocker.store")

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_APPEND
FIRST_WAIT, LONGEST_WAIT = 0.0005, 0.002  # seconds between tries for a busy writer lock


class Journal:
    def __init__(
        self, path: str, shm: SharedMemory, wait: Callable[[float], None] | None = None
    ) -> None:
        """wait: None to block in flock while another process writes (threads); else
        the sleep to poll with (an event loop must not block in a syscall)."""
        self.path = path
        self._shm = shm
        self._wait = wait
        self._fd = open_storage(path, _FLAGS)
        self._new_locks()

    def _new_locks(self) -> None:
        self._writer = threading.RLock()  # with flock(journal): one writer per service
        self._writer_depth = 0
        self._sync_lock = threading.Lock()  # one fdatasync at a time in this process

    @contextmanager
    def writing(self) -> Iterator[None]:
        """The service-wide writer lock; re-entrant within a thread (a knock that finds
        its replica overrun reloads under the lock it already holds)."""
        with self._writer:
            if self._writer_depth == 0:
                self._lock_file()
            self._writer_depth += 1
            try:
                yield
            finally:
                self._writer_depth -= 1
                if self._writer_depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _lock_file(self) -> None:
        if self._wait is None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            return
        delay = FIRST_WAIT
        while True:  # as long as a blocking flock would wait: the holder's next release
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self._wait(delay)
                delay = min(2 * delay, LONGEST_WAIT)

    def read(self) -> bytes:
        with os.fdopen(os.dup(self._fd), "rb") as handle:
            handle.seek(0)
            return handle.read()

    def append(self, lines: bytes) -> tuple[int, int]:
        """Append under the writer lock; returns the (epoch, offset) that sync() must
        reach for these lines to be durable. On failure the journal is as it was."""
        size = os.fstat(self._fd).st_size
        try:
            if os.write(self._fd, lines) != len(lines):
                raise StorageError("short write to the journal")
        except (OSError, StorageError):
            try:
                os.ftruncate(self._fd, size)  # drop what this knock appended
            except OSError as error:
                log.error("could not undo a failed journal append: %s", error)
            raise
        return self._shm.header.synced_epoch, size + len(lines)

    def sync(self, pending: tuple[int, int]) -> None:
        """Return once the journal is on disk up to `pending` (epoch, offset).

        Group commit: the writer lock is not held here, so other knocks keep appending
        while one fdatasync runs; whoever syncs next covers them all, and a knock that
        finds the watermark already past its record returns without a syscall. A later
        epoch means a snapshot (fsynced before the truncation) already holds it."""
        epoch, offset = pending
        header = self._shm.header
        # This process's threads queue here; processes may sync side by side, and the
        # shared lock is held only to move the watermark, never across the fdatasync
        # (rate-limit checks use it too).
        with self._sync_lock:
            synced_epoch, synced = header.synced_epoch, header.synced_offset
            if synced_epoch > epoch or (synced_epoch == epoch and synced >= offset):
                return
            target = os.fstat(self._fd).st_size  # everything appended so far
            os.fdatasync(self._fd)
            with self._shm.lock():
                # A truncation meanwhile began a new epoch whose offsets are not ours.
                if header.synced_epoch == synced_epoch and header.synced_offset < target:
                    header.synced_offset = target

    def truncate(self) -> None:
        """Empty the journal (under the writer lock, after a durable snapshot): a new
        epoch in which everything before counts as synced."""
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        header = self._shm.header
        with self._shm.lock():
            header.synced_epoch += 1
            header.synced_offset = 0

    def keep_aside(self, suffix: str) -> str:
        """Copy the journal to `<name>.corrupt-<suffix>` before it is rewritten."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        aside = f"{self.path}.corrupt-{suffix}"
        for attempt in range(1, 100):  # one repair per second is already unusual
            try:
                fd = os.open(aside, flags, 0o600)
                break
            except FileExistsError:
                aside = f"{self.path}.corrupt-{suffix}.{attempt}"
        else:
            raise StorageError(f"too many kept-aside copies of {self.path}")
        try:
            data = self.read()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return aside

    def reopen(self) -> None:
        """In a forked child: its own file description (flock belongs to it) and locks."""
        os.close(self._fd)
        self._fd = open_storage(self.path, _FLAGS)
        self._new_locks()

    def close(self) -> None:
        os.close(self._fd)
