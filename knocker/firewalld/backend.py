"""FirewalldFirewall: the Firewall protocol of knocker/firewall.py over firewalld.

Owns: the service-start setup (zone, restore, verify, once per service), grants and
revocations with their rollback and leftovers, the turn-taking that keeps several threads
and processes from interleaving their calls, the shared status /ready reads, and the
repairs the watcher asks for. Time is an argument (clock, monotonic, sleep); the bus is
reached only through `connect` (BusConnection by default). Design: docs/firewalld.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from ..config import FirewalldConfig
from ..errors import FirewallError, FirewallUnavailable
from .bus import BusConnection, Connection
from .calls import (
    RUNNING_TIMEOUT,
    FirewalldClient,
    GrantFailed,
    apply_timed,
    ensure_zone,
    grant_all,
    missing_rules,
    remove_rule,
    runtime_zone_problems,
    settle,
    wait_running,
)
from .coordination import (
    MUTATION_LOCK,
    PREPARE_LOCK,
    PREPARED_MARKER,
    STATUS_FILE,
    WATCHER_LOCK,
    FileLock,
    LockTimeout,
    read_status,
    service_id,
    write_status,
)
from .docker import warn_about_docker
from .failures import DBUS_FAILURES, DBusError, classify, is_unavailable
from .rules import (
    seconds_left,
    stray_grants,
    target_expiry,
    target_rules,
)
from .watcher import Watcher

log = logging.getLogger("knocker.firewalld")

LOCK_WAIT = 5.0  # a grant waits at most this long for another mutation to finish
QUEUE_LIMIT = 16  # grants/revocations waiting in one process before we answer 503
QUEUE_WAIT = 0.2
QUEUE_POLL = 0.005
STATUS_CACHE = 1.0  # problem() reads the status file at most this often per process
REPAIR_RELOAD_INTERVAL = 60.0  # at most one reload per minute to repair a runtime-only change
PREPARE_LOCK_WAIT = 300.0

Entries = Mapping[str, int]


class Admission:
    """A bounded queue of mutations in one process: a place is waited for QUEUE_WAIT
    seconds (on the injected clock), then the caller gets 503 rather than piling up."""

    def __init__(
        self, limit: int, monotonic: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        self.limit = limit
        self.taken = 0
        self._count_lock = threading.Lock()  # guards `taken` only, never held while waiting
        self._monotonic = monotonic
        self._sleep = sleep

    def _try_enter(self) -> bool:
        with self._count_lock:
            if self.taken >= self.limit:
                return False
            self.taken += 1
            return True

    @contextlib.contextmanager
    def place(self, doing: str) -> Iterator[None]:
        deadline = self._monotonic() + QUEUE_WAIT
        while not self._try_enter():
            if self._monotonic() >= deadline:
                raise FirewallUnavailable(f"firewalld mutation queue is full while {doing}")
            self._sleep(QUEUE_POLL)
        try:
            yield
        finally:
            with self._count_lock:
                self.taken -= 1


class FirewalldFirewall:
    """The Firewall protocol over firewalld (design: docs/firewalld.md).

    Locking: one thread of a process talks over its connection at a time (_thread_lock);
    a rule sequence additionally holds the machine-wide mutation flock, so a watcher's
    re-apply and a worker's grant of the same rule never interleave their calls."""

    def __init__(
        self,
        config: FirewalldConfig,
        state_dir: str,
        connect: Callable[[], Connection] = BusConnection,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self._connect = connect
        self._clock = clock
        self._monotonic = monotonic
        # looked up now, not at import: under gevent, time.sleep is the patched one
        self._sleep = sleep or time.sleep
        self._conn: Connection | None = None
        self._conn_pid = 0
        self._admission = Admission(QUEUE_LIMIT, monotonic, self._sleep)
        self._thread_lock = threading.Lock()
        self._mutation = FileLock(os.path.join(state_dir, MUTATION_LOCK), monotonic, self._sleep)
        self._status_path = os.path.join(state_dir, STATUS_FILE)
        self._current: Callable[[], Entries] | None = None
        self._unsettled: dict[str, str] = {}  # rule -> one-port target, left by failed grants
        self._watcher: Watcher | None = None
        self._problem_cache: tuple[float, str | None] = (-1e9, None)
        self._repair_reload_at = -1e9

    # -- the connection and the turns

    def _client(self) -> FirewalldClient:
        if self._conn is None or self._conn_pid != os.getpid():
            self._conn = self._connect()  # never the parent's socket after fork()
            self._conn_pid = os.getpid()
        return FirewalldClient(self._conn)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._conn_pid == os.getpid():
            conn.close()

    @contextlib.contextmanager
    def _process_turn(self, doing: str) -> Iterator[None]:
        """This process's connection, one thread at a time. (A wait for a sibling thread:
        threading's own timeout, which a fake clock could not advance anyway.)"""
        if not self._thread_lock.acquire(timeout=LOCK_WAIT):
            raise FirewallUnavailable(f"firewalld is busy while {doing}")
        try:
            yield
        finally:
            self._thread_lock.release()

    @contextlib.contextmanager
    def _machine_turn(self, doing: str) -> Iterator[None]:
        """The mutation flock: one rule sequence at a time across the service's processes."""
        try:
            self._mutation.acquire(LOCK_WAIT)
        except LockTimeout as exc:
            raise FirewallUnavailable(f"firewalld is busy while {doing}") from exc
        except OSError as exc:  # the state directory is not ours to write
            raise FirewallError(f"firewalld lock file unusable: {exc}") from exc
        try:
            yield
        finally:
            self._mutation.release()

    @contextlib.contextmanager
    def _mutating(self, doing: str) -> Iterator[FirewalldClient]:
        """A place in the queue (503 when full), this process's turn, the machine-wide
        turn, in that order and released in reverse; a failure that means firewalld is
        unreachable also drops the connection, so the next mutation reconnects."""
        with (
            self._admission.place(doing),
            self._process_turn(doing),
            self._machine_turn(doing),
        ):
            try:
                yield self._client()
            except DBUS_FAILURES as exc:
                if is_unavailable(exc):
                    self._drop_connection()
                raise

    def _remaining(self, one_port: str) -> int | None:
        """Seconds the whitelist still gives one port of an entry ("192.0.2.1 22/tcp")."""
        if self._current is None:
            return None
        expiry = target_expiry(self._current(), one_port)
        return None if expiry is None else seconds_left(expiry, self._clock())

    def _settle_unsettled(self, client: FirewalldClient) -> None:
        """Rules a failed grant may have left (e.g. firewalld vanished mid-sequence): put
        them back to what the whitelist says before doing anything else."""
        for rule, target in list(self._unsettled.items()):
            try:
                settle(client, self.config.zone_name, rule, self._remaining(target))
            except DBusError as exc:
                if is_unavailable(exc):
                    raise
                log.error("firewalld: giving up on leftover rule %s: %s", rule, exc)
            self._unsettled.pop(rule, None)

    def set_status(self, ok: bool, reason: str) -> None:
        try:
            write_status(self._status_path, ok, reason)
        except OSError as exc:
            log.error("firewalld: cannot write %s: %s", self._status_path, exc)
        self._problem_cache = (-1e9, None)

    def touch_status(self) -> None:
        """The watcher's heartbeat: a fresh mtime says someone is still watching."""
        with contextlib.suppress(OSError):
            os.utime(self._status_path)

    # -- Firewall protocol

    def prepare(self, entries: Entries, now: float) -> None:
        lock = FileLock(os.path.join(self.state_dir, PREPARE_LOCK), self._monotonic, self._sleep)
        marker = os.path.join(self.state_dir, PREPARED_MARKER)
        me = service_id()
        try:
            lock.acquire(PREPARE_LOCK_WAIT)
            with contextlib.suppress(OSError), open(marker, encoding="utf-8") as handle:
                if handle.read().strip() == me:
                    log.info("firewalld: already set up by another process of this service")
                    return
            self._prepare(entries, now)
            with open(marker, "w", encoding="utf-8") as handle:
                handle.write(me + "\n")
        except (LockTimeout, OSError) as exc:
            raise FirewallError(f"firewalld setup: {exc}") from exc
        finally:
            lock.close()
            self._drop_connection()

    def _wait_running(self, client: FirewalldClient) -> str:
        return wait_running(client, RUNNING_TIMEOUT, self._monotonic, self._sleep)

    def _prepare(self, entries: Entries, now: float) -> None:
        zone = self.config.zone_name
        client = self._client()
        step = "waiting for firewalld"
        try:
            log.info("firewalld: waiting for state RUNNING")
            version = self._wait_running(client)
            log.info("firewalld: version %s is running", version)
            step = f"setting up zone {zone}"
            changed = ensure_zone(client, self.config, version)
            problems = [] if changed else runtime_zone_problems(client, self.config, version)
            if changed or problems:
                log.info("firewalld: reloading (%s)", "; ".join(problems) or "zone changed")
                step = "reloading"
                client.reload()
                self._wait_running(client)
            else:
                # No reload needed, and none done: it would also drop every other
                # runtime-only rule on the machine (fail2ban's bans, an admin's tests).
                # Only our own leftovers go.
                step = "removing leftover grants"
                wanted = {
                    one_port
                    for target, x in entries.items()
                    if x - now > 0
                    for one_port in target_rules(target, self.config).values()
                }
                for rule in stray_grants(client.rich_rules(zone), wanted):
                    log.info("firewalld: removing leftover grant %s", rule)
                    remove_rule(client, zone, rule)
            step = "restoring grants"
            restored: list[str] = []
            started = self._monotonic()
            for target, expiry in entries.items():
                # restoring many entries takes a while: count it against their time
                ttl = seconds_left(expiry, now + self._monotonic() - started)
                if ttl >= 1:
                    rules = list(target_rules(target, self.config))
                    for rule in rules:
                        apply_timed(client, zone, rule, ttl)
                    if ttl >= 2:  # a 1 s grant may be gone before we look
                        restored.extend(rules)
            log.info("firewalld: restored %d whitelist entries", len(restored))
            step = "verifying"
            problems = runtime_zone_problems(client, self.config, version)
            problems += [f"missing grant {r}" for r in missing_rules(client, zone, restored)]
            if problems:
                raise FirewallError(f"firewalld zone {zone} not in place: {'; '.join(problems)}")
        except DBUS_FAILURES as exc:
            raise classify(exc, step) from exc
        self._warn_about_target(client)
        warn_about_docker(self.config)
        self.set_status(True, "")
        log.info("firewalld: zone %s ready", zone)

    def _warn_about_target(self, client: FirewalldClient) -> None:
        """firewalld's default zone target rejects whatever the zone does not allow, so
        with an unset zone_target every port of this host (Knocker's own included) is
        closed to monitored_ips, not only the monitored ones. Say so once at startup."""
        if self.config.zone_target is not None:
            return  # the user chose it
        try:
            target = client.config_zone_settings(self.config.zone_name).get("target")
        except DBUS_FAILURES:
            return
        if target != "ACCEPT":
            log.warning(
                "firewalld: zone %s has firewalld's default target: traffic from "
                "monitored_ips to ports other than the monitored ones is rejected too "
                "(Knocker's own port included). Set `zone_target: ACCEPT` to leave "
                "unmonitored ports alone; see docs/firewalld.md",
                self.config.zone_name,
            )

    def start_worker(self, current: Callable[[], Entries]) -> None:
        self._current = current
        if self._watcher is None or not self._watcher.is_alive():
            lock_path = os.path.join(self.state_dir, WATCHER_LOCK)
            self._watcher = Watcher(self, lock_path, monotonic=self._monotonic)
            self._watcher.start()

    def grant(self, entry: str, ttl: int) -> None:
        """`entry` is a target: an entry (every monitored port) or "entry port/proto"."""
        if ttl < 1:
            raise FirewallError(f"cannot grant {entry} for {ttl} s")
        rules = target_rules(entry, self.config)
        doing = f"granting {entry}"
        try:
            with self._mutating(doing) as client:
                self._settle_unsettled(client)
                try:
                    grant_all(
                        client,
                        self.config.zone_name,
                        list(rules),
                        ttl,
                        lambda rule: self._remaining(rules[rule]),
                    )
                except GrantFailed as failed:
                    self._unsettled.update({rule: rules[rule] for rule in failed.unsettled})
                    if is_unavailable(failed.cause):
                        self._drop_connection()
                    raise classify(failed.cause, doing) from failed.cause
        except DBUS_FAILURES as exc:  # from settling earlier leftovers
            raise classify(exc, doing) from exc
        log.debug("firewalld: granted %s for %d s", entry, ttl)

    def revoke(self, entries: Iterable[str]) -> None:
        pending = list(entries)
        while pending:
            entry = pending.pop(0)
            try:
                rules = target_rules(entry, self.config)
                with self._mutating(f"revoking {entry}") as client:
                    for rule in rules:
                        remove_rule(client, self.config.zone_name, rule)
            except (FirewallError, *DBUS_FAILURES) as exc:
                log.warning("firewalld: could not revoke %s: %s", entry, exc)
                if isinstance(exc, FirewallUnavailable) or is_unavailable(exc):
                    # Do not wait for a timeout per entry: the rest is settled (removed,
                    # unless the entry is whitelisted again) before the next change.
                    for rest in [entry, *pending]:
                        with contextlib.suppress(FirewallError):
                            self._unsettled.update(target_rules(rest, self.config))
                    return

    def problem(self) -> str | None:
        now = self._monotonic()
        checked, cached = self._problem_cache
        if now - checked < STATUS_CACHE:
            return cached
        reason = read_status(self._status_path, self._clock())
        self._problem_cache = (now, reason)
        return reason

    def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.join(timeout=2.0)
        with self._thread_lock:
            self._drop_connection()
        self._mutation.close()

    # -- used by the watcher

    def reconcile(self, reader: FirewalldClient, reason: str) -> int:
        """After firewalld changed under us: wait for RUNNING, put the zone back if it is
        gone or changed, re-apply every unexpired entry whose rules are missing, verify.
        `reader` is the watcher's own connection, for calls that change nothing."""
        version = self._wait_running(reader)
        with self._mutating("checking the zone") as client:
            self._settle_unsettled(client)
            reload = ensure_zone(client, self.config, version)
            if not reload and runtime_zone_problems(client, self.config, version):
                # Someone changed the running zone without a reload (firewall-cmd without
                # --permanent). A reload repairs it, but not in a loop if it does not.
                now = self._monotonic()
                reload = now - self._repair_reload_at >= REPAIR_RELOAD_INTERVAL
                if reload:
                    self._repair_reload_at = now
            if reload:
                client.reload()
                self._wait_running(client)
        applied = self.reapply_missing(reader)
        problems = runtime_zone_problems(reader, self.config, version)
        if problems:
            raise FirewallError(f"zone {self.config.zone_name} not in place: {'; '.join(problems)}")
        self.set_status(True, "")
        log.info("firewalld: %s; %d grant rules re-applied", reason, applied)
        return applied

    def zone_problems(self, reader: FirewalldClient) -> list[str]:
        return runtime_zone_problems(reader, self.config, reader.version())

    def reapply_missing(self, reader: FirewalldClient) -> int:
        """Re-apply the rules of unexpired entries that firewalld lacks. A present rule was
        (re)applied after the change with a fresh timer and is left alone."""
        if self._current is None:
            return 0
        zone = self.config.zone_name
        wanted: dict[str, str] = {}  # rule -> one-port target
        expiries = dict(self._current())
        for target in expiries:
            with contextlib.suppress(FirewallError):
                wanted.update(target_rules(target, self.config))
        missing = missing_rules(reader, zone, wanted)
        applied = 0
        for rule in missing:
            one_port = wanted[rule]
            with self._mutating(f"re-applying {one_port}") as client:
                if client.query_rich_rule(zone, rule):  # a knock got there first
                    continue
                ttl = seconds_left(target_expiry(expiries, one_port) or 0, self._clock())
                if ttl >= 1:
                    apply_timed(client, zone, rule, ttl)
                    applied += 1
        return applied
