"""Edge: the whitelist on disk, and the same whitelist in every gunicorn worker.

Owns three files next to `whitelist.storage_path` (say whitelist.json):

- whitelist.json: the upstream format, {"entry": unix_expiry_int}, replaced atomically
  (temp file, fsync, rename, fsync of the directory). Rewritten on every knock while the
  whitelist is small (so it is always current), otherwise at most every second or so.
- whitelist.json.journal: append-only lines `+ entry expiry crc` / `- entry crc`, fsynced
  before a knock is answered; that is what makes a knock durable in ~0.2 ms however big
  the whitelist is. A snapshot truncates it; a torn last line (crash mid-append) is ignored.
- whitelist.json.shm: shared memory (mmap) for the workers: a header with a sequence
  number, a ring of the latest changes, and the rate-limit table. A writer appends its
  changes to the ring and bumps the sequence before answering; /verify compares one
  integer in memory and, when it moved, applies the new ring records to its replica. So
  /verify never parses a file, and a knock answered by any worker is seen by every worker
  on its very next request.

Writers (knocks, evictions, snapshots) serialise on flock(journal) plus a thread lock;
/verify takes no lock unless it has records to apply. D-Bus calls (firewall.grant) happen
under the writer lock, which /verify never needs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import inf

from .addresses import IPAddress
from .config import Config
from .errors import StorageError
from .firewall import Firewall
from .ratelimit import Layout, RateLimiter, layout_for
from .whitelist import (
    Key,
    NotCanonical,
    Whitelist,
    canonical_pairs,
    entry_text,
    granted_expiry,
    load_entries,
    parse_entry,
)

log = logging.getLogger("knocker.store")

# Below this many entries a knock rewrites whitelist.json before it is answered (about a
# millisecond); above it the journal carries durability and snapshots are batched.
INLINE_SNAPSHOT_MAX = 2000
MIN_SNAPSHOT_DELAY = 1.0  # seconds a large, dirty whitelist waits before its snapshot
TICK = 0.25  # maintenance thread period: keeps replicas well inside the ring

_MAGIC = b"KNOCKSH2"
# magic, ring capacity, rate-limit slots/successes/failures/window, salt; then the
# sequence of published ring records, the soonest expiry in whitelist.json (when the file
# needs a purge), since when the journal holds changes the snapshot lacks (0: none), and
# how far the journal is known to be on disk: (epoch, offset), the epoch counting the
# journal's truncations (group commit, see _sync)
_HEADER = struct.Struct("<8sIIIII16sQddQQ")
_SEQ_OFFSET = 8 + 4 * 5 + 16
_SOONEST_OFFSET = _SEQ_OFFSET + 8
_DIRTY_OFFSET = _SOONEST_OFFSET + 8
_SYNCED_OFFSET = _DIRTY_OFFSET + 8
_SYNCED = struct.Struct("<QQ")
_SEQ = struct.Struct("<Q")
_FLOAT = struct.Struct("<d")
_HEADER_SIZE = 4096
_RECORD = struct.Struct("<QqBB16s")  # sequence, expiry (-1: removed), version, prefix, value
_RECORD_SIZE = 48
RING_CAPACITY = 65536
_FILE_MODE = 0o600


@dataclass(frozen=True)
class KnockResult:
    entry: str
    expires_at: int
    evicted: tuple[str, ...]


class Store:
    """The whitelist of one service, shared by its processes through the files above."""

    def __init__(self, config: Config, firewall: Firewall,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = os.path.abspath(config.whitelist.storage_path)
        self.directory = os.path.dirname(self.path)
        self._journal_path = self.path + ".journal"
        self._shm_path = self.path + ".shm"
        self._capacity = config.security.max_whitelist_entries
        self._cleanup = config.whitelist.cleanup_interval_seconds
        self._rate_config = config.security.knock_rate_limit
        self._layout: Layout = layout_for(self._rate_config)
        self._firewall = firewall
        self._clock = clock
        self.replica = Whitelist()
        self._seq = 0
        self._journal_fd = -1
        self._shm_fd = -1
        self._shm: mmap.mmap | None = None
        self._limiter: RateLimiter | None = None
        self._snapshot_cost = 0.0
        self._next_purge = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._new_locks()

    def _new_locks(self) -> None:
        self._writer = threading.RLock()  # with flock(journal): one writer per service
        self._writer_depth = 0
        self._replica_lock = threading.Lock()  # one thread applies ring records at a time
        self._shm_lock = threading.Lock()  # with flock(shm): the rate table, epochs
        self._sync_lock = threading.Lock()  # one fdatasync at a time in this process

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Create or check the files, load the whitelist (repairing it if needed)."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._open_files()
        except OSError as error:
            raise StorageError(f"cannot open whitelist storage in {self.directory}: "
                               f"{error.strerror}") from error
        started = time.monotonic()
        with self._writing():
            self._reload(repair=True)
        # Until this process has timed a snapshot of its own, loading the whitelist is
        # the best estimate of one (both go through every entry once).
        self._snapshot_cost = time.monotonic() - started
        self._next_purge = self._clock() + self._cleanup
        os.register_at_fork(after_in_child=self._after_fork)

    def _open_files(self) -> None:
        self._journal_fd = os.open(self._journal_path,
                                   os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, _FILE_MODE)
        self._shm_fd = os.open(self._shm_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        size = _HEADER_SIZE + RING_CAPACITY * _RECORD_SIZE + self._layout.size
        fcntl.flock(self._shm_fd, fcntl.LOCK_EX)
        try:
            header = os.pread(self._shm_fd, _HEADER.size, 0)
            wanted = (RING_CAPACITY, self._layout.slots, self._layout.successes,
                      self._layout.failures, self._rate_config.window_seconds)
            if len(header) < _HEADER.size or _HEADER.unpack(header)[:6] != (_MAGIC, *wanted) \
                    or os.fstat(self._shm_fd).st_size != size:
                # New, or left by a service with another rate-limit layout: start afresh.
                os.ftruncate(self._shm_fd, 0)
                os.ftruncate(self._shm_fd, size)
                os.pwrite(self._shm_fd, _HEADER.pack(_MAGIC, *wanted, os.urandom(16), 0,
                                                     float("inf"), 0.0, 0, 0), 0)
            self._shm = mmap.mmap(self._shm_fd, size)
        finally:
            fcntl.flock(self._shm_fd, fcntl.LOCK_UN)
        salt = _HEADER.unpack_from(self._shm, 0)[6]
        ring_end = _HEADER_SIZE + RING_CAPACITY * _RECORD_SIZE
        self._limiter = RateLimiter(self._rate_config, memoryview(self._shm)[ring_end:], salt,
                                    self._layout)

    def _after_fork(self) -> None:
        """In a forked worker: own file descriptions (flock belongs to them, so sharing
        the parent's would let every worker hold the lock at once) and fresh locks."""
        if self._journal_fd < 0:
            return
        self._new_locks()
        os.close(self._journal_fd)
        self._journal_fd = os.open(self._journal_path,
                                   os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, _FILE_MODE)
        os.close(self._shm_fd)
        self._shm_fd = os.open(self._shm_path, os.O_RDWR | os.O_CLOEXEC)
        self._thread = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Start the maintenance thread of this process (purge, snapshots, catch-up)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._maintain, name="knocker-store",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread and leave a current snapshot behind (SIGTERM path)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._journal_fd >= 0:
            try:
                if self._dirty_since() is not None:
                    self._snapshot_now(purge=False, final=True)
            except (OSError, StorageError) as error:
                log.error("final snapshot failed (the journal still holds every knock): %s",
                          error)
            os.close(self._journal_fd)
            os.close(self._shm_fd)
            self._journal_fd = self._shm_fd = -1

    # ------------------------------------------------------------------ /verify
    def allows(self, address: IPAddress, now: float) -> bool:
        """The /verify question; in-memory only."""
        assert self._shm is not None
        if _SEQ.unpack_from(self._shm, _SEQ_OFFSET)[0] != self._seq:
            self._catch_up()
        return self.replica.allows(address, now)

    def entries(self) -> dict[str, int]:
        """entry -> expiry of the whole live whitelist (for the firewall's re-apply)."""
        self._catch_up()
        now = self._clock()
        return {entry_text(k): e for k, e in self.replica.items() if e > now}

    # ------------------------------------------------------------------ rate limits
    def rate_blocked(self, client: bytes, now: float) -> bool:
        if not (self._layout.successes or self._layout.failures):
            return False  # both budgets unlimited: no table, no lock
        with self._rate_table() as limiter:
            return limiter.blocked(client, now)

    def rate_record(self, client: bytes, success: bool, now: float) -> None:
        if not (self._layout.successes if success else self._layout.failures):
            return  # an unlimited budget counts nothing
        with self._rate_table() as limiter:
            limiter.record(client, success, now)

    @contextmanager
    def _rate_table(self) -> Iterator[RateLimiter]:
        assert self._limiter is not None
        with self._shm_locked():
            yield self._limiter

    @contextmanager
    def _shm_locked(self) -> Iterator[None]:
        # One thread lock for every use of flock(shm): threads of one process share the
        # file description, so flock alone would not keep them apart.
        with self._shm_lock:
            fcntl.flock(self._shm_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._shm_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ knocks
    def knock(self, key: Key, ttl: int, now: float) -> KnockResult:
        """Grant `key` for `ttl` seconds: firewall, then disk, then memory. On any
        failure nothing stays granted anywhere (SPEC 1.1 step 8)."""
        entry = entry_text(key)
        with self._writing():
            self._catch_up()
            current = self.replica.expiry(key)
            live = current if current is not None and current > now else None
            expiry = granted_expiry(live, now, ttl)
            victims = self.replica.victims(key, self._capacity, now)
            remaining = max(1, -int((now - expiry) // 1))  # whole seconds, rounded up
            self._firewall.grant(entry, remaining)  # raises: nothing was changed
            changes = [(victim, -1) for victim in victims] + [(key, expiry)]
            try:
                pending = self._persist(changes, now)
            except (OSError, StorageError) as error:
                self._undo_grant(entry, live, now)
                raise StorageError(f"could not persist the whitelist: {error}") from error
            self._publish(changes)
        if pending is not None:
            try:
                self._sync(pending)
            except OSError as error:
                self._revert(key, expiry, live, now)
                raise StorageError(f"could not persist the whitelist: {error}") from error
        evicted = tuple(entry_text(victim) for victim in victims)
        if evicted:
            log.warning("whitelist full (%d entries): evicted %s", self._capacity,
                        ", ".join(evicted))
            self._firewall.revoke(evicted)
        return KnockResult(entry=entry, expires_at=expiry, evicted=evicted)

    def _undo_grant(self, entry: str, previous: int | None, now: float) -> None:
        if previous is None:
            self._firewall.revoke([entry])
            return
        try:
            self._firewall.grant(entry, max(1, previous - int(now)))
        except Exception as error:  # the knock fails either way; say what is left open
            log.error("could not restore the firewall grant of %s: %s", entry, error)

    def _persist(self, changes: list[tuple[Key, int]],
                 now: float) -> tuple[int, int] | None:
        """Write `changes`; on failure leave the files as they were (a knock that is
        refused must not come back at the next start). Small whitelists: whitelist.json
        is rewritten and durable on return (None). Otherwise the changes are appended to
        the journal and durable once _sync() passes the returned (epoch, offset)."""
        if len(self.replica) + 1 <= INLINE_SNAPSHOT_MAX:
            state = self.replica.as_dict(now)
            for key, expiry in changes:
                if expiry < 0:
                    state.pop(entry_text(key), None)
                else:
                    state[entry_text(key)] = expiry
            try:
                self._write_snapshot(state)
            except OSError:
                # The rename may have happened before the failure: put back the state
                # the replica still holds (best effort; the error is raised either way).
                try:
                    self._write_snapshot(self.replica.as_dict(now))
                except OSError as error:
                    log.error("could not restore %s after a failed write: %s", self.path,
                              error)
                raise
            return None
        lines = b"".join(_journal_line(key, expiry) for key, expiry in changes)
        size = os.fstat(self._journal_fd).st_size
        try:
            if os.write(self._journal_fd, lines) != len(lines):
                raise StorageError("short write to the journal")
        except (OSError, StorageError):
            try:
                os.ftruncate(self._journal_fd, size)  # drop what this knock appended
            except OSError as error:
                log.error("could not undo a failed journal append: %s", error)
            raise
        assert self._shm is not None
        if self._dirty_since() is None:
            _FLOAT.pack_into(self._shm, _DIRTY_OFFSET, now)
        return _SYNCED.unpack_from(self._shm, _SYNCED_OFFSET)[0], size + len(lines)

    def _sync(self, pending: tuple[int, int]) -> None:
        """Return once the journal is on disk up to `pending` (epoch, offset).

        Group commit: the writer lock is not held here, so other knocks keep appending
        while one fdatasync runs; whoever syncs next covers them all, and a knock that
        finds the watermark already past its record returns without a syscall. A later
        epoch means a snapshot (fsynced before the truncation) already holds it."""
        epoch, offset = pending
        shm = self._shm
        assert shm is not None
        # This process's threads queue here; processes may sync side by side, and the
        # shared lock is held only to move the watermark, never across the fdatasync
        # (rate-limit checks use it too).
        with self._sync_lock:
            synced_epoch, synced = _SYNCED.unpack_from(shm, _SYNCED_OFFSET)
            if synced_epoch > epoch or (synced_epoch == epoch and synced >= offset):
                return
            target = os.fstat(self._journal_fd).st_size  # everything appended so far
            os.fdatasync(self._journal_fd)
            with self._shm_locked():
                now_epoch, now_synced = _SYNCED.unpack_from(shm, _SYNCED_OFFSET)
                # A truncation meanwhile began a new epoch whose offsets are not ours.
                if now_epoch == synced_epoch and now_synced < target:
                    _SYNCED.pack_into(shm, _SYNCED_OFFSET, synced_epoch, target)

    def _revert(self, key: Key, granted: int, previous: int | None, now: float) -> None:
        """Undo a published grant whose journal record could not be synced (best
        effort: the knock is answered 500 either way)."""
        restore = previous if previous is not None else -1
        with self._writing():
            self._catch_up()
            if self.replica.expiry(key) == granted:  # unless a later knock extended it
                try:
                    os.write(self._journal_fd, _journal_line(key, restore))
                except OSError as error:
                    log.error("could not journal the undo of %s: %s", entry_text(key), error)
                self._publish([(key, restore)])
        self._undo_grant(entry_text(key), previous, now)

    def _dirty_since(self) -> float | None:
        assert self._shm is not None
        since: float = _FLOAT.unpack_from(self._shm, _DIRTY_OFFSET)[0]
        return since or None

    def _publish(self, changes: list[tuple[Key, int]]) -> None:
        """Apply to this replica and to the ring, then bump the shared sequence."""
        shm = self._shm
        assert shm is not None
        with self._replica_lock:
            seq = self._seq
            for key, expiry in changes:
                version, plen, value = key
                offset = _HEADER_SIZE + (seq % RING_CAPACITY) * _RECORD_SIZE
                _RECORD.pack_into(shm, offset, seq, expiry, version, plen,
                                  value.to_bytes(16, "big"))
                self._apply(key, expiry)
                seq += 1
            _SEQ.pack_into(shm, _SEQ_OFFSET, seq)
            self._seq = seq

    def _apply(self, key: Key, expiry: int) -> None:
        if expiry < 0:
            self.replica.remove(key)
        else:
            self.replica.set(key, expiry)

    def _catch_up(self) -> None:
        """Apply ring records other processes published since we last looked."""
        shm = self._shm
        assert shm is not None
        with self._replica_lock:
            target = _SEQ.unpack_from(shm, _SEQ_OFFSET)[0]
            start = self._seq
            if target == start:
                return
            if not start < target <= start + RING_CAPACITY:
                self._overrun(target)
                return
            for seq in range(start, target):
                offset = _HEADER_SIZE + (seq % RING_CAPACITY) * _RECORD_SIZE
                stamp, expiry, version, plen, value = _RECORD.unpack_from(shm, offset)
                if stamp != seq:
                    self._overrun(target)
                    return
                self._apply((version, plen, int.from_bytes(value, "big")), expiry)
            if _SEQ.unpack_from(shm, _SEQ_OFFSET)[0] >= start + RING_CAPACITY:
                self._overrun(target)  # a writer lapped us while we read
                return
            self._seq = target

    def _overrun(self, target: int) -> None:
        """This replica fell more than a ring behind: rebuild it from disk (rare; the
        maintenance thread keeps every process within a fraction of a second)."""
        log.warning("replica fell behind the shared ring; reloading from disk")
        self._replica_lock.release()
        try:
            with self._writing():
                self._reload(repair=False)
        finally:
            self._replica_lock.acquire()

    # ------------------------------------------------------------------ disk
    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The service-wide writer lock; re-entrant within a thread (a knock that finds
        its replica overrun reloads under the lock it already holds)."""
        with self._writer:
            if self._writer_depth == 0:
                fcntl.flock(self._journal_fd, fcntl.LOCK_EX)
            self._writer_depth += 1
            try:
                yield
            finally:
                self._writer_depth -= 1
                if self._writer_depth == 0:
                    fcntl.flock(self._journal_fd, fcntl.LOCK_UN)

    def _reload(self, repair: bool) -> None:
        """Snapshot + journal -> replica (under the writer lock, so it matches the ring)."""
        now = self._clock()
        replica, dropped = self._read_snapshot(now, repair)
        journal_entries, torn = self._read_journal()
        for key, expiry in journal_entries:
            if expiry < 0:
                replica.remove(key)
            elif expiry > now:
                replica.extend(key, expiry)
        with self._replica_lock:
            self.replica = replica  # one reference swap: readers never see it half-built
            assert self._shm is not None
            self._seq = _SEQ.unpack_from(self._shm, _SEQ_OFFSET)[0]
        if repair and (journal_entries or torn or dropped):
            # Fold the journal into a fresh snapshot, without the expired and invalid
            # entries, so every process starts from one clean file.
            self._write_snapshot(self.replica.as_dict(now))
        elif repair:
            assert self._shm is not None
            _FLOAT.pack_into(self._shm, _SOONEST_OFFSET, replica.soonest)

    def _read_snapshot(self, now: float, repair: bool) -> tuple[Whitelist, bool]:
        """The whitelist in whitelist.json, and whether the file held entries that were
        dropped (expired or invalid) or was unreadable."""
        replica = Whitelist()
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return replica, False
        except OSError as error:
            raise StorageError(f"cannot read {self.path}: {error.strerror}") from error
        try:
            try:  # Knocker's own layout is read without building a JSON object
                seen, problems = load_entries(canonical_pairs(raw), now, replica)
            except NotCanonical:
                replica = Whitelist()
                data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
                if not isinstance(data, dict):
                    raise ValueError(  # noqa: B904 - the layout check is not the cause
                        f"expected a JSON object, found {type(data).__name__}")
                seen, problems = load_entries(data.items(), now, replica)
        except (UnicodeDecodeError, ValueError) as error:
            if not repair:
                raise StorageError(f"{self.path} is not a whitelist: {error}") from error
            aside = f"{self.path}.corrupt-{int(now)}"
            os.replace(self.path, aside)
            log.error("%s is not a valid whitelist (%s); moved it to %s and starting empty",
                      self.path, error, aside)
            return Whitelist(), True
        for problem in problems[:20]:
            log.warning("skipping whitelist entry %s", problem)
        if len(problems) > 20:
            log.warning("skipped %d more invalid whitelist entries", len(problems) - 20)
        return replica, len(replica) != seen

    def _read_journal(self) -> tuple[list[tuple[Key, int]], bool]:
        with open(self._journal_path, "rb") as handle:
            data = handle.read()
        records: list[tuple[Key, int]] = []
        lines = data.split(b"\n")
        torn = lines.pop() != b""  # the text after the last newline: a torn append
        for number, line in enumerate(lines, 1):
            record = _parse_journal_line(line)
            if record is None:
                log.error("journal %s: line %d is damaged; ignoring it and what follows",
                          self._journal_path, number)
                return records, True
            records.append(record)
        return records, torn

    def _write_snapshot(self, state: dict[str, int] | None, now: float = 0.0) -> None:
        """Atomically replace whitelist.json with `state`, then empty the journal.
        state None: the replica's entries expiring after `now`, rendered piece by piece
        (at 100,000 entries a dict of their texts and its JSON would be tens of MB)."""
        started = time.monotonic()
        soonest = [inf]
        pieces: Iterable[bytes]
        if state is None:
            pieces = self.replica.json_pieces(now, soonest)
        else:
            pieces = [json.dumps(state, separators=(", ", ": ")).encode("utf-8")]
            soonest[0] = float(min(state.values(), default=inf))
        temp = os.path.join(self.directory,
                            f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            os.unlink(temp)
            raise
        finally:
            os.close(fd)
        os.replace(temp, self.path)  # rename(2) is atomic within one filesystem
        _fsync_directory(self.directory)
        # Only now may the journal go: the snapshot holds everything it held.
        os.ftruncate(self._journal_fd, 0)
        os.fsync(self._journal_fd)
        assert self._shm is not None
        with self._shm_locked():  # a new journal epoch: everything before is durable
            epoch = _SYNCED.unpack_from(self._shm, _SYNCED_OFFSET)[0]
            _SYNCED.pack_into(self._shm, _SYNCED_OFFSET, epoch + 1, 0)
        _FLOAT.pack_into(self._shm, _DIRTY_OFFSET, 0.0)
        _FLOAT.pack_into(self._shm, _SOONEST_OFFSET, soonest[0])
        self._snapshot_cost = time.monotonic() - started

    def writable_problem(self) -> str | None:
        """None when the storage can take a knock, else why not (for /ready)."""
        if self._journal_fd < 0:
            return "whitelist storage is closed"
        if not os.access(self.directory, os.W_OK):
            return f"{self.directory} is not writable"
        for path in (self.path, self._journal_path):
            if os.path.exists(path) and not os.access(path, os.W_OK):
                return f"{path} is not writable"
        return None

    # ------------------------------------------------------------------ maintenance
    def _maintain(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self.tick(self._clock())
            except Exception:  # the thread must outlive any one failure
                log.exception("whitelist maintenance failed")

    def tick(self, now: float) -> None:
        """One maintenance step: catch up, purge on schedule, snapshot when due."""
        self._catch_up()
        if now >= self._next_purge:
            self._next_purge = now + self._cleanup
            with self._replica_lock:
                gone = self.replica.expired(now)
                for key in gone:
                    self.replica.remove(key)
            if self._file_soonest() <= now and self._snapshot_now(purge=True) and gone:
                # The process that purged the file closes the firewall holes (their
                # firewalld timeouts have normally closed them already).
                log.info("purged %d expired entries", len(gone))
                self._firewall.revoke([entry_text(key) for key in gone])
        if self._snapshot_due(now):
            self._snapshot_now(purge=False)

    def _snapshot_due(self, now: float) -> bool:
        # A big snapshot holds the writer lock for its whole cost (hundreds of ms at
        # 100,000 entries): space them so knocks wait behind one at most ~5 % of the time.
        dirty = self._dirty_since()
        return dirty is not None and now - dirty >= max(MIN_SNAPSHOT_DELAY,
                                                         20 * self._snapshot_cost)

    def _file_soonest(self) -> float:
        assert self._shm is not None
        soonest: float = _FLOAT.unpack_from(self._shm, _SOONEST_OFFSET)[0]
        return soonest

    def _snapshot_now(self, purge: bool, final: bool = False) -> bool:
        """Rewrite whitelist.json if still due; False when another process did it.
        final: whenever the journal holds anything (SIGTERM), however recent."""
        with self._writing():
            self._catch_up()
            now = self._clock()
            # Re-checked under the lock: another worker may have written one while we
            # waited; then the journal holds only the knocks since, and they can wait.
            if purge:
                due = self._file_soonest() <= now
            else:
                due = self._dirty_since() is not None if final else self._snapshot_due(now)
            if not due:
                return False
            started = time.monotonic()
            self._write_snapshot(None, now)
            # The whole cost, rendering the entries included, is what knocks wait for.
            self._snapshot_cost = time.monotonic() - started
        if len(self.replica) > INLINE_SNAPSHOT_MAX:
            release_free_memory()  # what rendering a big snapshot allocated
        return True


def release_free_memory() -> None:
    """Give freed heap back to the kernel (glibc malloc_trim(3)); elsewhere a no-op.
    CPython frees big buffers but glibc keeps the pages, so a worker that once rendered
    a 100,000-entry snapshot would stay that big."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def _journal_line(key: Key, expiry: int) -> bytes:
    body = f"- {entry_text(key)}" if expiry < 0 else f"+ {entry_text(key)} {expiry}"
    return f"{body} {zlib.crc32(body.encode()):08x}\n".encode()


def _parse_journal_line(line: bytes) -> tuple[Key, int] | None:
    body, _, crc = line.rpartition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        fields = body.decode("ascii").split(" ")
    except ValueError:
        return None
    if fields[0] == "-" and len(fields) == 2:
        key, expiry = parse_entry(fields[1]), -1
    elif fields[0] == "+" and len(fields) == 3 and fields[2].isdigit():
        key, expiry = parse_entry(fields[1]), int(fields[2])
    else:
        return None
    return None if key is None else (key, expiry)


def _fsync_directory(directory: str) -> None:
    """fsync(2) the directory so the rename itself survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems refuse
            raise
    finally:
        os.close(fd)
