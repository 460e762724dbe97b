"""In-memory whitelist: entries (single addresses or networks) with an expiry.

Owns: the index that answers "is this address whitelisted now?" with one hash lookup per
prefix length in use (never a scan), and the pure rules of granting (a grant never
shortens an entry; at capacity the soonest-expiring other entry is evicted). Entries are
keyed by (version, prefix length, network as int); `entry_text` gives the canonical
spelling. No I/O, no clock: `now` is always an argument. How a whitelist is written on
disk (whitelist.json, the journal) lives in knocker.store.formats.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections import Counter
from collections.abc import Iterator

from .addresses import WIDEST_PREFIX, IPAddress, IPNetwork, parse_network

# (IP version, prefix length, network address as int)
Key = tuple[int, int, int]

_BITS = {4: 32, 6: 128}
# Knocks grant at most an IPv4 /16 or an IPv6 /64 (docs/whitelist.md#widths), so nearly
# every entry sits under one of these prefixes of the address.
_GUARD = WIDEST_PREFIX
_GUARD_SHIFT = {version: _BITS[version] - _GUARD[version] for version in _BITS}
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

    inet_pton (C speed) takes what Knocker writes; anything else (mapped IPv6, host bits
    set, odd spellings) goes through the strict ipaddress path. Loading 100,000 entries
    at startup is why this is not simply parse_network().
    """
    address, slash, plen_text = text.partition("/")
    version = 6 if ":" in address else 4
    bits = _BITS[version]
    try:
        value = int.from_bytes(socket.inet_pton(_FAMILY[version], address), "big")
    except OSError:
        return None
    if not slash:
        plen = bits
    elif plen_text.isdigit() and plen_text[0] != "0" and int(plen_text) <= bits:
        plen = int(plen_text)
    else:
        network = parse_network(text)  # "/0", "/024" and the like: let ipaddress judge
        return None if network is None else key_of(network)
    if (version == 6 and value >> 32 == 0xFFFF) or value & ((1 << (bits - plen)) - 1):
        network = parse_network(text)  # IPv4-mapped, or host bits set
        return None if network is None else key_of(network)
    return (version, plen, value)


class Whitelist:
    """Entries and their expiries, indexed for O(prefix lengths in use) lookups.

    Thread-safety: readers (`allows`) take no lock; writers must be serialised by the
    caller. Every structure a reader walks is replaced, not mutated, when its shape
    changes, and single dict operations are atomic under the GIL.
    """

    def __init__(self) -> None:
        # version -> prefix length -> {network int >> host bits: expiry}
        self._tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        # version -> ((host bits, table), ...), longest prefix first, for the prefixes at
        # least _GUARD long and for the shorter ones; rebuilt when the shape changes
        self._long: dict[int, tuple[tuple[int, dict[int, int]], ...]] = {4: (), 6: ()}
        self._short: dict[int, tuple[tuple[int, dict[int, int]], ...]] = {4: (), 6: ()}
        # version -> {top _GUARD bits: entries under them}: a miss in a /16 (IPv4) or /64
        # (IPv6) nobody knocked from costs one lookup, not one per prefix length
        self._guard: dict[int, dict[int, int]] = {4: {}, 6: {}}
        self._count = 0
        # a lower bound of the soonest expiry, so expired() can skip the scan
        self._soonest: float = float("inf")

    # ------------------------------------------------------------------ reading
    def allows(self, address: IPAddress, now: float) -> bool:
        """True when an unexpired entry contains `address`."""
        value = int(address)
        version = address.version
        if value >> _GUARD_SHIFT[version] in self._guard[version]:
            for shift, table in self._long[version]:
                expiry = table.get(value >> shift)
                if expiry is not None and expiry > now:
                    return True
        for shift, table in self._short[version]:
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

    @property
    def soonest(self) -> float:
        """No entry expires before this (inf when empty); exact after loading."""
        return self._soonest

    def items(self) -> Iterator[tuple[Key, int]]:
        """(key, expiry) for every entry, expired ones included until purged."""
        for version, by_plen in self._tables.items():
            for plen, table in list(by_plen.items()):
                shift = _BITS[version] - plen
                for value, expiry in list(table.items()):
                    yield (version, plen, value << shift), expiry

    def texts(self, now: float = 0.0) -> Iterator[tuple[str, int]]:
        """(entry text, expiry) of the entries expiring after `now` (snapshots: written
        often with 100,000 entries, hence the unrolled loops)."""
        ntop = socket.inet_ntop
        for version, by_plen in self._tables.items():
            family, bits = _FAMILY[version], _BITS[version]
            size = bits // 8
            for plen, table in list(by_plen.items()):
                shift = bits - plen
                suffix = "" if plen == bits else f"/{plen}"
                for value, expiry in list(table.items()):
                    if expiry > now:
                        full = value << shift
                        if version == 6 and full >> 32 == 0:
                            yield entry_text((6, plen, full)), expiry
                        else:
                            yield ntop(family, full.to_bytes(size, "big")) + suffix, expiry

    def as_dict(self, now: float = 0.0) -> dict[str, int]:
        """entry text -> expiry of the entries expiring after `now`."""
        return dict(self.texts(now))

    # ------------------------------------------------------------------ writing
    def set(self, key: Key, expiry: int) -> None:
        """Store `expiry` for `key` as given (replication uses this)."""
        version, plen, value = key
        by_plen = self._tables[version]
        table = by_plen.get(plen)
        if table is None:
            table = by_plen[plen] = {}
            self._reindex(version)
        slot = value >> (_BITS[version] - plen)
        if slot not in table:
            self._count += 1
            if plen >= _GUARD[version]:
                guard = self._guard[version]
                top = value >> _GUARD_SHIFT[version]
                guard[top] = guard.get(top, 0) + 1
        table[slot] = expiry
        if expiry < self._soonest:
            self._soonest = expiry

    def extend(self, key: Key, expiry: int) -> None:
        """Keep the later of the current and the given expiry (loading, replay)."""
        current = self.expiry(key)
        if current is None or current < expiry:
            self.set(key, expiry)

    def extend_hosts(self, version: int, hosts: dict[int, int]) -> None:
        """extend() for many single addresses at once ({address int: expiry}, which the
        whitelist may keep); into an empty table it is a few C-speed bulk operations."""
        bits = _BITS[version]
        if self._tables[version].get(bits) or not hosts:
            for value, expiry in hosts.items():
                self.extend((version, bits, value), expiry)
            return
        self._tables[version][bits] = hosts  # taken over, not copied: it can be big
        self._count += len(hosts)
        guard = self._guard[version]
        for top, count in Counter(value >> _GUARD_SHIFT[version] for value in hosts).items():
            guard[top] = guard.get(top, 0) + count
        self._soonest = min(self._soonest, min(hosts.values()))
        self._reindex(version)

    def remove(self, key: Key) -> bool:
        version, plen, value = key
        by_plen = self._tables[version]
        table = by_plen.get(plen)
        if table is None or table.pop(value >> (_BITS[version] - plen), None) is None:
            return False
        self._count -= 1
        if plen >= _GUARD[version]:
            guard = self._guard[version]
            top = value >> _GUARD_SHIFT[version]
            if guard[top] == 1:
                del guard[top]
            else:
                guard[top] -= 1
        if not table:
            del by_plen[plen]
            self._reindex(version)
        return True

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
        bits, guard = _BITS[version], _GUARD[version]
        by_plen = self._tables[version]
        probes = [(plen, bits - plen, by_plen[plen]) for plen in sorted(by_plen, reverse=True)]
        self._long[version] = tuple(
            (shift, table) for plen, shift, table in probes if plen >= guard
        )
        self._short[version] = tuple(
            (shift, table) for plen, shift, table in probes if plen < guard
        )


def granted_expiry(current: int | None, now: float, ttl: int) -> int:
    """Expiry after a knock for `ttl` seconds: whole seconds rounded up (never cut a grant
    short), and never earlier than the entry's current expiry."""
    expiry = math.ceil(now + ttl)
    return expiry if current is None or current < expiry else current


def live_expiry(expiry: int | None, now: float) -> int | None:
    """`expiry` while it is still running at `now`, else None: the grant a knock extends."""
    return expiry if expiry is not None and expiry > now else None
