"""Edge: FileStore, the whitelist backend kept in files next to `whitelist.storage_path`.

Owns the protocol between the three files and the worker processes: whitelist.json
(snapshot.py), whitelist.json.journal (journal.py) and whitelist.json.shm (shm.py).

A knock appends to the journal and is fsynced (group commit) before it is answered;
that is what makes it durable. It is also written to the shared ring and the sequence
number bumped, so /verify in any worker compares one integer in memory and, when it
moved, applies the new records to its replica: /verify never parses a file, and a knock
answered by one worker is seen by every worker on its very next request. whitelist.json
is rewritten from the replica in the background (about a second behind; for a big
whitelist 20 times what one snapshot costs), which then empties the journal.
Writers (knocks, evictions, snapshots) serialise on the journal's writer lock; /verify
takes no lock unless it has records to apply. firewall.grant runs under the writer lock,
which /verify never needs.

Under gevent (an `offload` given), a worker's requests share one event loop with the
maintenance greenlet: a snapshot's render and write (100-300 ms at 100,000 entries) run
in a real thread through `offload`, and a wait for another process's writer lock sleeps
instead of blocking in flock, so /verify keeps being answered meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from math import inf

from ..addresses import IPAddress
from ..config import Config
from ..errors import StorageError
from ..firewall import Firewall
from ..ratelimit import Outcome, RateLimiter, layout_for
from ..whitelist import Key, Whitelist, entry_text, granted_expiry, live_expiry, parse_entry
from .backend import KnockResult
from .files import check_directory
from .formats import REMOVED, decode_journal, encode_whitelist, journal_line, json_pieces
from .grant_format import Grant, Plan, encode_grants, grant_line, revoke_line
from .grantlog import GrantLog
from .journal import Journal
from .plans import PlanFirewall, plan_targets
from .shm import SharedMemory
from .snapshot import SnapshotFile

log = logging.getLogger("knocker.store")

RING_CAPACITY = 65536  # changes a replica may fall behind before it reloads from disk
SNAPSHOT_DELAY = 1.0  # seconds whitelist.json may lag behind the journal (small lists)
SNAPSHOT_SPACING = 20  # a big snapshot waits this many times its own cost, at least
MIN_FREE_BYTES = 64 << 10  # below this much free space (plus a snapshot's), not ready
TRIM_ABOVE = 2000  # entries above which a snapshot gives its memory back (malloc_trim)
TICK = 0.25  # maintenance period: keeps replicas well inside the ring

Offload = Callable[[Callable[[], None]], None]


def _in_place(work: Callable[[], None]) -> None:
    work()


def _sleep(seconds: float) -> None:
    # Looked up at each call, not bound at import: under gevent, cli.py patches the time
    # module after this one was imported, and a real sleep would stop the event loop.
    time.sleep(seconds)


class FileStore:
    """The whitelist of one service, shared by its processes through the files above.
    Fully open once built; `start()` in each serving process, `close()` once."""

    def __init__(
        self,
        config: Config,
        firewall: Firewall,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = _sleep,
        ring_capacity: int = RING_CAPACITY,
        snapshot_delay: float = SNAPSHOT_DELAY,
        tick: float = TICK,
        offload: Offload | None = None,
    ) -> None:
        """offload: how to run blocking work off an event loop (gevent: its thread pool);
        given, a snapshot is rendered and written through it, and the writer lock is
        waited for by polling with `sleep`. None (threads): both in the calling thread."""
        self.location = os.path.abspath(config.whitelist.storage_path)
        self.directory = os.path.dirname(self.location)
        self._capacity = config.security.max_whitelist_entries
        self._cleanup = config.whitelist.cleanup_interval_seconds
        self._firewall = firewall
        self._plans = PlanFirewall(firewall, tuple(map(str, config.firewalld.monitored_ports)))
        # `_sleep` looks time.sleep up at each call: under gevent it is the patched one
        self._clock, self._monotonic, self._sleep = clock, monotonic, sleep
        self._snapshot_delay = snapshot_delay
        self._tick = tick
        self._offload = offload or _in_place
        rate = config.security.knock_rate_limit
        self._rate_layout = layout_for(rate)
        self._snapshot = SnapshotFile(self.location)
        self._grant_log = GrantLog(self.location + ".grants")
        # key name -> that key's scoped grants, indexed like the whitelist; rebuilt from
        # the grants log (scoped grants never enter the replica or whitelist.json)
        self._scoped: dict[str, Whitelist] = {}
        self._scoped_lock = threading.Lock()
        try:
            os.makedirs(self.directory, exist_ok=True)
            check_directory(self.directory)
            self._shm = SharedMemory(
                self.location + ".shm", ring_capacity, self._rate_layout, rate.window_seconds
            )
        except OSError as error:
            raise StorageError(
                f"cannot open whitelist storage in {self.directory}: {error.strerror}"
            ) from error
        try:
            self._journal = Journal(
                self.location + ".journal", self._shm, wait=None if offload is None else sleep
            )
        except BaseException:
            self._shm.close()
            raise
        self._limiter = RateLimiter(rate, self._shm.rate_table, self._shm.salt, self._rate_layout)
        self.replica = Whitelist()
        self._seq = 0
        self._replica_lock = threading.Lock()  # one thread applies ring records at a time
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        started = monotonic()
        try:
            with self._journal.writing():
                self._reload(repair=True)
        except OSError as error:
            self._release()
            raise StorageError(
                f"cannot load the whitelist in {self.directory}: {error.strerror}"
            ) from error
        except BaseException:
            self._release()
            raise
        # Until this process has timed a snapshot of its own, loading the whitelist is
        # the best estimate of one (both go through every entry once).
        self._snapshot_cost = monotonic() - started
        self._next_purge = clock() + self._cleanup

    def __len__(self) -> int:
        return len(self.replica)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start this process's maintenance thread (purge, snapshots, catch-up). In a
        process forked after the store was built (gunicorn's preload), first take file
        descriptions and locks of its own: flock belongs to the description."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._journal.reopen()
            self._shm.reopen()
            self._replica_lock = threading.Lock()
            self._stop = threading.Event()
            self._thread = None
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(
                target=self._maintain, name="knocker-store", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the thread, leave a current snapshot behind (SIGTERM, SIGHUP), and
        release the files and the map. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            if self._dirty_since() is not None:
                self._snapshot_now(purge=False, final=True)
        except (OSError, StorageError) as error:
            log.error("final snapshot failed (the journal still holds every knock): %s", error)
        self._release()

    def _release(self) -> None:
        self._closed = True
        self._journal.close()
        self._shm.close()

    def ready(self) -> str | None:
        """None when the storage can take a knock, else why not (for /ready): the
        files writable, and room on their filesystem for knocks and for one more
        snapshot beside the current one."""
        if self._closed:
            return "whitelist storage is closed"
        if not os.access(self.directory, os.W_OK):
            return f"{self.directory} is not writable"
        for path in (self.location, self._journal.path, self._grant_log.path):
            if os.path.exists(path) and not os.access(path, os.W_OK):
                return f"{path} is not writable"
        try:
            fs = os.statvfs(self.directory)
            snapshot = os.stat(self.location).st_size if os.path.exists(self.location) else 0
        except OSError as error:
            return f"{self.directory}: {error.strerror}"
        free = fs.f_bavail * fs.f_frsize
        if free < MIN_FREE_BYTES + snapshot:
            return f"the filesystem of {self.directory} is full ({free} bytes free)"
        return None

    # ------------------------------------------------------------------ /verify
    def allows(self, address: IPAddress, now: float) -> bool:
        """The /verify question; in-memory only."""
        if self._shm.header.seq != self._seq:
            self._catch_up()
        return self.replica.allows(address, now)

    def entries(self) -> dict[str, int]:
        """entry -> expiry of the whole live whitelist (for the firewall's re-apply)."""
        self._catch_up()
        now = self._clock()
        live = {entry_text(k): e for k, e in self.replica.items() if e > now}
        # Scoped grants open the firewall too (they are only kept out of whitelist.json).
        try:
            self._refresh_grants()
        except StorageError as error:
            log.error("grants log unreadable: %s", error)
        for entry, grants in self._grant_log.all().items():
            if any(g.scoped and g.expires_at > now for g in grants.values()):
                # Its unscoped time joins the plan: one target, or one per port.
                live.update(
                    plan_targets(
                        entry, self._plans.plan(live.pop(entry, None), grants.values(), now)
                    )
                )
        return live

    # ------------------------------------------------------------------ rate limits
    def rate_reserve(self, client: bytes, now: float) -> bool:
        if not (self._rate_layout.successes or self._rate_layout.failures):
            return True  # both budgets unlimited: no table, no lock
        with self._shm.lock():  # one critical section across every worker
            return self._limiter.reserve(client, now)

    def rate_settle(self, client: bytes, outcome: Outcome, now: float) -> None:
        if not (self._rate_layout.successes or self._rate_layout.failures):
            return
        with self._shm.lock():
            self._limiter.settle(client, outcome, now)

    # ------------------------------------------------------------------ knocks
    def knock(
        self,
        key: Key,
        ttl: int,
        now: float,
        key_name: str | None = None,
        how: str = "knock",
        scoped: bool = False,
        ports: tuple[str, ...] = (),
    ) -> KnockResult:
        """Grant `key` for `ttl` seconds: firewall, then disk, then memory. On any
        failure nothing stays granted anywhere (docs/api.md#order-of-checks). With
        `key_name` the grant is also recorded in the grants log (who, when, how); a
        `scoped` grant is recorded there only."""
        if scoped and key_name is not None:
            return self._knock_scoped(key, ttl, now, key_name, how, ports)
        entry = entry_text(key)
        noted: int | None = None
        with self._journal.writing():
            self._catch_up()
            live = live_expiry(self.replica.expiry(key), now)
            expiry = granted_expiry(live, now, ttl)
            victims = self.replica.victims(key, self._capacity, now)
            # The firewall keeps an entry open for its longest grant, scoped ones included.
            self._refresh_grants()
            before = self._plan(entry, now)
            after = self._plans.plan(expiry, self._grant_log.of(entry).values(), now)
            self._plans.open_all_or_nothing(entry, after, before, now)  # raises: nothing changed
            changes = [(victim, REMOVED) for victim in victims] + [(key, expiry)]
            try:
                pending = self._persist(changes, now)
            except (OSError, StorageError) as error:
                self._plans.settle_to(entry, before, now)
                raise StorageError(f"could not persist the whitelist: {error}") from error
            self._publish(changes)
            if key_name is not None:
                noted = self._note_grant(entry, key_name, ttl, how, now)
            evicted = tuple(entry_text(victim) for victim in victims)
            # An evicted entry keeps what its scoped grants allow (under the lock: a
            # plan applied after a concurrent revoke could reopen what it closed).
            kept = [e for e in evicted if any(g.scoped for g in self._grant_log.of(e).values())]
            for victim in kept:
                self._plans.settle_to(victim, self._plan(victim, now), now)
        try:
            self._journal.sync(pending)
        except OSError as error:
            self._revert(key, expiry, live, now)
            raise StorageError(f"could not persist the whitelist: {error}") from error
        if noted is not None:
            try:
                self._grant_log.sync(noted)
            except StorageError as error:  # the grant stands; only its record may be lost
                log.error("grant of %s by %s not recorded: %s", entry, key_name, error)
        if evicted:
            log.warning(
                "whitelist full (%d entries): evicted %s", self._capacity, ", ".join(evicted)
            )
            self._firewall.revoke([e for e in evicted if e not in kept])
        return KnockResult(
            entry=entry, expires_at=expiry, evicted=evicted, extended=live is not None
        )

    # ------------------------------------------------------------------ grants
    def _knock_scoped(
        self, key: Key, ttl: int, now: float, key_name: str, how: str, ports: tuple[str, ...]
    ) -> KnockResult:
        """A scoped key's grant (hosts:, ports:): firewall (its ports only), then the
        grants log (fsynced), then this process's scoped index; other processes see it
        at their next scoped lookup."""
        entry = entry_text(key)
        with self._journal.writing():
            self._catch_up()
            if self._grant_log.due():
                self._compact_grants(now)
            self._refresh_grants()
            victims = self._scoped_victims(entry, key_name, now)
            live = live_expiry(self._own_grant(entry, key_name, scoped=True), now)
            expiry = granted_expiry(live, now, ttl)
            grant = Grant(entry, key_name, expiry, int(now), how, scoped=True, ports=ports)
            before = self._plan(entry, now)
            after = self._plans.plan(
                self._unscoped_expiry(key, now),
                [*(g for g in self._grant_log.of(entry).values() if g.key_name != key_name), grant],
                now,
            )
            self._plans.open_all_or_nothing(entry, after, before, now)  # raises: nothing changed
            lines = b"".join(revoke_line(v.entry, v.key_name) for v in victims)
            try:
                noted = self._grant_log.append(lines + grant_line(grant))
                self._grant_log.sync(noted)
            except StorageError:
                self._plans.settle_to(entry, before, now)
                raise
            self._refresh_grants()
            # An evicted grant's entry keeps what its other grants allow.
            for gone in dict.fromkeys(v.entry for v in victims if v.entry != entry):
                self._plans.settle_to(gone, self._plan(gone, now), now)
        evicted = tuple(f"{v.entry} ({v.key_name})" for v in victims)
        if evicted:
            log.warning("scoped grants full (%d): evicted %s", self._capacity, ", ".join(evicted))
        return KnockResult(entry=entry, expires_at=expiry, evicted=tuple(v.entry for v in victims))

    # ------------------------------------------------------------------ firewall plans
    def _plan(self, entry: str, now: float) -> Plan:
        """What the firewall should hold for `entry` now (writer lock held, grants log
        refreshed): every grant of it, each on its own ports."""
        key = parse_entry(entry)
        unscoped = None if key is None else self._unscoped_expiry(key, now)
        return self._plans.plan(unscoped, self._grant_log.of(entry).values(), now)

    def _unscoped_expiry(self, key: Key, now: float) -> int | None:
        return live_expiry(self.replica.expiry(key), now)

    def _own_grant(self, entry: str, key_name: str, scoped: bool) -> int | None:
        """The expiry of `key_name`'s recorded grant of `entry` of that kind (None: none)."""
        earlier = self._grant_log.of(entry).get(key_name)
        return earlier.expires_at if earlier is not None and earlier.scoped == scoped else None

    def _scoped_victims(self, entry: str, key_name: str, now: float) -> list[Grant]:
        """Scoped grants to evict so that this one keeps them within
        security.max_whitelist_entries: the soonest-expiring first. A cheap count
        first; the O(n) pass only when the scoped grants are full."""
        if (
            self._grant_log.of(entry).get(key_name) is not None
            or sum(map(len, self._scoped.values())) < self._capacity
        ):
            return []
        with self._scoped_lock:  # the count included expired grants: drop them now
            for table in self._scoped.values():
                for gone in table.expired(now):
                    table.remove(gone)
        live = sorted(
            (
                g
                for grants in self._grant_log.all().values()
                for g in grants.values()
                if g.scoped and g.expires_at > now
            ),
            key=lambda g: g.expires_at,
        )
        return live[: max(0, len(live) - self._capacity + 1)]

    def scoped_allows(self, address: IPAddress, key_names: tuple[str, ...], now: float) -> bool:
        """/verify for host-scoped grants: has one of `key_names` a live grant covering
        `address`? One stat of the grants log, then hash lookups."""
        if self._grant_log.stale():
            try:
                self._refresh_grants()
            except StorageError as error:  # fail closed: only what is already known
                log.error("grants log unreadable: %s", error)
        scoped = self._scoped
        for name in key_names:
            grants = scoped.get(name)
            if grants is not None and grants.allows(address, now):
                return True
        return False

    def _refresh_grants(self) -> None:
        """Bring the grants log's index and the scoped grants up to date."""
        with self._scoped_lock:
            touched = self._grant_log.refresh()
            if touched is None:
                rebuilt: dict[str, Whitelist] = {}
                for grants in self._grant_log.all().values():
                    for grant in grants.values():
                        self._index_scoped(rebuilt, grant)
                self._scoped = rebuilt  # one reference swap: readers never see it half-built
                return
            for entry, name in touched:
                key = parse_entry(entry)
                if key is None:
                    continue
                for holder in [name] if name is not None else list(self._scoped):
                    table = self._scoped.get(holder)
                    if table is not None:
                        table.remove(key)
                current = self._grant_log.of(entry).get(name) if name is not None else None
                if current is not None:
                    self._index_scoped(self._scoped, current)

    @staticmethod
    def _index_scoped(into: dict[str, Whitelist], grant: Grant) -> None:
        key = parse_entry(grant.entry)
        if grant.scoped and grant.key_name is not None and key is not None:
            into.setdefault(grant.key_name, Whitelist()).set(key, grant.expires_at)

    def _scoped_left(self, entry: str, now: float) -> int:
        """Whole seconds the longest live scoped grant of `entry` has left (0: none)."""
        if not self._scoped and not self._grant_log.stale():
            return 0
        self._refresh_grants()
        until = max(
            (
                g.expires_at
                for g in self._grant_log.of(entry).values()
                if g.scoped and g.expires_at > now
            ),
            default=None,
        )
        return 0 if until is None else max(1, math.ceil(until - now))

    def _note_grant(self, entry: str, key_name: str, ttl: int, how: str, now: float) -> int | None:
        """Record `key_name`'s grant of `entry` in the grants log (under the writer
        lock): its own expiry, never shorter than its earlier live grant. The descriptor
        to sync, or None when it could not be written (logged: the grant itself stands,
        listed as restored)."""
        try:
            if self._grant_log.due():
                self._compact_grants(now)
            self._refresh_grants()
            live = live_expiry(self._own_grant(entry, key_name, scoped=False), now)
            grant = Grant(entry, key_name, granted_expiry(live, now, ttl), int(now), how)
            return self._grant_log.append(grant_line(grant))
        except (OSError, StorageError) as error:
            log.error("grant of %s by %s not recorded: %s", entry, key_name, error)
            return None

    def _grants_by_entry(self, now: float) -> dict[str, list[Grant]]:
        """Every live grant, per entry (under the writer lock, replica caught up). An
        entry that runs longer than every recorded grant of it (an upstream file, a
        lost record) has a `restored` grant for the difference."""
        self._refresh_grants()
        result: dict[str, list[Grant]] = {}
        for key, expiry in self.replica.items():
            if expiry > now:
                entry = entry_text(key)
                result[entry] = self._unscoped_grants(entry, expiry, now)
        for entry, grants in self._grant_log.all().items():
            scoped = [g for g in grants.values() if g.scoped and g.expires_at > now]
            if scoped:
                result.setdefault(entry, []).extend(scoped)
        return result

    def _unscoped_grants(self, entry: str, expiry: int, now: float) -> list[Grant]:
        grants = [
            g
            for g in self._grant_log.of(entry).values()
            if not g.scoped and now < g.expires_at <= expiry
        ]
        if not grants or expiry > max(g.expires_at for g in grants):
            grants.append(Grant(entry, None, expiry, None, "restored"))
        return grants

    def _grants_of(self, key: Key, now: float) -> list[Grant]:
        """_grants_by_entry for one entry: hash lookups, not a pass over all."""
        entry = entry_text(key)
        self._refresh_grants()
        expiry = self.replica.expiry(key)
        grants = (
            [] if expiry is None or expiry <= now else self._unscoped_grants(entry, expiry, now)
        )
        return grants + [
            g for g in self._grant_log.of(entry).values() if g.scoped and g.expires_at > now
        ]

    def _compact_grants(self, now: float) -> None:
        grants = self._grants_by_entry(now)
        self._grant_log.rewrite(
            encode_grants(
                g
                for entry_grants in grants.values()
                for g in entry_grants
                if g.key_name is not None
            )
        )

    def grants(self, now: float) -> list[Grant]:
        """Every live grant (GET /grants), ordered by entry then key name."""
        with self._journal.writing():
            self._catch_up()
            by_entry = self._grants_by_entry(now)
        return sorted(
            (g for grants in by_entry.values() for g in grants),
            key=lambda g: (g.entry, g.key_name or "", g.scoped),
        )

    def revoke(self, key: Key, key_name: str | None, now: float) -> list[Grant]:
        """End the grants of `key` made by `key_name` (None: every grant of it) in
        memory, on disk and in the firewall before returning; the grants it ended
        (empty: there were none). The entry stays for as long as another grant of it
        runs. Raises StorageError with nothing changed."""
        entry = entry_text(key)
        pending: tuple[int, int] | None = None
        with self._journal.writing():
            self._catch_up()
            grants = self._grants_of(key, now)
            ended = [g for g in grants if key_name is None or g.key_name == key_name]
            if not ended:
                return []
            others = [g for g in grants if g not in ended]
            if any(not g.scoped for g in ended):
                keep = max((g.expires_at for g in others if not g.scoped), default=None)
                changes = [(key, REMOVED)] + ([] if keep is None else [(key, keep)])
                try:
                    pending = self._persist(changes, now)
                except (OSError, StorageError) as error:
                    raise StorageError(f"could not persist the whitelist: {error}") from error
                self._publish(changes)
            try:
                noted: int | None = self._grant_log.append(revoke_line(entry, key_name))
            except StorageError as error:
                if pending is None:  # a scoped grant lives in the log alone
                    raise
                noted = None
                log.error("revocation of %s not recorded in the grants log: %s", entry, error)
            self._refresh_grants()
            # Cut back to what the remaining grants allow, port by port.
            self._plans.settle_to(entry, self._plan(entry, now), now)
        try:
            if pending is not None:
                self._journal.sync(pending)
            if noted is not None:
                self._grant_log.sync(noted)
        except (OSError, StorageError) as error:
            raise StorageError(f"could not persist the whitelist: {error}") from error
        return ended

    def _persist(self, changes: list[tuple[Key, int]], now: float) -> tuple[int, int]:
        """Append `changes` to the journal; they are durable once Journal.sync() passes
        the returned (epoch, offset). On failure the journal is as it was (a knock that
        is refused must not come back at the next start). whitelist.json follows within
        about a second (tick)."""
        pending = self._journal.append(b"".join(journal_line(k, e) for k, e in changes))
        if self._dirty_since() is None:
            self._shm.header.dirty_since = now
        return pending

    def _revert(self, key: Key, granted: int, previous: int | None, now: float) -> None:
        """Undo a published grant whose journal record could not be synced (best
        effort: the knock is answered 500 either way)."""
        restore = previous if previous is not None else REMOVED
        with self._journal.writing():
            self._catch_up()
            if self.replica.expiry(key) == granted:  # unless a later knock extended it
                try:
                    self._journal.append(journal_line(key, restore))
                except (OSError, StorageError) as error:
                    log.error("could not journal the undo of %s: %s", entry_text(key), error)
                self._publish([(key, restore)])
            self._refresh_grants()
            self._plans.settle_to(entry_text(key), self._plan(entry_text(key), now), now)

    def _dirty_since(self) -> float | None:
        since: float = self._shm.header.dirty_since
        return since or None

    # ------------------------------------------------------------------ the ring
    def _publish(self, changes: list[tuple[Key, int]]) -> None:
        """Apply to this replica and to the ring, then bump the shared sequence."""
        with self._replica_lock:
            seq = self._seq
            for key, expiry in changes:
                self._shm.write_record(seq, key, expiry)
                self._apply(key, expiry)
                seq += 1
            self._shm.header.seq = seq
            self._seq = seq

    def _apply(self, key: Key, expiry: int) -> None:
        if expiry < 0:
            self.replica.remove(key)
        else:
            self.replica.set(key, expiry)

    def _catch_up(self) -> None:
        """Apply ring records other processes published since we last looked."""
        shm = self._shm
        capacity = shm.ring_capacity
        with self._replica_lock:
            target = shm.header.seq
            start = self._seq
            if target == start:
                return
            if not start < target <= start + capacity:
                self._overrun()
                return
            for seq in range(start, target):
                stamp, key, expiry = shm.read_record(seq)
                if stamp != seq:
                    self._overrun()
                    return
                self._apply(key, expiry)
            if shm.header.seq >= start + capacity:
                self._overrun()  # a writer lapped us while we read
                return
            self._seq = target

    def _overrun(self) -> None:
        """This replica fell more than a ring behind: rebuild it from disk (rare; the
        maintenance thread keeps every process within a fraction of a second)."""
        log.warning("replica fell behind the shared ring; reloading from disk")
        self._replica_lock.release()
        try:
            with self._journal.writing():
                self._reload(repair=False)
        finally:
            self._replica_lock.acquire()

    # ------------------------------------------------------------------ disk
    def _reload(self, repair: bool) -> None:
        """Snapshot + journal -> replica (under the writer lock, so it matches the ring).
        With repair (startup): fold a journal into a fresh snapshot, keeping a damaged
        journal aside first."""
        now = self._clock()
        replica, dropped = self._snapshot.load(now, repair)
        journal = decode_journal(self._journal.read())
        if journal.damaged:
            log.error(
                "journal %s: damaged line(s) %s skipped",
                self._journal.path,
                ", ".join(map(str, journal.damaged[:20])),
            )
        for key, expiry in journal.records:
            if expiry < 0:
                replica.remove(key)
            elif expiry > now:
                replica.extend(key, expiry)
        with self._replica_lock:
            self.replica = replica  # one reference swap: readers never see it half-built
            self._seq = self._shm.header.seq
        if not repair:
            return
        if journal.damaged:
            aside = self._journal.keep_aside(str(int(now)))
            log.error(
                "journal %s needed repair; its old content is kept in %s", self._journal.path, aside
            )
        if journal.records or journal.needs_repair or dropped:
            # Fold the journal into a fresh snapshot, without the expired and invalid
            # entries, so every process starts from one clean file.
            self._write_snapshot(self.replica.as_dict(now))
        else:
            self._shm.header.soonest = replica.soonest

    def _write_snapshot(
        self, state: dict[str, int] | None, now: float = 0.0, run: Offload = _in_place
    ) -> None:
        """Atomically replace whitelist.json with `state`, then empty the journal.
        state None: the replica's entries expiring after `now`, rendered piece by piece
        (at 100,000 entries a dict of their texts and its JSON would be tens of MB), the
        render and the write through `run`. The replica holds still meanwhile: changes
        come only from writers, and the caller holds the writer lock."""
        started = self._monotonic()
        soonest = [inf]
        if state is None:
            pieces = json_pieces(self.replica, now, soonest)
            run(lambda: self._snapshot.write(pieces))
        else:
            self._snapshot.write([encode_whitelist(state)])
            soonest[0] = float(min(state.values(), default=inf))
        # Only now may the journal go: the snapshot holds everything it held.
        self._journal.truncate()
        header = self._shm.header
        header.dirty_since = 0.0
        header.soonest = soonest[0]
        self._snapshot_cost = self._monotonic() - started

    # ------------------------------------------------------------------ maintenance
    def _maintain(self) -> None:
        while not self._stop.is_set():
            self._sleep(self._tick)
            if self._stop.is_set():
                return
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
            if self._shm.header.soonest <= now and self._snapshot_now(purge=True) and gone:
                # The process that purged the file closes the firewall holes (their
                # firewalld timeouts have normally closed them already).
                log.info("purged %d expired entries", len(gone))
                # ... except where a scoped grant of the entry still runs: there, cut
                # back to what it allows (under the lock, like every firewall change).
                entries = list(map(entry_text, gone))
                kept = [entry for entry in entries if self._scoped_left(entry, now)]
                self._firewall.revoke([entry for entry in entries if entry not in kept])
                if kept:
                    with self._journal.writing():
                        self._catch_up()
                        self._refresh_grants()
                        for entry in kept:
                            self._plans.settle_to(entry, self._plan(entry, now), now)
        if self._snapshot_due(now):
            self._snapshot_now(purge=False)

    def _snapshot_due(self, now: float) -> bool:
        # A big snapshot holds the writer lock for its whole cost (hundreds of ms at
        # 100,000 entries): space them so knocks wait behind one at most ~5 % of the time.
        dirty = self._dirty_since()
        return dirty is not None and now - dirty >= max(
            self._snapshot_delay, SNAPSHOT_SPACING * self._snapshot_cost
        )

    def _snapshot_now(self, purge: bool, final: bool = False) -> bool:
        """Rewrite whitelist.json if still due; False when another process did it.
        final: whenever the journal holds anything (SIGTERM), however recent."""
        with self._journal.writing():
            self._catch_up()
            now = self._clock()
            # Re-checked under the lock: another worker may have written one while we
            # waited; then the journal holds only the knocks since, and they can wait.
            if purge:
                due = self._shm.header.soonest <= now
            else:
                due = self._dirty_since() is not None if final else self._snapshot_due(now)
            if not due:
                return False
            # The final one (worker exit, reload) has no requests left to keep answering.
            self._write_snapshot(None, now, _in_place if final else self._offload)
        if len(self.replica) > TRIM_ABOVE:
            self._offload(release_free_memory)  # what rendering a big snapshot allocated
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
