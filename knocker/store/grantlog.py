"""Edge: whitelist.json.grants, the sidecar log of who granted what (docs/whitelist.md#grants).

Owns the file: appending records under the store's writer lock (durable once `sync`
returns), an index of it kept current by reading only what was appended since the last
look (a compaction by another worker, a rename, means one full read), and replacing it
with a compacted copy. It is opened per operation, never kept open, so every worker
appends to the current file.
"""

from __future__ import annotations

import os
import threading

from ..errors import StorageError
from .files import atomic_write, open_storage
from .grant_format import Grant, GrantId, GrantIndex, apply_lines

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_APPEND
COMPACT_MIN = 1 << 20  # bytes: below this the log is never compacted


class GrantLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self._compact_at = COMPACT_MIN
        self._index: GrantIndex = {}
        self._seen: tuple[int, int, int] = (-1, -1, 0)  # (device, inode, offset) read
        self._lock = threading.Lock()  # one refresh at a time in this process

    def of(self, entry: str) -> dict[str | None, Grant]:
        """The recorded grants of `entry` (expired ones included), by key name; call
        refresh() first, under the writer lock."""
        return self._index.get(entry, {})

    def all(self) -> GrantIndex:
        return self._index

    def stale(self) -> bool:
        """True when the file may hold records the index has not seen (one stat)."""
        try:
            info = os.stat(self.path)
        except OSError:
            return self._seen[0] != -1
        return (info.st_dev, info.st_ino, info.st_size) != self._seen

    def refresh(self) -> list[GrantId] | None:
        """Bring the index up to date with the file; what changed, or None when it was
        read afresh (a compaction, or the file gone)."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> list[GrantId] | None:
        try:
            fd = open_storage(self.path, os.O_RDONLY)
        except StorageError:
            if os.path.exists(self.path):
                raise
            self._index, self._seen = {}, (-1, -1, 0)
            return None
        touched: list[GrantId] | None = []
        try:
            info = os.fstat(fd)
            device, inode, offset = self._seen
            if (info.st_dev, info.st_ino) != (device, inode) or info.st_size < offset:
                self._index, offset, touched = {}, 0, None
            if info.st_size > offset:
                data = os.pread(fd, info.st_size - offset, offset)
                # Only whole lines: a torn tail is read again once it is complete.
                data = data[: data.rfind(b"\n") + 1]
                changed = apply_lines(self._index, data)
                if touched is not None:
                    touched.extend(changed)
                offset += len(data)
            self._seen = (info.st_dev, info.st_ino, offset)
        except OSError as error:
            raise StorageError(f"cannot read {self.path}: {error.strerror}") from error
        finally:
            os.close(fd)
        return touched

    def append(self, lines: bytes) -> int:
        """Append `lines` (under the writer lock); returns the descriptor `sync` takes.
        Raises StorageError; on failure nothing stays appended."""
        fd = open_storage(self.path, _FLAGS)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                lines = b"\n" + lines  # after a torn append: keep our record whole
            try:
                if os.write(fd, lines) != len(lines):
                    raise StorageError(f"short write to {self.path}")
            except OSError as error:
                raise StorageError(f"cannot append to {self.path}: {error.strerror}") from error
            except StorageError:
                os.ftruncate(fd, size)
                raise
        except BaseException:
            os.close(fd)
            raise
        return fd

    def sync(self, fd: int) -> None:
        """Make an append durable (outside the writer lock: appends of other knocks
        need not wait for this fdatasync)."""
        try:
            os.fdatasync(fd)
        except OSError as error:
            raise StorageError(f"cannot sync {self.path}: {error.strerror}") from error
        finally:
            os.close(fd)

    def due(self) -> bool:
        """True when the log has grown enough to be worth compacting."""
        try:
            return os.stat(self.path).st_size > self._compact_at
        except OSError:
            return False

    def rewrite(self, data: bytes) -> None:
        """Replace the log with `data` (the live grants), atomically."""
        atomic_write(self.path, [data])
        self._compact_at = max(COMPACT_MIN, 2 * len(data))
