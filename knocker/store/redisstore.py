"""Edge: RedisStore, the whitelist backend shared by several instances through Redis/Valkey.

Owns the talk with the server (docs/redis.md): knocks and knock budgets are atomic
server-side scripts (redisscripts.py); each serving process keeps an in-memory replica
(knocker.whitelist.Whitelist) that /verify reads without touching the network, and a
follower thread that keeps it current from the change stream (XREAD BLOCK), resyncing
in full on (re)connect or on a gap in the change sequence. While the server cannot be
reached, knocks fail with 503 and nothing granted, /ready says why, and /verify answers
from the replica (with local expiry) for redis.max_staleness_seconds, then refuses
everyone until a resync succeeds. Each transition is logged once.

With firewalld enabled, one process per host (the holder of a flock in the whitelist
directory) applies the changes other hosts made to its own zone.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from ..addresses import IPAddress
from ..config import Config, RedisConfig
from ..errors import FirewallError, StorageError, StorageUnavailable
from ..firewall import Firewall
from ..ratelimit import Outcome, layout_for
from ..whitelist import Key, Whitelist, entry_text, granted_expiry, parse_entry
from .backend import KnockResult
from .redisscripts import (
    KNOCK,
    LOAD,
    RATE_RESERVE,
    RATE_SETTLE,
    REMOVED,
    STREAM_MAXLEN,
    Keys,
)

log = logging.getLogger("knocker.store")

BLOCK_MS = 1000  # one XREAD waits at most this long: the follower's heartbeat
RETRY_SECONDS = (0.1, 0.2, 0.5, 1.0)  # reconnect backoff, the last one repeated
APPLIER_LOCK = "redis-firewall.lock"


def read_password(config: RedisConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The password from redis.password_file (its first line) or redis.password_env."""
    if config.password_file is not None:
        try:
            with open(config.password_file, encoding="utf-8") as handle:
                return handle.readline().rstrip("\r\n")
        except OSError as error:
            raise StorageError(
                f"redis.password_file {config.password_file}: {error.strerror}"
            ) from error
    if config.password_env is not None:
        value = (os.environ if environ is None else environ).get(config.password_env)
        if value is None:
            raise StorageError(f"redis.password_env: ${config.password_env} is not set")
        return value
    return None


def connect(config: RedisConfig, extra_timeout: float = 0.0) -> redis.Redis:
    """A client for `config` (no I/O until its first command). rediss:// verifies the
    server's certificate and name against redis.tls_ca_file, else the system's CAs."""
    tls: dict[str, Any] = {}
    if config.tls_ca_file is not None:
        tls["ssl_ca_certs"] = config.tls_ca_file
    return redis.Redis.from_url(
        config.url,
        username=config.username,
        password=read_password(config),
        socket_connect_timeout=config.connect_timeout_ms / 1000,
        socket_timeout=config.command_timeout_ms / 1000 + extra_timeout,
        decode_responses=True,
        **tls,
    )


def origin_token(state_dir: str) -> str:
    """Names this host's instance in the change stream (its own changes are already in
    its firewall)."""
    return hashlib.sha256(f"{socket.gethostname()}\0{state_dir}".encode()).hexdigest()[:16]


class RedisStore:
    """One service's whitelist kept in Redis, shared with every instance using the same
    server and key prefix. Built once (preloaded master), `start()` in each serving
    process, `close()` once per process."""

    def __init__(
        self,
        config: Config,
        firewall: Firewall,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        client: redis.Redis | None = None,
    ) -> None:
        settings = config.redis
        self._settings = settings
        self.location = f"{settings.url} (keys {settings.key_prefix}*)"
        self.directory = os.path.dirname(os.path.abspath(config.whitelist.storage_path))
        self._keys = Keys.under(settings.key_prefix)
        self._capacity = config.security.max_whitelist_entries
        self._cleanup = config.whitelist.cleanup_interval_seconds
        self._rate = rate = config.security.knock_rate_limit
        self._rate_layout = layout_for(rate)
        self._window = rate.window_seconds
        self._key_lifetime_ms = rate.window_seconds * 1000 + 1000
        self._firewall = firewall
        self._enforcing = config.firewalld.enabled
        # wall: the real time, compared with the server's own clock (knock deadlines)
        self._clock, self._monotonic, self._wall = clock, monotonic, wall
        self._timeout = settings.command_timeout_ms / 1000
        self._origin = origin_token(self.directory)
        if self._enforcing:
            os.makedirs(self.directory, exist_ok=True)  # holds the applier's lock file
        self._client = client if client is not None else connect(settings)
        self._knock_script = self._client.register_script(KNOCK)
        self._load_script = self._client.register_script(LOAD)
        self._reserve_script = self._client.register_script(RATE_RESERVE)
        self._settle_script = self._client.register_script(RATE_SETTLE)
        # this thread's knock in flight: (client, now) of its reservation, and whether
        # the KNOCK script has settled it
        self._reservation = threading.local()
        self.replica = Whitelist()
        self._lock = threading.Lock()  # serialises writes to the replica
        self._seq = 0  # the last change applied to the replica
        self._last_id = "0-0"  # stream position of that change
        self._problem: str | None = "not yet synchronised with redis"
        self._usable = False  # may /verify trust the replica?
        self._last_contact = -float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._applier: int | None = None  # flock fd while this process applies changes
        self._pid = os.getpid()
        self._closed = False
        try:
            self._resync()
        except redis.RedisError as error:
            # Start anyway (Redis may come up after us): fail closed until synchronised.
            self._went_down(error)

    def __len__(self) -> int:
        return len(self.replica)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start this process's follower thread (after any fork)."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._thread = None
            self._applier = None  # a lock taken in the parent is not ours to release
            self._lock = threading.Lock()  # never inherit one held at the fork
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._follow, name="knocker-redis", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=BLOCK_MS / 1000 + self._timeout + 1)
        if self._applier is not None:
            os.close(self._applier)
            self._applier = None
        self._client.close()

    def ready(self) -> str | None:
        if self._closed:
            return "whitelist storage is closed"
        return self._problem

    # ------------------------------------------------------------------ /verify
    def allows(self, address: IPAddress, now: float) -> bool:
        """The /verify question, in memory; False everywhere once the replica is stale."""
        return self._usable and self.replica.allows(address, now)

    def entries(self) -> dict[str, int]:
        now = self._clock()
        return {entry_text(k): e for k, e in self.replica.items() if e > now}

    # ------------------------------------------------------------------ rate limits
    def rate_reserve(self, client: bytes, now: float) -> bool:
        layout = self._rate_layout
        if not (layout.successes or layout.failures):
            return True
        try:
            held = bool(
                self._reserve_script(
                    keys=self._budget_keys(client),
                    args=[
                        repr(now - self._window),
                        self._rate.successful_requests,
                        self._rate.failed_requests,
                        repr(now),
                        _token(now),
                        self._key_lifetime_ms,
                    ],
                )
            )
        except redis.RedisError:
            return True  # the knock itself then fails with 503, granting nothing
        if held:  # knock() on this thread settles it as a success in its own script
            self._reservation.pending = (client, now)
            self._reservation.settled = False
        return held

    def rate_settle(self, client: bytes, outcome: Outcome, now: float) -> None:
        layout = self._rate_layout
        if not (layout.successes or layout.failures):
            return
        pending = getattr(self._reservation, "pending", None)
        self._reservation.pending = None
        if pending == (client, now) and self._reservation.settled and outcome is Outcome.SUCCESS:
            return  # counted by the KNOCK script already
        try:
            self._settle_script(
                keys=self._budget_keys(client),
                args=[outcome.value, repr(now), _token(now), self._key_lifetime_ms],
            )
        except redis.RedisError as error:
            log.debug("knock budget not settled: %s", error)

    def _budget_keys(self, client: bytes) -> list[str]:
        return [self._keys.budget(client, True), self._keys.budget(client, False)]

    # ------------------------------------------------------------------ knocks
    def knock(self, key: Key, ttl: int, now: float) -> KnockResult:
        """Firewall first, then the server (acknowledged = stored as durably as the server
        is configured to store it); on any failure nothing stays granted."""
        entry = entry_text(key)
        previous = self.replica.expiry(key)
        live = previous if previous is not None and previous > now else None
        wanted = granted_expiry(live, now, ttl)
        self._firewall.grant(entry, _seconds_left(wanted, now))  # raises: nothing changed
        # The script refuses to run after the moment we stop waiting for it (a paused
        # server that resumes later must not store a knock that was answered 503).
        deadline_ms = int((self._wall() + self._timeout) * 1000)
        keys = [self._keys.whitelist, self._keys.changes, self._keys.seq]
        args: list[Any] = [
            entry,
            repr(now),
            wanted,
            self._capacity,
            STREAM_MAXLEN,
            self._origin,
            deadline_ms,
        ]
        pending = getattr(self._reservation, "pending", None)
        if pending is not None and pending[1] == now:  # this knock's reservation
            keys += self._budget_keys(pending[0])
            args += [_token(now), self._key_lifetime_ms]
        try:
            reply = self._knock_script(keys=keys, args=args)
        except redis.RedisError as error:
            self._undo_grant(entry, live, now)
            raise StorageUnavailable(f"redis {self._settings.url}: {error}") from error
        if int(reply[0]) < 0:
            self._undo_grant(entry, live, now)
            raise StorageUnavailable(
                f"redis {self._settings.url} ran the knock after "
                f"redis.command_timeout_ms; not stored"
            )
        expiry = int(reply[0])
        evicted = tuple(reply[1])
        if pending is not None and pending[1] == now:
            self._reservation.settled = True
        if expiry > wanted:  # another instance holds a longer grant of the same entry
            self._grant_quietly(entry, expiry, now)
        with self._lock:
            # Only ahead of the follower: once it has applied this change (or resynced
            # past it), later changes (another instance evicting this entry, say) may
            # already be in the replica and must not be undone.
            if self._seq < int(reply[2]):
                for victim in evicted:
                    victim_key = parse_entry(victim)
                    if victim_key is not None:
                        self.replica.remove(victim_key)
                self.replica.extend(key, expiry)
        if evicted:
            log.warning(
                "whitelist full (%d entries): evicted %s", self._capacity, ", ".join(evicted)
            )
            self._firewall.revoke(evicted)
        return KnockResult(entry=entry, expires_at=expiry, evicted=evicted)

    def _undo_grant(self, entry: str, previous: int | None, now: float) -> None:
        if previous is None:
            self._firewall.revoke([entry])
        else:
            self._grant_quietly(entry, previous, now)

    def _grant_quietly(self, entry: str, expiry: int, now: float) -> None:
        try:
            self._firewall.grant(entry, _seconds_left(expiry, now))
        except FirewallError as error:
            log.error("firewall grant of %s failed: %s", entry, error.message)

    # ------------------------------------------------------------------ migration
    def load(self, entries: Mapping[str, int], now: float) -> int:
        """Store `entries` (entry -> expiry), keeping later expiries already present;
        the number stored. For `knocker migrate`, in batches of 1,000."""
        items = [(text, expiry) for text, expiry in entries.items() if expiry > now]
        stored = 0
        for start in range(0, len(items), 1000):
            args: list[Any] = [repr(now), STREAM_MAXLEN, self._origin]
            for text, expiry in items[start : start + 1000]:
                args += [text, expiry]
            stored += int(
                self._load_script(
                    keys=[self._keys.whitelist, self._keys.changes, self._keys.seq], args=args
                )
            )
        return stored

    def stored_count(self, now: float) -> int:
        """Unexpired entries on the server (migrate's emptiness check)."""
        return int(self._client.zcount(self._keys.whitelist, f"({now!r}", "+inf"))

    # ------------------------------------------------------------------ following
    def _resync(self, client: redis.Redis | None = None) -> None:
        """Replace the replica by the server's whitelist, atomically with the stream
        position and sequence it corresponds to (one MULTI/EXEC)."""
        now = self._clock()
        pipe = (client or self._client).pipeline(transaction=True)
        pipe.get(self._keys.seq)
        pipe.xrevrange(self._keys.changes, count=1)
        pipe.zrangebyscore(self._keys.whitelist, f"({now!r}", "+inf", withscores=True)
        seq, last, members = pipe.execute()
        fresh = Whitelist()
        for text, score in members:
            key = parse_entry(text)
            if key is not None:
                fresh.extend(key, int(score))
        with self._lock:
            old = self.replica
            self.replica = fresh  # one reference swap: readers never see it half-built
            self._seq = int(seq or 0)
            self._last_id = last[0][0] if last else "0-0"
        self._came_up(len(fresh))
        if self._applier is not None:
            self._reapply_difference(old, fresh, now)

    def _follow(self) -> None:
        reader = connect(self._settings, extra_timeout=BLOCK_MS / 1000)
        attempt = 0
        next_purge = self._clock() + self._cleanup
        try:
            in_sync = False  # whatever happened since the replica was built (or forked)
            while not self._stop.is_set():
                self._elect_applier()
                try:
                    if not in_sync:
                        self._resync(reader)  # the reader's longer timeout: big lists
                        in_sync = True
                    reply = reader.xread(
                        {self._keys.changes: self._last_id}, count=1000, block=BLOCK_MS
                    )
                    self._last_contact = self._monotonic()
                    attempt = 0
                    in_sync = self._apply_changes(reply)
                except redis.RedisError as error:
                    in_sync = False
                    self._went_down(error)
                    self._stop.wait(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
                    attempt += 1
                self._check_staleness()
                now = self._clock()
                if now >= next_purge:
                    next_purge = now + self._cleanup
                    self._purge(now)
        except Exception:  # the follower must never die silently: fail closed, say so
            log.exception("redis follower stopped; /verify refuses everyone")
            self._usable = False
            self._problem = "redis follower stopped (see the log)"
        finally:
            reader.close()

    def _apply_changes(self, reply: Any) -> bool:
        """Apply XREAD's changes in order; False on a gap (trimmed stream, restored
        server): the caller resynchronises."""
        if not reply:
            return True
        now = self._clock()
        for _stream, messages in reply:
            for message_id, fields in messages:
                seq = int(fields.get("s", 0))
                if seq != self._seq + 1:
                    log.warning(
                        "redis change stream skipped from %d to %d; resynchronising", self._seq, seq
                    )
                    return False
                key = parse_entry(fields.get("e", ""))
                expiry = int(fields.get("x", REMOVED))
                with self._lock:
                    if key is not None:
                        if expiry == REMOVED:
                            self.replica.remove(key)
                        else:
                            self.replica.extend(key, expiry)
                    self._seq, self._last_id = seq, message_id
                if (
                    key is not None
                    and self._applier is not None
                    and fields.get("o") != self._origin
                ):
                    if expiry == REMOVED:
                        self._firewall.revoke([fields["e"]])
                    elif expiry > now:
                        self._grant_quietly(fields["e"], expiry, now)
        return True

    def _purge(self, now: float) -> None:
        with self._lock:
            gone = self.replica.expired(now)
            for key in gone:
                self.replica.remove(key)
        if gone and self._applier is not None:
            self._firewall.revoke([entry_text(key) for key in gone])

    # ------------------------------------------------------------------ health
    def _went_down(self, error: Exception) -> None:
        if self._problem is None or self._problem.startswith("not yet"):
            log.error(
                "redis %s unreachable: %s; knocks answer 503, /verify answers from "
                "this replica for up to %d s",
                self._settings.url,
                error,
                self._settings.max_staleness_seconds,
            )
        self._problem = f"redis unreachable: {error}"

    def _came_up(self, count: int) -> None:
        if self._problem is not None and self._last_contact > -float("inf"):
            log.warning(
                "redis %s reachable again: resynchronised (%d entries)", self._settings.url, count
            )
        self._problem = None
        self._usable = True
        self._last_contact = self._monotonic()

    def _check_staleness(self) -> None:
        if not self._usable or self._problem is None:
            return
        if self._monotonic() - self._last_contact > self._settings.max_staleness_seconds:
            self._usable = False
            log.error(
                "whitelist replica older than redis.max_staleness_seconds (%d s): "
                "/verify refuses everyone until redis is back",
                self._settings.max_staleness_seconds,
            )

    # ------------------------------------------------------------------ firewall
    def _elect_applier(self) -> None:
        """With firewalld enabled, one process of this host applies other hosts' changes:
        whoever holds the flock (taken over when its holder exits)."""
        if not self._enforcing or self._applier is not None:
            return
        fd = os.open(
            os.path.join(self.directory, APPLIER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return
        self._applier = fd
        now = self._clock()
        for key, expiry in list(self.replica.items()):
            if expiry > now:
                self._grant_quietly(entry_text(key), expiry, now)

    def _reapply_difference(self, old: Whitelist, fresh: Whitelist, now: float) -> None:
        before = {key: expiry for key, expiry in old.items() if expiry > now}
        gone = [entry_text(key) for key in before if fresh.expiry(key) is None]
        if gone:
            self._firewall.revoke(gone)
        for key, expiry in fresh.items():
            if before.get(key) != expiry:
                self._grant_quietly(entry_text(key), expiry, now)


def _token(now: float) -> str:
    """Names one knock's reservation: its process, thread and time (reserve and settle
    of one knock get the same `now`)."""
    return f"{os.getpid()}:{threading.get_ident()}:{now!r}"


def _seconds_left(expiry: int, now: float) -> int:
    return max(1, -int((now - expiry) // 1))  # whole seconds, rounded up
