"""Pure parsing of IP addresses and networks, shared by config, proxies and policy.

Owns: what counts as an address. IPv4-mapped IPv6 (::ffff:a.b.c.d) is always its IPv4
address; zone indices (fe80::1%eth0) are refused; networks with host bits set become
their network. No I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# The widest network one knock may grant, per IP version: an IPv4 /16 (65536 addresses) or
# one IPv6 subnet (/64). policy.py refuses wider knocks; whitelist.py's index is built
# around these prefixes (docs/whitelist.md#widths).
WIDEST_PREFIX = {4: 16, 6: 64}

# RFC 4291 2.5.5.2: ::ffff:0:0/96 holds IPv4 addresses seen through an IPv6 socket.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_ip(text: str) -> IPAddress | None:
    """A bare address (no brackets, port, prefix or zone), mapped IPv6 unwrapped; else None."""
    if not text or len(text) > 45 or "%" in text or "/" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return unmap(address)


def unmap(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped IPv6 address stands for; other addresses unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text: str, require_mask: bool = False) -> IPNetwork | None:
    """An address or CIDR as a network (host bits cleared, mapped IPv6 as IPv4); else None.

    require_mask: the text must carry an explicit /prefix (firewalld.monitored_ips).
    """
    if not text or len(text) > 100 or "%" in text or text != text.strip():
        return None
    if require_mask and "/" not in text:
        return None
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        # ::ffff:10.0.0.0/104 is 10.0.0.0/8 seen through IPv6.
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((int(mapped), network.prefixlen - 96))
    return network


def canonical(network: IPNetwork) -> str:
    """The whitelist's spelling: single addresses without a prefix length."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)
