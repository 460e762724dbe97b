"""Pure: the interface between the app and wherever the whitelist is kept.

Owns `WhitelistBackend`, everything app.py may ask of a whitelist store, and the value a
knock returns. The file store (filestore.py) is one implementation; a shared server
(Redis/Valkey) can be another without the app changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..addresses import IPAddress
from ..ratelimit import Outcome
from ..whitelist import Key


@dataclass(frozen=True)
class KnockResult:
    entry: str
    expires_at: int
    evicted: tuple[str, ...]


class WhitelistBackend(Protocol):
    """One service's whitelist and knock budgets, shared by all its worker processes.

    Every method that changes something is durable when it returns; `now` comes from
    the caller's clock."""

    location: str  # what to name in logs: a path, a URL without credentials

    def __len__(self) -> int:
        """Entries currently held (expired ones included until purged)."""
        ...

    def allows(self, address: IPAddress, now: float) -> bool:
        """The /verify question: is `address` inside an unexpired entry?"""
        ...

    def entries(self) -> dict[str, int]:
        """entry -> expiry of the whole live whitelist (the firewall's re-apply)."""
        ...

    def knock(self, key: Key, ttl: int, now: float) -> KnockResult:
        """Grant `key` for `ttl` seconds (firewall first); raises StorageError or
        FirewallError with nothing granted anywhere."""
        ...

    def rate_reserve(self, client: bytes, now: float) -> bool:
        """Check `client`'s knock budgets and hold one knock's place in them, atomically
        across every worker; False (nothing held) when a budget is used up."""
        ...

    def rate_settle(self, client: bytes, outcome: Outcome, now: float) -> None:
        """Release a reservation, counting the knock as what it turned out to be."""
        ...

    def ready(self) -> str | None:
        """None when a knock could be stored now, else why not (for /ready)."""
        ...

    def start(self) -> None:
        """Begin this serving process's background work (after any fork)."""
        ...

    def close(self) -> None:
        """Stop background work, leave the storage current and release every resource."""
        ...
