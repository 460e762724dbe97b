"""The firewall seam: what the knock path asks of a firewall, and the null backend.

Owns: the Firewall protocol, NullFirewall, and `create_firewall`, the one place that picks
a backend from the config (today: firewalld when `firewalld.enabled`, else none). A new
backend is one module implementing Firewall, its config section in config.py, and one
branch in create_firewall. app.py calls prepare() once per service start; the store
calls grant() before the whitelist changes and revoke() when entries leave it; none of
them is ever called on the /verify path (docs/whitelist.md, docs/firewalld.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from .config import FirewalldConfig

# entry (canonical IP or CIDR string) -> expiry (int Unix seconds)
Entries = Mapping[str, int]


class Firewall(Protocol):
    def prepare(self, entries: Entries, now: float) -> None:
        """Once per service start, before any worker serves: set up the zone, restore the
        unexpired `entries`, verify. Raises FirewallError (the service must not start)."""

    def start_worker(self, current: Callable[[], Entries]) -> None:
        """In each serving process: open connections; `current()` returns the live
        whitelist (used to re-apply grants after the firewall lost them)."""

    def grant(self, entry: str, ttl: int) -> None:
        """Open `entry` for `ttl` seconds (replacing any earlier timeout), all or nothing.
        Raises FirewallUnavailable (503) or FirewallError (500); nothing stays granted."""

    def revoke(self, entries: Iterable[str]) -> None:
        """Close `entries`; best effort (a failure is logged, never raised)."""

    def problem(self) -> str | None:
        """None when the firewall is in place, else why not (for /ready)."""

    def close(self) -> None:
        """Release connections and threads."""


class NullFirewall:
    """No firewall: the whitelist alone decides (reverse-proxy mode)."""

    def prepare(self, entries: Entries, now: float) -> None:
        pass

    def start_worker(self, current: Callable[[], Entries]) -> None:
        pass

    def grant(self, entry: str, ttl: int) -> None:
        pass

    def revoke(self, entries: Iterable[str]) -> None:
        pass

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        pass


def create_firewall(config: FirewalldConfig, state_dir: str) -> Firewall:
    """The backend the config asks for. `state_dir` holds the whitelist files; a backend
    may keep its own lock files there (e.g. to elect one process as its watcher)."""
    if not config.enabled:
        return NullFirewall()
    from .firewalld import FirewalldFirewall  # edge module, imported only when enabled

    return FirewalldFirewall(config, state_dir)
