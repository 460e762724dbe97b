"""Addresses, networks and whitelist keys from text, and free loopback ports."""

from __future__ import annotations

import ipaddress
import socket

from knocker.addresses import IPAddress, IPNetwork
from knocker.whitelist import Key, key_of


def ip(text: str) -> IPAddress:
    """An address object (no unmapping: tests spell what they mean)."""
    return ipaddress.ip_address(text)


def net(text: str) -> IPNetwork:
    """A network object; host bits must be clear, as in a test's expectations."""
    return ipaddress.ip_network(text)


def nets(*texts: str) -> tuple[IPNetwork, ...]:
    """Networks as the config holds them (e.g. server.trusted_proxies)."""
    return tuple(net(text) for text in texts)


def key(text: str) -> Key:
    """The whitelist key of an address or network written as text."""
    return key_of(ipaddress.ip_network(text))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now on `host` (loopback by default)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
