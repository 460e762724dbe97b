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
directory) applies the changes other hosts made to its own zone: for each entry the same
plan as the file backend (grant_format.firewall_plan: a port-scoped grant opens its ports
only), computed from its replica.
"""

from __future__ import annotations

import dataclasses
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
from ..errors import StorageError, StorageUnavailable
from ..firewall import Firewall
from ..ratelimit import Outcome, layout_for
from ..whitelist import Key, Whitelist, entry_text, granted_expiry, live_expiry, parse_entry
from .backend import KnockResult
from .grant_format import HOWS, Grant, Plan
from .plans import PlanFirewall, plan_targets
from .redisscripts import (
    KNOCK,
    LOAD,
    LOAD_GRANTS,
    RATE_RESERVE,
    RATE_SETTLE,
    REMOVED,
    RESYNC,
    REVOKE,
    SCOPED_KNOCK,
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

    # per process (_own_process)
    _problem: str | None
    _thread: threading.Thread | None
    _reader: redis.Redis | None
    _applier: int | None

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
        self._plans = PlanFirewall(firewall, tuple(map(str, config.firewalld.monitored_ports)))
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
        self._scoped_script = self._client.register_script(SCOPED_KNOCK)
        self._revoke_script = self._client.register_script(REVOKE)
        self._load_grants_script = self._client.register_script(LOAD_GRANTS)
        self._resync_script = self._client.register_script(RESYNC)
        # this thread's knock in flight: (client, now) of its reservation, and whether
        # the KNOCK script has settled it
        self._reservation = threading.local()
        self.replica = Whitelist()
        # key name -> its scoped grants (hosts:, ports:), replicated like the whitelist
        # (never in it); and the ports of the port-scoped ones, for the firewall's plans
        self.scoped: dict[str, Whitelist] = {}
        self.scoped_ports: dict[tuple[str, Key], tuple[str, ...]] = {}
        self._seq = 0  # the last change applied to the replica
        self._last_id = "0-0"  # stream position of that change
        self._closed = False
        self._own_process()
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
            self._own_process()
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._follow, name="knocker-redis", daemon=True)
            self._thread.start()

    def _own_process(self) -> None:
        """The state that belongs to one process, fresh: built, or after a fork. A forked
        worker's replica came with the fork and is followed by no one yet: the worker is
        not ready, and /verify refuses, until its own follower has resynchronised (during
        an outage that is fail-closed: docs/redis.md#failure-modes)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()  # serialises writes to the replica; never inherited
        self._problem = "not yet synchronised with redis"
        self._usable = False  # may /verify trust the replica?
        self._last_contact = -float("inf")
        self._stop = threading.Event()
        self._thread = None
        self._reader = None  # the follower's own connection
        self._applier = None  # flock fd while applying changes (a parent's is not ours)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        reader = self._reader
        if reader is not None:
            # End the follower's XREAD BLOCK now rather than at its next heartbeat.
            reader.connection_pool.disconnect()
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
        """Every live firewall target, scoped grants included (they open the firewall
        too): an entry, or one target per port where a port-scoped grant runs longest."""
        now = self._clock()
        with self._lock:  # a consistent pass: no change lands mid-iteration
            plans = self._all_plans(now)
        targets: dict[str, int] = {}
        for entry, plan in plans.items():
            targets.update(plan_targets(entry, plan))
        return targets

    def scoped_allows(self, address: IPAddress, key_names: tuple[str, ...], now: float) -> bool:
        """/verify for scoped grants: in memory, like allows()."""
        if not self._usable:
            return False
        scoped = self.scoped
        for name in key_names:
            grants = scoped.get(name)
            if grants is not None and grants.allows(address, now):
                return True
        return False

    def _scoped_grant(self, name: str, key: Key, expiry: int) -> Grant:
        """A scoped grant of this replica, as firewall_plan reads it."""
        ports = self.scoped_ports.get((name, key), ())
        return Grant(entry_text(key), name, expiry, None, "knock", scoped=True, ports=ports)

    def _scoped_grants(self, key: Key, now: float) -> list[Grant]:
        """The live scoped grants of `key` in this replica (never under self._lock)."""
        found = []
        with self._lock:  # the grants and their ports from one state of the replica
            for name, grants in self.scoped.items():
                expiry = live_expiry(grants.expiry(key), now)
                if expiry is not None:
                    found.append(self._scoped_grant(name, key, expiry))
        return found

    def _plan(self, key: Key, now: float) -> Plan:
        """What the firewall should hold for `key` now, by this replica."""
        unscoped = live_expiry(self.replica.expiry(key), now)
        return self._plans.plan(unscoped, self._scoped_grants(key, now), now)

    def _all_plans(self, now: float) -> dict[str, Plan]:
        """entry -> its plan, for every entry with a live grant (under self._lock)."""
        scoped: dict[Key, list[Grant]] = {}
        for name, grants in list(self.scoped.items()):
            for key, expiry in grants.items():
                if expiry > now:
                    scoped.setdefault(key, []).append(self._scoped_grant(name, key, expiry))
        plans: dict[str, Plan] = {}
        for key, expiry in self.replica.items():
            if expiry > now and key not in scoped:
                plans[entry_text(key)] = {"": expiry}
        for key, found in scoped.items():
            plan = self._plans.plan(live_expiry(self.replica.expiry(key), now), found, now)
            if plan:
                plans[entry_text(key)] = plan
        return plans

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
        """Firewall first, then the server (acknowledged = stored as durably as the server
        is configured to store it); on any failure nothing stays granted. With
        `key_name` the grant is recorded with the entry (one script); a `scoped` grant
        (hosts:, ports:) goes to the scoped set only, with its `ports`."""
        entry = entry_text(key)
        if scoped and key_name is not None:
            return self._knock_scoped(key, entry, ttl, now, key_name, how, ports)
        previous = live_expiry(self.replica.expiry(key), now)
        wanted = granted_expiry(previous, now, ttl)
        scoped_grants = self._scoped_grants(key, now)
        before = self._plans.plan(previous, scoped_grants, now)  # what the firewall holds
        after = self._plans.plan(wanted, scoped_grants, now)
        self._plans.open_all_or_nothing(entry, after, before, now)  # raises: nothing changed
        reply = self._run_knock(
            self._knock_script,
            entry,
            wanted,
            now,
            key_name or "",
            how,
            lambda: self._plans.settle_to(entry, before, now),
            extra_args=[granted_expiry(None, now, ttl)],
        )
        expiry, evicted, seq = int(reply[0]), tuple(reply[1]), int(reply[2])
        granted = self._plans.plan(expiry, scoped_grants, now)
        if granted != after:  # another instance granted it for longer
            self._plans.settle_to(entry, granted, now)
        with self._lock:
            # Only ahead of the follower: once it has applied this change (or resynced
            # past it), later changes (another instance evicting this entry, say) may
            # already be in the replica and must not be undone.
            if self._seq < seq:
                for victim in evicted:
                    victim_key = parse_entry(victim)
                    if victim_key is not None:
                        self.replica.remove(victim_key)
                self.replica.extend(key, expiry)
        self._evicted("whitelist full", evicted, now)
        return KnockResult(
            entry=entry, expires_at=expiry, evicted=evicted, extended=previous is not None
        )

    def _knock_scoped(
        self,
        key: Key,
        entry: str,
        ttl: int,
        now: float,
        key_name: str,
        how: str,
        ports: tuple[str, ...],
    ) -> KnockResult:
        """A scoped key's grant: firewall (its ports only), then the SCOPED_KNOCK script,
        then this process's scoped index (other processes follow the change stream)."""
        earlier = live_expiry(self.scoped.get(key_name, Whitelist()).expiry(key), now)
        wanted = granted_expiry(earlier, now, ttl)
        unscoped = live_expiry(self.replica.expiry(key), now)
        scoped_grants = self._scoped_grants(key, now)
        others = [g for g in scoped_grants if g.key_name != key_name]
        before = self._plans.plan(unscoped, scoped_grants, now)  # what the firewall holds
        grant = Grant(entry, key_name, wanted, int(now), how, scoped=True, ports=ports)
        after = self._plans.plan(unscoped, [*others, grant], now)
        self._plans.open_all_or_nothing(entry, after, before, now)  # raises: nothing changed
        reply = self._run_knock(
            self._scoped_script,
            entry,
            wanted,
            now,
            key_name,
            how,
            lambda: self._plans.settle_to(entry, before, now),
            extra_keys=[self._keys.scoped],
            extra_args=[",".join(ports)],
        )
        expiry, seq = int(reply[0]), int(reply[2])
        victims = [member.partition(" ") for member in reply[1]]  # "entry key name"
        evicted = tuple(dict.fromkeys(entry for entry, _, _ in victims))
        # The server's word on the key's grant (another instance's may run longer) and on
        # the entry's unscoped time.
        granted = self._plans.plan(
            live_expiry(int(reply[3]), now),
            [*others, dataclasses.replace(grant, expires_at=expiry)],
            now,
        )
        if granted != after:
            self._plans.settle_to(entry, granted, now)
        with self._lock:
            if self._seq < seq:  # ahead of the follower only (see knock)
                for victim, _, name in victims:
                    victim_key = parse_entry(victim)
                    if victim_key is not None:
                        self._set_scoped(name, victim_key, REMOVED)
                self._set_scoped(key_name, key, expiry, ports)
        self._evicted("scoped grants full", evicted, now)
        return KnockResult(
            entry=entry, expires_at=expiry, evicted=evicted, extended=earlier is not None
        )

    def _evicted(self, what: str, evicted: tuple[str, ...], now: float) -> None:
        """Say which entries a knock evicted, and close them unless another grant keeps
        them open."""
        if evicted:
            log.warning("%s (%d entries): evicted %s", what, self._capacity, ", ".join(evicted))
            self._close_unless_granted(evicted, now)

    def _run_knock(
        self,
        script: Any,
        entry: str,
        wanted: int,
        now: float,
        key_name: str,
        how: str,
        undo: Callable[[], None],
        extra_keys: list[str] | None = None,
        extra_args: list[Any] | None = None,
    ) -> Any:
        """Run a knock script (KNOCK, SCOPED_KNOCK: the same leading keys and arguments)
        with this thread's reservation settled in it; on any failure `undo` the firewall
        step and raise StorageUnavailable."""
        # The script refuses to run after the moment we stop waiting for it (a paused
        # server that resumes later must not store a knock that was answered 503).
        deadline_ms = int((self._wall() + self._timeout) * 1000)
        keys = [
            self._keys.whitelist,
            self._keys.changes,
            self._keys.seq,
            self._keys.grants_of(entry),
            *(extra_keys or []),
        ]
        args: list[Any] = [
            entry,
            repr(now),
            wanted,
            self._capacity,
            STREAM_MAXLEN,
            self._origin,
            deadline_ms,
            self._keys.grants,
            key_name,
            how,
            *(extra_args or []),
        ]
        pending = getattr(self._reservation, "pending", None)
        if pending is not None and pending[1] != now:
            pending = None  # not this knock's reservation
        if pending is not None:
            keys += self._budget_keys(pending[0])
            args += [_token(now), self._key_lifetime_ms]
        try:
            reply = script(keys=keys, args=args)
        except redis.RedisError as error:
            undo()
            raise StorageUnavailable(f"redis {self._settings.url}: {error}") from error
        if int(reply[0]) < 0:
            undo()
            raise StorageUnavailable(
                f"redis {self._settings.url} ran the knock after "
                f"redis.command_timeout_ms; not stored"
            )
        if pending is not None:
            self._reservation.settled = True
        return reply

    def _set_scoped(
        self, key_name: str, key: Key, expiry: int, ports: tuple[str, ...] = ()
    ) -> None:
        """Under self._lock: record (or with REMOVED, drop) a scoped grant in memory."""
        if expiry == REMOVED:
            table = self.scoped.get(key_name)
            if table is not None:
                table.remove(key)
            self.scoped_ports.pop((key_name, key), None)
            return
        self.scoped.setdefault(key_name, Whitelist()).set(key, expiry)
        if ports:
            self.scoped_ports[(key_name, key)] = ports
        else:
            self.scoped_ports.pop((key_name, key), None)

    def _close_unless_granted(self, entries: tuple[str, ...], now: float) -> None:
        """Revoke `entries` in the firewall, except what another live grant keeps open
        (a scoped grant of an evicted entry, say): there, cut back to its plan."""
        closed = []
        for text in entries:
            key = parse_entry(text)
            plan = self._plan(key, now) if key is not None else {}
            if plan:
                self._plans.settle_to(text, plan, now)
            else:
                closed.append(text)
        if closed:
            self._firewall.revoke(closed)

    # ------------------------------------------------------------------ grants
    def grants(self, now: float) -> list[Grant]:
        """Every live grant (GET /grants), read from the server, ordered like the file
        backend's: an entry running longer than its recorded grants has a `restored` one."""
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.zrangebyscore(self._keys.whitelist, f"({now!r}", "+inf", withscores=True)
            pipe.zrangebyscore(self._keys.scoped, f"({now!r}", "+inf")
            members, scoped = pipe.execute()
            entries = {text: int(score) for text, score in members}
            names = list(entries) + sorted({m.split(" ", 1)[0] for m in scoped} - set(entries))
            pipe = self._client.pipeline(transaction=False)
            for text in names:
                pipe.hgetall(self._keys.grants_of(text))
            records = pipe.execute()
        except redis.RedisError as error:
            raise StorageUnavailable(f"redis {self._settings.url}: {error}") from error
        result: list[Grant] = []
        for text, fields in zip(names, records, strict=True):
            found = [
                g
                for g in (_decode_grant(text, n, v) for n, v in fields.items())
                if g is not None and g.expires_at > now
            ]
            expiry = entries.get(text)
            if expiry is not None:
                unscoped = [g for g in found if not g.scoped and g.expires_at <= expiry]
                result += unscoped
                if not unscoped or expiry > max(g.expires_at for g in unscoped):
                    result.append(Grant(text, None, expiry, None, "restored"))
            result += [g for g in found if g.scoped]
        return sorted(result, key=lambda g: (g.entry, g.key_name or "", g.scoped))

    def revoke(self, key: Key, key_name: str | None, now: float) -> list[Grant]:
        """End `key_name`'s grants of `key` (None: all of them) on the server in one
        script, which streams the removals to every instance; then this replica and the
        firewall. The entry is cut back to its longest remaining unscoped grant."""
        entry = entry_text(key)
        try:
            reply = self._revoke_script(
                keys=[
                    self._keys.whitelist,
                    self._keys.changes,
                    self._keys.seq,
                    self._keys.grants_of(entry),
                    self._keys.scoped,
                ],
                args=[entry, key_name or "", repr(now), STREAM_MAXLEN, self._origin],
            )
        except redis.RedisError as error:
            raise StorageUnavailable(f"redis {self._settings.url}: {error}") from error
        ended = [
            Grant(
                entry,
                name or None,
                int(expiry),
                None if int(at) < 0 else int(at),
                how,
                scoped=flag == "1",
                ports=_ports(ports),
            )
            for name, expiry, at, how, flag, ports in reply[0]
        ]
        if not ended:
            return []
        seq, left = int(reply[2]), int(reply[3])
        # What the firewall holds for the entry now: the server's grants left.
        remaining = [
            Grant(entry, None, int(expiry), None, "knock", scoped=True, ports=_ports(ports))
            for expiry, ports in reply[1]
        ]
        plan = self._plans.plan(live_expiry(left, now), remaining, now)
        with self._lock:
            if self._seq < seq:  # ahead of the follower only (see knock)
                for grant in ended:
                    if grant.scoped and grant.key_name is not None:
                        self._set_scoped(grant.key_name, key, REMOVED)
                if any(not g.scoped for g in ended):
                    self.replica.remove(key)
                    if left:
                        self.replica.extend(key, left)
        self._plans.settle_to(entry, plan, now)
        return ended

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

    def load_grants(self, grants: list[Grant], now: float) -> int:
        """Store recorded grants (migration; restored ones are not records), keeping
        later ones already present; the number stored."""
        by_entry: dict[str, list[Grant]] = {}
        for grant in grants:
            if grant.key_name is not None and grant.expires_at > now:
                by_entry.setdefault(grant.entry, []).append(grant)
        stored = 0
        for entry, records in by_entry.items():
            args: list[Any] = [repr(now), STREAM_MAXLEN, self._origin, entry]
            for grant in records:
                args += [grant.key_name, encode_grant(grant)]
            stored += int(
                self._load_grants_script(
                    keys=[
                        self._keys.grants_of(entry),
                        self._keys.scoped,
                        self._keys.changes,
                        self._keys.seq,
                    ],
                    args=args,
                )
            )
        return stored

    def stored_count(self, now: float) -> int:
        """Unexpired entries on the server (migrate's emptiness check)."""
        return int(self._client.zcount(self._keys.whitelist, f"({now!r}", "+inf"))

    # ------------------------------------------------------------------ following
    def _resync(self, client: redis.Redis | None = None) -> None:
        """Replace the replica by the server's whitelist and scoped grants (with their
        ports), atomically with the stream position and sequence it corresponds to (one
        script: RESYNC)."""
        now = self._clock()
        seq, last_id, members, scoped_members = self._resync_script(
            keys=[self._keys.whitelist, self._keys.changes, self._keys.seq, self._keys.scoped],
            args=[repr(now), self._keys.grants],
            client=client or self._client,
        )
        fresh = Whitelist()
        for text, score in zip(members[::2], members[1::2], strict=True):
            key = parse_entry(text)
            if key is not None:
                fresh.extend(key, int(float(score)))
        scoped: dict[str, Whitelist] = {}
        ports: dict[tuple[str, Key], tuple[str, ...]] = {}
        for member, score, listed in zip(
            scoped_members[::3], scoped_members[1::3], scoped_members[2::3], strict=True
        ):
            text, _, name = member.partition(" ")
            key = parse_entry(text)
            if key is not None and name:
                scoped.setdefault(name, Whitelist()).set(key, int(float(score)))
                if listed:
                    ports[(name, key)] = _ports(listed)
        with self._lock:
            old = self._all_plans(now)
            # reference swaps: readers never see them half-built
            self.replica, self.scoped, self.scoped_ports = fresh, scoped, ports
            self._seq = int(seq)
            self._last_id = last_id
        self._came_up(len(fresh))
        if self._applier is not None:
            with self._lock:
                new = self._all_plans(now)
            self._reapply_difference(old, new, now)

    def _follow(self) -> None:
        self._reader = reader = connect(self._settings, extra_timeout=BLOCK_MS / 1000)
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
                    if self._stop.is_set():
                        break  # close() cut the connection
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
                scoped_name = fields.get("k")  # a scoped grant's change
                with self._lock:
                    if key is not None and scoped_name is not None:
                        self._set_scoped(scoped_name, key, expiry, _ports(fields.get("p", "")))
                    elif key is not None:
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
                    # the firewall holds the plan of the entry's grants, scoped or not
                    self._plans.settle_to(fields["e"], self._plan(key, now), now)
        return True

    def _purge(self, now: float) -> None:
        with self._lock:
            gone = self.replica.expired(now)
            for key in gone:
                self.replica.remove(key)
            for name, grants in self.scoped.items():
                for key in grants.expired(now):
                    grants.remove(key)
                    self.scoped_ports.pop((name, key), None)
                    gone.append(key)
        if gone and self._applier is not None:
            self._close_unless_granted(tuple({entry_text(key) for key in gone}), now)

    # ------------------------------------------------------------------ health
    def _went_down(self, error: Exception) -> None:
        reason = str(error).rstrip(".")  # redis-py's messages end with one
        if self._problem is None or self._problem.startswith("not yet"):
            log.error(
                "redis %s unreachable: %s; knocks answer 503, /verify answers from "
                "this replica for up to %d s",
                self._settings.url,
                reason,
                self._settings.max_staleness_seconds,
            )
        self._problem = f"redis unreachable: {reason}"

    def _came_up(self, count: int) -> None:
        if self._problem is not None and self._last_contact > -float("inf"):
            log.warning(
                "redis %s reachable again: resynchronised (%d entries)", self._settings.url, count
            )
        elif self._thread is not None and self._problem is not None:
            # this serving process's first synchronisation (the master's is "loaded")
            log.info("whitelist replica synchronised with redis (%d entries)", count)
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
        with self._lock:
            plans = self._all_plans(now)
        for entry, plan in plans.items():
            self._plans.settle_to(entry, plan, now)

    def _reapply_difference(
        self, before: dict[str, Plan], after: dict[str, Plan], now: float
    ) -> None:
        gone = [entry for entry in before if entry not in after]
        if gone:
            self._firewall.revoke(gone)
        for entry, plan in after.items():
            if before.get(entry) != plan:
                self._plans.settle_to(entry, plan, now)


def _decode_grant(entry: str, name: str, value: str) -> Grant | None:
    """One field of a grants hash ("expiry granted_at how scoped", then the ports of a
    port-scoped grant: "... 1 22/tcp,53/udp"), None if damaged."""
    parts = value.split(" ")
    if len(parts) == 5 and parts[3] == "1" and parts[4]:
        ports = _ports(parts.pop())
    elif len(parts) == 4:
        ports = ()
    else:
        return None
    if parts[2] not in HOWS or parts[3] not in ("0", "1"):
        return None
    try:
        expiry, at = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return Grant(
        entry, name, expiry, None if at < 0 else at, parts[2], scoped=parts[3] == "1", ports=ports
    )


def encode_grant(grant: Grant) -> str:
    """A grants hash field's value (migration)."""
    at = -1 if grant.granted_at is None else grant.granted_at
    value = f"{grant.expires_at} {at} {grant.how} {int(grant.scoped)}"
    return f"{value} {','.join(grant.ports)}" if grant.ports and grant.scoped else value


def _ports(listed: str) -> tuple[str, ...]:
    """A port scope as the scripts carry it ("22/tcp,53/udp"; "": none)."""
    return tuple(listed.split(",")) if listed else ()


def _token(now: float) -> str:
    """Names one knock's reservation: its process, thread and time (reserve and settle
    of one knock get the same `now`)."""
    return f"{os.getpid()}:{threading.get_ident()}:{now!r}"
