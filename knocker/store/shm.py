"""Edge: whitelist.json.shm, the memory every worker of one service maps.

Owns the layout (a header of named fields, a ring of change records, the rate-limit
table; every offset derived by ctypes from the field lists) and its lifecycle: created
fully allocated, checked, mapped, locked across processes, and unmapped on close.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import StorageError
from ..ratelimit import Layout
from ..whitelist import Key
from .files import open_storage

MAGIC = b"KNOCKSH3"
HEADER_SIZE = 4096  # the header's page; the ring starts on the next one


class Header(ctypes.Structure):
    """The first page. The fields up to the salt say what the rest of the file holds; a
    file whose values differ from ours is reinitialised."""

    _fields_ = [
        ("magic", ctypes.c_char * 8),
        ("ring_capacity", ctypes.c_uint32),
        ("rate_slots", ctypes.c_uint32),
        ("rate_successes", ctypes.c_uint32),
        ("rate_failures", ctypes.c_uint32),
        ("rate_window", ctypes.c_uint32),
        ("rate_success_batch", ctypes.c_uint64),
        ("rate_failure_batch", ctypes.c_uint64),
        ("salt", ctypes.c_ubyte * 16),  # keys the rate table's hash (not guessable)
        ("seq", ctypes.c_uint64),  # ring records published so far
        ("soonest", ctypes.c_double),  # soonest expiry in whitelist.json (purge due?)
        ("dirty_since", ctypes.c_double),  # journal holds what the snapshot lacks (0: no)
        # how far the journal is known to be on disk (group commit): the epoch counts
        # the journal's truncations, the offset is within the current one
        ("synced_epoch", ctypes.c_uint64),
        ("synced_offset", ctypes.c_uint64),
    ]


class Record(ctypes.Structure):
    """One published change: `seq` stamps the slot, so a lapped reader notices."""

    _fields_ = [
        ("seq", ctypes.c_uint64),
        ("expiry", ctypes.c_int64),  # -1: removed
        ("version", ctypes.c_uint8),
        ("prefix", ctypes.c_uint8),
        ("value", ctypes.c_ubyte * 16),  # network address, big-endian
    ]


assert ctypes.sizeof(Header) <= HEADER_SIZE


def file_size(ring_capacity: int, rate: Layout) -> int:
    return HEADER_SIZE + ring_capacity * ctypes.sizeof(Record) + rate.size


class SharedMemory:
    """The mapped file. Fields are read and written through `header`; `lock()` is the
    service-wide lock for the rate table and the journal watermark."""

    def __init__(self, path: str, ring_capacity: int, rate: Layout, window: int) -> None:
        self.path = path
        self.ring_capacity = ring_capacity
        self._thread_lock = threading.Lock()
        size = file_size(ring_capacity, rate)
        wanted = (
            MAGIC,
            ring_capacity,
            rate.slots,
            rate.successes,
            rate.failures,
            window,
            rate.success_batch,
            rate.failure_batch,
        )
        self._fd = open_storage(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._prepare(size, wanted)
                self._map = mmap.mmap(self._fd, size)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(self._fd)
            raise
        self.header = Header.from_buffer(self._map)
        self.ring = (Record * ring_capacity).from_buffer(self._map, HEADER_SIZE)
        ring_end = HEADER_SIZE + ring_capacity * ctypes.sizeof(Record)
        self.rate_table = memoryview(self._map)[ring_end:]
        self.salt = bytes(self.header.salt)

    def _prepare(self, size: int, wanted: tuple[bytes, int, int, int, int, int, int, int]) -> None:
        """Under flock: keep a file that matches our layout, else start it afresh."""
        raw = os.pread(self._fd, ctypes.sizeof(Header), 0)
        if len(raw) == ctypes.sizeof(Header) and os.fstat(self._fd).st_size == size:
            found = Header.from_buffer_copy(raw)
            if (
                found.magic,
                found.ring_capacity,
                found.rate_slots,
                found.rate_successes,
                found.rate_failures,
                found.rate_window,
                found.rate_success_batch,
                found.rate_failure_batch,
            ) == wanted:
                return
        os.ftruncate(self._fd, 0)
        _allocate(self._fd, size, self.path)
        header = Header(*wanted)
        ctypes.memmove(header.salt, os.urandom(16), 16)
        header.soonest = float("inf")
        os.pwrite(self._fd, bytes(header), 0)

    @contextmanager
    def lock(self) -> Iterator[None]:
        # A thread lock as well: the threads of one process share the file description,
        # so flock alone would not keep them apart.
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def write_record(self, seq: int, key: Key, expiry: int) -> None:
        record = self.ring[seq % self.ring_capacity]
        record.seq = seq
        record.expiry = expiry
        record.version, record.prefix = key[0], key[1]
        ctypes.memmove(record.value, key[2].to_bytes(16, "big"), 16)

    def read_record(self, seq: int) -> tuple[int, Key, int]:
        """(stamp, key, expiry) in the slot of `seq`; stamp != seq: overwritten."""
        record = self.ring[seq % self.ring_capacity]
        key = (record.version, record.prefix, int.from_bytes(bytes(record.value), "big"))
        return record.seq, key, record.expiry

    def reopen(self) -> None:
        """In a forked child: a file description of its own, since flock belongs to the
        description and sharing the parent's would let every process hold it at once."""
        os.close(self._fd)
        self._fd = open_storage(self.path, os.O_RDWR)
        self._thread_lock = threading.Lock()

    def close(self) -> None:
        """Unmap and close; the views into the map go first (mmap refuses otherwise)."""
        del self.header, self.ring
        self.rate_table.release()
        self._map.close()
        os.close(self._fd)


def _allocate(fd: int, size: int, path: str) -> None:
    """Give the file real blocks now: a page first touched through the map on a full
    filesystem would kill the process with SIGBUS instead of failing a write."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"not enough space for {path} ({size} bytes)") from error
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    zeros = bytes(1 << 20)  # a filesystem without fallocate: write the zeros ourselves
    for offset in range(0, size, len(zeros)):
        os.pwrite(fd, zeros[: size - offset], offset)
    os.fsync(fd)
