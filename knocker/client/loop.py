"""The `knocker watch` schedule: knock at start, again when 90 % of the granted TTL has
passed, when ip_check_url reports a new address, and after failures with bounded
exponential backoff. Time is an argument: KnockLoop reads only the `clock` (wall) and
`monotonic` it is given and waits only through `sleep`, so tests drive it on fake time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import __version__
from .events import PRIORITY_ERROR, PRIORITY_NOTICE, PRIORITY_WARNING, EventLog
from .knock import KnockFailed, KnockResult, Transport, cap_warning, fetch_public_ip, knock
from .settings import Settings, display_url

REFRESH_FRACTION = 0.9  # knock again when 90 % of the granted TTL has passed
MIN_REFRESH_SECONDS = 1.0
# A laptop that sleeps does not advance monotonic time; waking at least this often and
# comparing against the wall clock keeps a resumed machine from knocking late.
MAX_WAIT_SECONDS = 30.0

# KNOCKER_CADENCE_SOURCE values. The first three are the Go knocker-cli's; the GNOME
# extension only stores the value, so the two situations it has no name for get their own.
CADENCE_TTL = "ttl"  # the requested ttl setting was granted and sets the cadence
CADENCE_TTL_RESPONSE = "ttl_response"  # the server's granted TTL sets it
CADENCE_CHECK_INTERVAL = "check_interval"  # no TTL known: every check_interval minutes
CADENCE_BACKOFF = "backoff"  # retrying after a failed knock
CADENCE_IP_CHANGE = "ip_change"  # ip_check_url reported a new address


def utc(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


@dataclass(frozen=True)
class Deadline:
    """A moment held on both clocks: due when either says so. The wall clock catches up
    after a suspend (monotonic time stands still then); the monotonic one is immune to the
    wall clock being set back."""

    wall: float
    mono: float

    def due(self, wall: float, mono: float) -> bool:
        return wall >= self.wall or mono >= self.mono

    def remaining(self, wall: float, mono: float) -> float:
        return min(self.wall - wall, self.mono - mono)


@dataclass
class _State:
    result: KnockResult | None = None
    expiry: Deadline | None = None
    next_knock: Deadline | None = None
    cadence: str = ""
    failures: int = 0
    last_ip: str | None = None
    seen_ip: str | None = None
    next_ip_check: Deadline | None = None


class KnockLoop:
    """The `knocker watch` loop, with every effect injected: `transport` (HTTP), `clock`
    and `monotonic` (now), `sleep(seconds) -> stop` (waits up to `seconds`; True when asked
    to stop), `rng` (jitter)."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        transport: Transport,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        sleep: Callable[[float], bool],
        rng: Callable[[], float],
        ip: str | None = None,
        backoff_min: float = 5.0,
        backoff_max: float = 300.0,
    ) -> None:
        self.settings = settings
        self.log = log
        self.transport = transport
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep
        self.rng = rng
        self.ip = ip
        self.backoff_min = backoff_min
        self.backoff_max = max(backoff_max, backoff_min)
        self.state = _State()

    def backoff(self, failures: int) -> float:
        """Exponential, bounded, with "equal jitter": half fixed, half random, so retries of
        many clients spread out while each delay still grows."""
        ceiling = min(self.backoff_max, self.backoff_min * 2.0 ** min(failures - 1, 30))
        return ceiling / 2 + self.rng() * ceiling / 2

    def refresh_delay(self, result: KnockResult) -> tuple[float, str]:
        """Seconds until the next knock after `result`, and the cadence source to report."""
        ttl = result.expires_in_seconds
        if ttl > 0:
            delay = max(MIN_REFRESH_SECONDS, ttl * REFRESH_FRACTION)
            source = CADENCE_TTL if ttl == self.settings.ttl else CADENCE_TTL_RESPONSE
            return delay, source
        return self.settings.check_interval_minutes * 60, CADENCE_CHECK_INTERVAL

    def _after(self, seconds: float) -> Deadline:
        return Deadline(self.clock() + seconds, self.monotonic() + seconds)

    def _due(self, deadline: Deadline | None) -> bool:
        return deadline is not None and deadline.due(self.clock(), self.monotonic())

    # -- events -----------------------------------------------------------------------

    def _snapshot(self) -> None:
        s = self.state
        parts = []
        if s.result is not None:
            parts.append(f"whitelisted {s.result.entry} until {utc(s.result.expires_at)}")
        else:
            parts.append("not whitelisted")
        if s.next_knock is not None:
            parts.append(f"next knock at {utc(s.next_knock.wall)}")
        self.log.emit(
            "StatusSnapshot",
            "Status: " + ", ".join(parts),
            KNOCKER_WHITELIST_IP=s.result.entry if s.result else None,
            KNOCKER_EXPIRES_UNIX=s.result.expires_at if s.result else None,
            KNOCKER_TTL_SEC=s.result.expires_in_seconds if s.result else None,
            KNOCKER_NEXT_AT_UNIX=int(s.next_knock.wall) if s.next_knock is not None else None,
            KNOCKER_CADENCE_SOURCE=s.cadence,
        )

    def _set_next_knock(self, delay: float, cadence: str) -> None:
        self.state.next_knock = self._after(delay)
        self.state.cadence = cadence
        when = self.state.next_knock.wall
        self.log.emit(
            "NextKnockUpdated",
            f"Next knock at {utc(when)}",
            KNOCKER_NEXT_AT_UNIX=int(when),
            KNOCKER_CADENCE_SOURCE=cadence,
        )

    # -- steps ------------------------------------------------------------------------

    def _expire(self) -> None:
        s = self.state
        assert s.result is not None
        expired = s.result
        s.result = s.expiry = None
        self.log.emit(
            "WhitelistExpired",
            f"Whitelist expired for {expired.entry} at {utc(expired.expires_at)}",
            PRIORITY_NOTICE,
            KNOCKER_WHITELIST_IP=expired.entry,
            KNOCKER_EXPIRED_UNIX=expired.expires_at,
        )
        self._snapshot()

    def _check_ip(self) -> None:
        s = self.state
        assert self.settings.ip_check_url is not None
        s.next_ip_check = self._after(self.settings.check_interval_minutes * 60)
        try:
            address = fetch_public_ip(self.settings.ip_check_url, self.transport)
        except ValueError as error:
            self.log.emit(
                "Error",
                f"IP lookup failed: {error}",
                PRIORITY_ERROR,
                KNOCKER_ERROR_CODE="ip_lookup_failed",
                KNOCKER_ERROR_MSG=str(error),
                KNOCKER_CONTEXT=display_url(self.settings.ip_check_url),
            )
            return
        s.seen_ip = address
        if address == s.last_ip:
            return
        if s.last_ip is not None:
            self.log.emit(None, f"Public address changed from {s.last_ip} to {address}")
        # A knock already due (startup) or a backoff retry in progress covers the change.
        if s.failures == 0 and not self._due(s.next_knock):
            self._set_next_knock(0.0, CADENCE_IP_CHANGE)
            self._snapshot()

    def _knock(self) -> None:
        s = self.state
        seen = s.seen_ip
        try:
            result = knock(self.settings, self.transport, ttl=self.settings.ttl, ip=self.ip)
        except KnockFailed as failure:
            s.failures += 1
            self.log.emit(
                "KnockTriggered",
                f"Knock triggered via schedule: failure ({failure.message})",
                PRIORITY_ERROR,
                KNOCKER_TRIGGER_SOURCE="schedule",
                KNOCKER_RESULT="failure",
            )
            self.log.emit(
                "Error",
                f"Knock failed: {failure.message}",
                PRIORITY_ERROR,
                KNOCKER_ERROR_CODE="knock_failed",
                KNOCKER_ERROR_MSG=failure.message,
                KNOCKER_CONTEXT=display_url(self.settings.api_url),
                KNOCKER_HTTP_STATUS=failure.status,
            )
            self._set_next_knock(self.backoff(s.failures), CADENCE_BACKOFF)
            self._snapshot()
            return
        s.failures = 0
        s.result = result
        s.expiry = Deadline(float(result.expires_at), self.monotonic() + result.expires_in_seconds)
        s.last_ip = seen if seen is not None else s.last_ip
        self.log.emit(
            "KnockTriggered",
            "Knock triggered via schedule: success",
            KNOCKER_TRIGGER_SOURCE="schedule",
            KNOCKER_RESULT="success",
            KNOCKER_WHITELIST_IP=result.entry,
        )
        self.log.emit(
            "WhitelistApplied",
            f"Whitelisted {result.entry} for {result.expires_in_seconds}s "
            f"(expires at {utc(result.expires_at)})",
            KNOCKER_WHITELIST_IP=result.entry,
            KNOCKER_TTL_SEC=result.expires_in_seconds,
            KNOCKER_EXPIRES_UNIX=result.expires_at,
            KNOCKER_SOURCE="schedule",
        )
        warning = cap_warning(self.settings.ttl, result)
        if warning:
            self.log.emit(None, warning, PRIORITY_WARNING)
        self._set_next_knock(*self.refresh_delay(result))
        self._snapshot()

    def _stop(self) -> None:
        s = self.state
        self.log.emit(
            "ServiceState",
            "Service state: stopping",
            PRIORITY_NOTICE,
            KNOCKER_SERVICE_STATE="stopping",
            KNOCKER_VERSION=__version__,
        )
        # Nothing is scheduled any more: say so ("0" clears it, as in the Go client), so a
        # reader rebuilding its state from the journal does not wait for a knock.
        s.next_knock = None
        s.cadence = ""
        self.log.emit("NextKnockUpdated", "Next knock cleared", KNOCKER_NEXT_AT_UNIX=0)
        self._snapshot()
        self.log.emit(
            "ServiceState",
            "Service state: stopped",
            KNOCKER_SERVICE_STATE="stopped",
            KNOCKER_VERSION=__version__,
        )

    def run(self) -> int:
        """Until `sleep` reports a stop; 0."""
        s = self.state
        self.log.emit(
            "ServiceState",
            f"Service state: started (knocker {__version__}, {display_url(self.settings.api_url)})",
            KNOCKER_SERVICE_STATE="started",
            KNOCKER_VERSION=__version__,
        )
        s.next_knock = self._after(0.0)
        s.cadence = CADENCE_TTL if self.settings.ttl else CADENCE_CHECK_INTERVAL
        if self.settings.ip_check_url:
            s.next_ip_check = self._after(0.0)
        self._snapshot()
        while True:
            if self._due(s.expiry):
                self._expire()
            if self._due(s.next_ip_check):
                self._check_ip()
            if self._due(s.next_knock):
                self._knock()
            wall, mono = self.clock(), self.monotonic()
            waits = [
                d.remaining(wall, mono)
                for d in (s.next_knock, s.next_ip_check, s.expiry)
                if d is not None
            ]
            delay = min([MAX_WAIT_SECONDS, *waits])
            if self.sleep(max(delay, 0.0)):
                break
        self._stop()
        return 0
