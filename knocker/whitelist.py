"""In-memory whitelist: entries (single addresses or networks) with an expiry.

Owns: the index that answers "is this address whitelisted now?" with one hash lookup per
prefix length in use (never a scan), and the pure rules of granting (a grant never
shortens an entry; at capacity the soonest-expiring other entry is evicted). Entries are
keyed by (version, prefix length, network as int); `entry_text` gives the canonical
spelling. No I/O, no clock: `now` is always an argument.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

from .addresses import IPAddress, IPNetwork, parse_network

# (IP version, prefix length, network address as int)
Key = tuple[int, int, int]

_BITS = {4: 32, 6: 128}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


def key_of(network: IPNetwork) -> Key:
    return (network.version, network.prefixlen, int(network.network_address))


def entry_text(key: Key) -> str:
    """Canonical spelling: `1.2.3.4`, `2001:db8::1`, `10.0.0.0/24`."""
    version, plen, value = key
    bits = _BITS[version]
    if version == 6 and value >> 32 == 0:
        # glibc spells ::/96 as "::1.2.3.4"; ipaddress (our canonical form) as "::102:304"
        address = str(ipaddress.IPv6Address(value))
    else:
        address = socket.inet_ntop(_FAMILY[version], value.to_bytes(bits // 8, "big"))
    return address if plen == bits else f"{address}/{plen}"


def parse_entry(text: str) -> Key | None:
    """Key of a stored entry, or None when it is not a valid address or network.

    Entries written by Knocker are canonical, so inet_pton (C speed) parses them; anything
    it cannot take goes through the strict ipaddress path (mapped IPv6, host bits set).
    """
    address, _, plen_text = text.partition("/")
    version = 6 if ":" in address else 4
    try:
        packed = socket.inet_pton(_FAMILY[version], address)
        plen = int(plen_text) if plen_text else _BITS[version]
    except (OSError, ValueError):
        return None
    value = int.from_bytes(packed, "big")
    bits = _BITS[version]
    mapped = version == 6 and value >> 32 == 0xFFFF
    canonical_plen = plen_text == ("" if plen == bits else str(plen))
    if (not mapped and 0 <= plen <= bits and canonical_plen
            and value & ((1 << (bits - plen)) - 1) == 0
            and entry_text((version, plen, value)) == text):
        return (version, plen, value)
    network = parse_network(text)
    return None if network is None else key_of(network)


class Whitelist:
    """Entries and their expiries, indexed for O(prefix lengths in use) lookups.

    Thread-safety: readers (`allows`) take no lock; writers must be serialised by the
    caller. Every structure a reader walks is replaced, not mutated, when its shape
    changes, and single dict operations are atomic under the GIL.
    """

    def __init__(self) -> None:
        # version -> prefix length -> {network int >> host bits: expiry}
        self._tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        # version -> ((host bits, table), ...) longest prefix first; rebuilt on shape change
        self._probes: dict[int, tuple[tuple[int, dict[int, int]], ...]] = {4: (), 6: ()}
        self._count = 0
        # a lower bound of the soonest expiry, so purge() can skip the scan
        self._soonest: float = float("inf")

    # ------------------------------------------------------------------ reading
    def allows(self, address: IPAddress, now: float) -> bool:
        """True when an unexpired entry contains `address`."""
        value = int(address)
        for shift, table in self._probes[address.version]:
            expiry = table.get(value >> shift)
            if expiry is not None and expiry > now:
                return True
        return False

    def expiry(self, key: Key) -> int | None:
        version, plen, value = key
        table = self._tables[version].get(plen)
        if table is None:
            return None
        return table.get(value >> (_BITS[version] - plen))

    def __len__(self) -> int:
        return self._count

    def items(self) -> Iterator[tuple[Key, int]]:
        """(key, expiry) for every entry, expired ones included until purged."""
        for version, by_plen in self._tables.items():
            for plen, table in list(by_plen.items()):
                shift = _BITS[version] - plen
                for value, expiry in list(table.items()):
                    yield (version, plen, value << shift), expiry

    def as_dict(self) -> dict[str, int]:
        return {entry_text(key): expiry for key, expiry in self.items()}

    # ------------------------------------------------------------------ writing
    def set(self, key: Key, expiry: int) -> None:
        """Store `expiry` for `key` as given (replication and loading use this)."""
        version, plen, value = key
        by_plen = self._tables[version]
        table = by_plen.get(plen)
        if table is None:
            table = by_plen[plen] = {}
            self._reindex(version)
        slot = value >> (_BITS[version] - plen)
        if slot not in table:
            self._count += 1
        table[slot] = expiry
        if expiry < self._soonest:
            self._soonest = expiry

    def remove(self, key: Key) -> bool:
        version, plen, value = key
        by_plen = self._tables[version]
        table = by_plen.get(plen)
        if table is None or table.pop(value >> (_BITS[version] - plen), None) is None:
            return False
        self._count -= 1
        if not table:
            del by_plen[plen]
            self._reindex(version)
        return True

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def expired(self, now: float) -> list[Key]:
        """Keys whose expiry has passed; cheap when nothing can have expired yet."""
        if now < self._soonest:
            return []
        soonest = float("inf")
        gone = []
        for key, expiry in self.items():
            if expiry <= now:
                gone.append(key)
            elif expiry < soonest:
                soonest = expiry
        self._soonest = soonest
        return gone

    def victims(self, key: Key, capacity: int, now: float) -> list[Key]:
        """Entries to evict so that granting `key` keeps at most `capacity` entries:
        expired ones first, then the soonest-expiring, never `key` itself. O(n), and
        only called when the whitelist is full."""
        if self.expiry(key) is not None or self._count < capacity:
            return []
        excess = self._count - capacity + 1
        ranked = sorted((expiry, k) for k, expiry in self.items() if k != key)
        return [k for _, k in ranked[:excess]]

    def _reindex(self, version: int) -> None:
        bits = _BITS[version]
        by_plen = self._tables[version]
        self._probes[version] = tuple((bits - plen, by_plen[plen])
                                      for plen in sorted(by_plen, reverse=True))


def granted_expiry(current: int | None, now: float, ttl: int) -> int:
    """Expiry after a knock for `ttl` seconds: whole seconds rounded up (never cut a grant
    short), and never earlier than the entry's current expiry."""
    expiry = -int(-(now + ttl) // 1)
    return expiry if current is None or current < expiry else current


def load_entries(data: object, now: float) -> tuple[dict[Key, int], list[str]]:
    """Entries of an upstream whitelist.json object ({"entry": unix_expiry_int}).

    Returns the unexpired valid entries and a list of complaints about skipped ones (which
    never quote more than the entry text). Raises ValueError if `data` is not an object.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    entries: dict[Key, int] = {}
    problems = []
    for text, expiry in data.items():
        key = parse_entry(text) if isinstance(text, str) and len(text) <= 100 else None
        if key is None:
            problems.append(f"{text[:100]!r}: not an IP address or network")
        elif isinstance(expiry, bool) or not isinstance(expiry, (int, float)):
            problems.append(f"{text!r}: expiry is not a number")
        elif expiry > now:
            ceiling = -int(-expiry // 1)
            entries[key] = max(entries.get(key, 0), ceiling)
    return entries, problems
