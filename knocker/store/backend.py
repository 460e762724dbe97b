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
from .grant_format import Grant


@dataclass(frozen=True)
class KnockResult:
    entry: str
    expires_at: int
    evicted: tuple[str, ...]
    extended: bool = False  # the entry was live before this knock (decided under the lock)


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
        """Grant `key` for `ttl` seconds (firewall first); raises StorageError or
        FirewallError with nothing granted anywhere. With `key_name`, also record the
        grant (that key's, `how` = knock or remote) for grants() and revoke(). A
        `scoped` grant (a key with hosts:) stays out of the unscoped whitelist, so
        allows() never sees it: only scoped_allows() does. `ports` (a key with ports:,
        "22/tcp"): the grant opens only those monitored ports in the firewall."""
        ...

    def scoped_allows(self, address: IPAddress, key_names: tuple[str, ...], now: float) -> bool:
        """/verify for scoped grants: has a key among `key_names` a live scoped grant
        covering `address`? Hash lookups, like allows()."""
        ...

    def grants(self, now: float) -> list[Grant]:
        """Every live grant, one per (entry, granting key); an entry's time not covered
        by a recorded grant is a `restored` grant (docs/whitelist.md#grants)."""
        ...

    def revoke(self, key: Key, key_name: str | None, now: float) -> list[Grant]:
        """End `key_name`'s grants of `key` (None: all of them) in memory, durably and
        in the firewall before returning; what was ended, empty when nothing was."""
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
