"""knocker.addresses: what counts as an IP address or network (shared by every module)."""

from __future__ import annotations

import pytest

from knocker.addresses import canonical, parse_ip, parse_network, unmap
from tests.support.net import ip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("::1", "::1"),
    ],
)
def test_bare_addresses_parse(text: str, expected: str) -> None:
    """IPv4 and IPv6 addresses parse to their canonical address."""
    assert str(parse_ip(text)) == expected


def test_ipv4_mapped_ipv6_address_is_its_ipv4_address() -> None:
    """::ffff:a.b.c.d is the IPv4 address it maps, not an IPv6 address."""
    address = parse_ip("::ffff:203.0.113.7")
    assert address == ip("203.0.113.7")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fe80::1%eth0",
        "1.2.3.4/32",
        "[::1]",
        "1.2.3.4:80",
        " 1.2.3.4",
        "1.2.3.4 ",
        "01.2.3.4",
        "1.2.3",
        "example.com",
        "1" * 46,
    ],
)
def test_anything_but_a_bare_address_is_refused(text: str) -> None:
    """Zone indices, prefixes, brackets, ports, spaces and junk are not addresses."""
    assert parse_ip(text) is None


def test_unmap_leaves_other_addresses_alone() -> None:
    """unmap changes only IPv4-mapped addresses."""
    v6 = ip("2001:db8::1")
    v4 = ip("192.0.2.1")
    assert unmap(v6) is v6
    assert unmap(v4) is v4
    assert unmap(ip("::ffff:192.0.2.1")) == v4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1/24", "10.0.0.0/24"),
        ("10.0.0.0/24", "10.0.0.0/24"),
        ("192.0.2.9", "192.0.2.9/32"),
        ("2001:db8::1/64", "2001:db8::/64"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:192.0.2.9", "192.0.2.9/32"),
    ],
)
def test_networks_parse_with_host_bits_cleared(text: str, expected: str) -> None:
    """A CIDR with host bits set becomes its network; mapped IPv6 becomes IPv4."""
    assert str(parse_network(text)) == expected


@pytest.mark.parametrize(
    "text", ["", "fe80::/64%eth0", "10.0.0.0/33", " 10.0.0.0/8", "10.0.0.0/8 ", "x" * 101]
)
def test_invalid_networks_are_refused(text: str) -> None:
    """Zone indices, impossible prefixes, surrounding spaces and over-long text are refused."""
    assert parse_network(text) is None


def test_require_mask_refuses_bare_addresses() -> None:
    """With require_mask, the text must carry an explicit /prefix."""
    assert parse_network("192.0.2.9", require_mask=True) is None
    assert str(parse_network("192.0.2.9/32", require_mask=True)) == "192.0.2.9/32"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.9", "192.0.2.9"),
        ("192.0.2.9/32", "192.0.2.9"),
        ("2001:db8::1/128", "2001:db8::1"),
        ("10.0.0.0/24", "10.0.0.0/24"),
        ("2001:db8::/64", "2001:db8::/64"),
    ],
)
def test_canonical_spells_single_addresses_without_prefix(text: str, expected: str) -> None:
    """Single addresses are written without a prefix length, networks with one."""
    network = parse_network(text)
    assert network is not None
    assert canonical(network) == expected
