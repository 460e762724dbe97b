"""Knocker: a knock-knock gateway that whitelists client addresses for reverse proxies
and firewalld."""

__version__ = "1.0.0"
