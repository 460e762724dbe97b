"""Edge: opening and replacing files so that others sharing the directory cannot subvert them.

Owns `atomic_write` (the one way Knocker replaces a file: an unpredictable O_EXCL temp
file, fsync, rename, fsync of the directory) and `open_private` (O_NOFOLLOW, then fstat:
a regular file of ours that nobody else may write), plus the storage directory check.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable

from ..errors import StorageError

PRIVATE = 0o600


def atomic_write(path: str, pieces: Iterable[bytes], mode: int = PRIVATE) -> None:
    """Replace `path` with the concatenated `pieces`, all or nothing, durably.

    The temp file sits in the same directory (rename(2) is atomic only within one
    filesystem) under a name nobody can predict, created with O_EXCL|O_NOFOLLOW so a
    planted file or symlink is never written through. Raises OSError; the temp file
    never outlives a failure."""
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # the umask may have narrowed it
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """fsync(2) the directory so a rename in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems refuse
            raise
    finally:
        os.close(fd)


def open_private(path: str, flags: int, mode: int = PRIVATE) -> int:
    """os.open(path) that refuses a symlink, a FIFO or device (opened non-blocking so a
    FIFO cannot hang us), a file owned by another user or one others may write.
    Raises StorageError naming the file; OSError for the open itself."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    try:
        problem = _private_problem(os.fstat(fd))
        if problem:
            raise StorageError(f"refusing storage file {path}: {problem}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: str) -> bytes | None:
    """The whole of a storage file (checked as open_private does); None when missing."""
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _refusal(path, error) from error
    try:
        with os.fdopen(fd, "rb", closefd=True) as handle:
            return handle.read()
    except OSError as error:
        raise StorageError(f"cannot read {path}: {error.strerror}") from error


def check_directory(directory: str) -> None:
    """Refuse a storage directory that others may write unless it is sticky (then
    they cannot replace our files in it)."""
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise StorageError(f"refusing storage directory {directory}: not a directory")
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise StorageError(
            f"refusing storage directory {directory}: writable by every "
            "user and not sticky (chmod o-w or +t)"
        )


def _private_problem(info: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not by this service's uid {os.geteuid()}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by group or others (chmod go-w)"
    return None


def _refusal(path: str, error: OSError) -> StorageError:
    if error.errno == errno.ELOOP:
        return StorageError(f"refusing storage file {path}: it is a symlink")
    return StorageError(f"cannot open {path}: {error.strerror}")


def open_storage(path: str, flags: int) -> int:
    """open_private() with every failure as a StorageError naming the file."""
    try:
        return open_private(path, flags)
    except OSError as error:
        raise _refusal(path, error) from error
