"""The watcher: one thread per service that notices firewalld losing Knocker's rules.

Owns: the election of one watching process (a flock; another process takes over within
ELECTION_RETRY when the holder dies), the subscription to firewalld's Reloaded signal and
to its bus name changing owner, and the loop that runs the jobs of schedule.py. Signals
and calls both go through BusConnection; the repairs themselves are the backend's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ..errors import FirewallError
from .bus import BusConnection, SignalConnection
from .calls import CALL_TIMEOUT, FirewalldClient
from .coordination import FileLock
from .failures import DBUS_FAILURES
from .messages import APPEARED, RELOADED, VANISHED, msg_add_match, signal_event, signal_rules
from .schedule import CHECK, RECHECK, RECONCILE, Job, ReapplySchedule

log = logging.getLogger("knocker.firewalld")

ELECTION_RETRY = 0.5
RECEIVE_TIMEOUT = 0.25  # how long one wait for a signal lasts before the schedule is looked at
GONE = "firewalld is not running (no owner of its D-Bus name)"


class Keeper(Protocol):
    """What the watcher asks of the backend (FirewalldFirewall)."""

    def reconcile(self, reader: FirewalldClient, reason: str) -> int: ...

    def reapply_missing(self, reader: FirewalldClient) -> int: ...

    def zone_problems(self, reader: FirewalldClient) -> list[str]: ...

    def set_status(self, ok: bool, reason: str) -> None: ...

    def touch_status(self) -> None: ...


class Watcher(threading.Thread):
    """Elects itself (or keeps trying), then listens and repairs until stop()."""

    def __init__(
        self,
        keeper: Keeper,
        lock_path: str,
        connect: Callable[[], SignalConnection] = BusConnection,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        super().__init__(name="knocker-firewalld-watcher", daemon=True)
        self.keeper = keeper
        self._connect = connect
        self._monotonic = monotonic
        self._stop_event = threading.Event()
        # By default a pause ends early when stop() is called.
        self._sleep = sleep or self._stop_event.wait
        self._lock = FileLock(lock_path)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                try:
                    elected = self._lock.try_acquire()
                except OSError as exc:
                    log.error("firewalld: watcher lock unusable: %s", exc)
                    elected = False
                if elected:
                    log.info("firewalld: process %d watches firewalld", os.getpid())
                    self._watch()
                    return
                self._sleep(ELECTION_RETRY)
        finally:
            self._lock.close()

    def _watch(self) -> None:
        while not self._stop_event.is_set():
            signals, calls = self._connect(), self._connect()
            try:
                self._listen(signals, FirewalldClient(calls))
            except DBUS_FAILURES as exc:
                self.keeper.set_status(False, f"system bus unreachable: {exc}")
                log.warning("firewalld: watcher lost the bus: %s", exc)
                self._sleep(1.0)
            except Exception:  # a bug must not silently end the watching: say it, go on
                log.exception("firewalld: watcher failed")
                self.keeper.set_status(False, "the firewalld watcher failed (see the log)")
                self._sleep(5.0)
            finally:
                signals.close()
                calls.close()

    def _listen(self, signals: SignalConnection, reader: FirewalldClient) -> None:
        """Subscribe on `signals` (from then on it only receives), then run the schedule's
        jobs with `reader` and feed it what the signals say."""
        rules = signal_rules()
        for rule in rules:
            signals.call(msg_add_match(rule), CALL_TIMEOUT)
        schedule = ReapplySchedule(reader.has_owner(), self._monotonic())
        if not schedule.present:
            self.keeper.set_status(False, GONE)
        while not self._stop_event.is_set():
            job = schedule.next_job(self._monotonic())
            if job is not None:
                self._run(job, schedule, reader)
            if schedule.beat_due(self._monotonic()):
                self.keeper.touch_status()
                schedule.beat(self._monotonic())
            message = signals.receive(RECEIVE_TIMEOUT)
            event = None if message is None else signal_event(message, rules)
            if event == RELOADED:
                schedule.reloaded()
            elif event == APPEARED:
                schedule.appeared()
            elif event == VANISHED:
                schedule.vanished()
                log.warning("firewalld: firewalld left the bus")
                self.keeper.set_status(False, GONE)

    def _run(self, job: Job, schedule: ReapplySchedule, reader: FirewalldClient) -> None:
        if job.kind == RECONCILE:
            try:
                self.keeper.reconcile(reader, job.reason)
                schedule.reconciled(self._monotonic())
            except (FirewallError, *DBUS_FAILURES) as exc:
                log.warning("firewalld: after %s: %s", job.reason, exc)
                self.keeper.set_status(False, f"firewalld {job.reason}, not in place: {exc}")
                schedule.reconcile_failed(job.reason, self._monotonic())
        elif job.kind == RECHECK:
            # Second look: a grant whose whitelist write was in flight during the
            # reconcile is in the whitelist now.
            try:
                self.keeper.reapply_missing(reader)
            except (FirewallError, *DBUS_FAILURES) as exc:
                log.warning("firewalld: re-check failed: %s", exc)
        elif job.kind == CHECK:
            # A signal may be lost (bus overload), or the zone changed at runtime
            # without one: look now and then, cheaply (a few read-only calls).
            try:
                if self.keeper.reapply_missing(reader) or self.keeper.zone_problems(reader):
                    schedule.needs_reconcile("zone or grants changed")
            except (FirewallError, *DBUS_FAILURES) as exc:
                log.warning("firewalld: periodic check failed: %s", exc)
                schedule.needs_reconcile("periodic check failed")
