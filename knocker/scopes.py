"""Pure: which keys' scoped grants a request's original host may use (docs/api.md#scoped-keys).

Owns the matching of a forwarded host against the keys' `hosts:` (exact names and
leading `*.` wildcards) as hash lookups: one for the name and one per dot in it, never a
pass over the keys or the grants. A key scoped to ports alone has no host scope: its
grants pass for every host, like an unscoped key's. No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable

from .config import ApiKey


class HostScopes:
    """Host name -> the names of the scoped keys whose grants may pass for it."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        exact: dict[str, list[str]] = {}
        below: dict[str, list[str]] = {}  # "example.com" for "*.example.com"
        # Port-only keys: their grants live with the scoped ones (never in whitelist.json)
        # but /verify lets them pass whatever the host.
        self._everywhere = tuple(
            dict.fromkeys(key.name for key in keys if key.ports and not key.hosts)
        )
        for key in keys:
            for host in key.hosts:
                if host.startswith("*."):
                    below.setdefault(host[2:], []).append(key.name)
                else:
                    exact.setdefault(host, []).append(key.name)
        self._exact = {host: tuple(dict.fromkeys(names)) for host, names in exact.items()}
        self._below = {host: tuple(dict.fromkeys(names)) for host, names in below.items()}
        self.active = bool(exact or below or self._everywhere)

    def keys_for(self, host: str | None) -> tuple[str, ...]:
        """Names of the keys scoped to `host` (a name as normalize_host gives it), and of
        the keys scoped to ports alone; without a host only the latter: a host-scoped
        grant needs one to pass."""
        if not host or not self.active:
            return self._everywhere
        found = self._everywhere + self._exact.get(host, ())
        dot = host.find(".")
        while dot >= 0:
            more = self._below.get(host[dot + 1 :])
            if more:
                found = found + tuple(name for name in more if name not in found)
            dot = host.find(".", dot + 1)
        return found
