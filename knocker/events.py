"""Edge: the hook the app, the store and the firewall report what happened through.

Owns: the `Events` protocol (what may be reported) and `Observer`, which turns each report
into an audit record and, when metrics are on, a count. A component given no observer gets
`NO_EVENTS`, which does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from .audit import AuditLog, Event, Record

if TYPE_CHECKING:
    from .metrics import Metrics


class Events(Protocol):
    """What the store and the firewall report; every method is cheap and never raises."""

    def evicted(self, entries: Sequence[str], now: float) -> None: ...

    def expired(self, entries: Sequence[str], now: float) -> None: ...

    def firewall_reapplied(self) -> None: ...

    def dbus_call(self, seconds: float) -> None: ...

    def storage_synced(self, seconds: float) -> None: ...


class NoEvents:
    def evicted(self, entries: Sequence[str], now: float) -> None:
        pass

    def expired(self, entries: Sequence[str], now: float) -> None:
        pass

    def firewall_reapplied(self) -> None:
        pass

    def dbus_call(self, seconds: float) -> None:
        pass

    def storage_synced(self, seconds: float) -> None:
        pass


NO_EVENTS: Events = NoEvents()

# Knock audit event -> the `result` label of knocker_knocks_total
_KNOCK_RESULT = {
    Event.GRANT: "granted",
    Event.EXTEND: "extended",
    Event.KNOCK_FAILED: "refused",
    Event.KNOCK_RATE_LIMITED: "rate_limited",
    Event.KNOCK_ERROR: "error",
}


class Observer:
    """Audit trail plus optional metrics: the app's reports and the `Events` hook."""

    def __init__(self, audit: AuditLog, metrics: Metrics | None = None) -> None:
        self.audit = audit
        self.metrics = metrics

    def knock(self, record: Record, now: float) -> None:
        """One knock's outcome (grant, extend or a refusal): audited and counted."""
        self.audit.emit(record, now)
        if self.metrics is not None:
            self.metrics.knock(_KNOCK_RESULT[record.event], record.key)

    def ended(self, record: Record, now: float) -> None:
        """A revoke or sign-out that ended grants: audited and counted."""
        self.audit.emit(record, now)
        if self.metrics is not None:
            self.metrics.grants_ended(record.event.value)

    def evicted(self, entries: Sequence[str], now: float) -> None:
        for entry in entries:
            self.audit.emit(Record(Event.EVICT, entry=entry), now)
        if self.metrics is not None and entries:
            self.metrics.evicted(len(entries))

    def expired(self, entries: Sequence[str], now: float) -> None:
        for entry in entries:
            self.audit.emit(Record(Event.EXPIRE, entry=entry), now)
        if self.metrics is not None and entries:
            self.metrics.expired(len(entries))

    def firewall_reapplied(self) -> None:
        if self.metrics is not None:
            self.metrics.firewall_reapplied()

    def dbus_call(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.dbus_call(seconds)

    def storage_synced(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.storage_synced(seconds)

    def close(self) -> None:
        self.audit.close()
