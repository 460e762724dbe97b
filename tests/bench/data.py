"""Deterministic whitelists and client address pools for the benchmark.

Entries: 60 % IPv4 hosts, 30 % IPv6 hosts, 10 % networks (half IPv4 /16-/31, half IPv6
/64-/127), all unexpired. Entries live in 1.0.0.0-100.255.255.255 and 2001:db8::/33;
misses come from 198.18.0.0/15 (RFC 2544's benchmarking range) and 2001:db8:8000::/33,
which no entry covers, so "hit" and "miss" are known without asking the server.
"""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path

_V4_MISS = int(ipaddress.IPv4Address("198.18.0.0"))  # /15: 131072 addresses
_V6_BASE = int(ipaddress.IPv6Address("2001:db8::"))
_V6_MISS = int(ipaddress.IPv6Address("2001:db8:8000::"))
_V6_HALF = 1 << 95  # size of a /33


def _v4_entry(rng: random.Random) -> int:
    return rng.randrange(1 << 24, 101 << 24)


def _v6_entry(rng: random.Random) -> int:
    return _V6_BASE + rng.randrange(_V6_HALF)


def make_entries(count: int, expiry: int, seed: int = 1) -> dict[str, int]:
    """`count` distinct canonical entries -> `expiry`, in the mix above."""
    rng = random.Random(seed)
    entries: dict[str, int] = {}
    while len(entries) < count:
        roll = rng.random()
        if roll < 0.6:
            text = str(ipaddress.IPv4Address(_v4_entry(rng)))
        elif roll < 0.9:
            text = str(ipaddress.IPv6Address(_v6_entry(rng)))
        elif roll < 0.95:
            text = str(ipaddress.IPv4Network((_v4_entry(rng), rng.randint(16, 31)), strict=False))
        else:
            text = str(ipaddress.IPv6Network((_v6_entry(rng), rng.randint(64, 127)), strict=False))
        entries[text] = expiry
    return entries


def hit_address(entry: str, rng: random.Random) -> str:
    """An address the entry covers (a random one inside a network)."""
    if "/" not in entry:
        return entry
    network = ipaddress.ip_network(entry)
    offset = rng.randrange(network.num_addresses)
    return str(network.network_address + offset)


def miss_addresses(count: int, rng: random.Random) -> list[str]:
    """`count` distinct addresses outside every generated entry, 2 IPv4 : 1 IPv6."""
    v4 = rng.sample(range(1 << 17), (2 * count + 2) // 3)
    v6 = rng.sample(range(1 << 40), count - len(v4))
    return [str(ipaddress.IPv4Address(_V4_MISS + n)) for n in v4] + [
        str(ipaddress.IPv6Address(_V6_MISS + (n << 24))) for n in v6
    ]


def verify_pool(entries: dict[str, int], distinct: int, seed: int = 2) -> list[str]:
    """X-Forwarded-For values, alternating hit and miss, `distinct` long (half hits drawn
    from the entries, a random address inside a network entry; half misses)."""
    rng = random.Random(seed)
    keys = list(entries)
    hits = [hit_address(rng.choice(keys), rng) for _ in range(distinct // 2)]
    misses = miss_addresses(distinct - len(hits), rng)
    rng.shuffle(misses)
    pool: list[str] = []
    for hit, miss in zip(hits, misses, strict=False):
        pool += [hit, miss]
    return pool


def knock_pool(count: int, seed: int = 3) -> list[str]:
    """Distinct client addresses for knocks, outside the pre-populated entries."""
    return miss_addresses(count, random.Random(seed))


def write_whitelist(path: Path, entries: dict[str, int]) -> None:
    path.write_text(json.dumps(entries, separators=(", ", ": ")))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def write_scoped_grants(path: Path, entries: dict[str, int], key_name: str) -> Path:
    """whitelist.json.grants holding `entries` as grants of the host-scoped `key_name`."""
    from knocker.store.grant_format import Grant, encode_grants

    path.write_bytes(
        encode_grants(
            Grant(entry, key_name, expiry, expiry - 3600, "knock", scoped=True)
            for entry, expiry in entries.items()
        )
    )
    path.chmod(0o600)
    return path
