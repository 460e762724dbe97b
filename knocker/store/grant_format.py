"""Pure: who granted what, and the sidecar file that remembers it (whitelist.json.grants).

Owns the Grant value (one key's grant of one entry: expiry, when, how, scope), the line
format of the grants log and the folding of its lines into the live grants. No I/O, no
clock: callers read and write the bytes and pass `now`. The layout and why it is a
sidecar (an upstream reader never sees it, so a downgrade never widens a grant) are in
docs/whitelist.md#grants.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

# How a grant came to be: a key whitelisted its caller (knock), a key named an address
# (remote), or the entry was found on disk without a record of who granted it (restored:
# an upstream whitelist.json, or a record lost to a failed write).
HOWS = ("knock", "remote", "restored")

GrantId = tuple[str, str | None]  # (entry, granting key's name; None for restored)


@dataclass(frozen=True, slots=True)  # slots: 100,000 of them are held per worker
class Grant:
    entry: str  # canonical address or network
    key_name: str | None  # the granting key's name, never the key
    expires_at: int
    granted_at: int | None
    how: str  # one of HOWS
    # Made with a host-scoped key: kept only here, never in whitelist.json (an upstream
    # reader would take it for an unscoped grant), and passes /verify only for the
    # key's hosts.
    scoped: bool = False
    # Made with a port-scoped key (then also `scoped`): the monitored ports it opens,
    # spelled "22/tcp"; empty = every monitored port.
    ports: tuple[str, ...] = ()

    @property
    def ident(self) -> GrantId:
        return (self.entry, self.key_name)

    def as_json(self, now: float) -> dict[str, object]:
        """The grant as GET /grants and DELETE answers show it (docs/api.md#grants)."""
        return {
            "entry": self.entry,
            "key_name": self.key_name,
            "expires_at": self.expires_at,
            "expires_in_seconds": max(0, int(self.expires_at - now)),
            "granted_at": self.granted_at,
            "how": self.how,
        }


def port_target(entry: str, port: object) -> str:
    """A firewall target naming one port of an entry: "192.0.2.1 22/tcp" (a bare entry
    is every monitored port; docs/firewalld.md#port-scoped-keys)."""
    return f"{entry} {port}"


# One entry's firewall plan: "" (every monitored port) or port ("22/tcp") -> expiry.
Plan = dict[str, int]


def firewall_plan(
    unscoped: int | None, grants: Iterable[Grant], ports: Iterable[str], now: float
) -> Plan:
    """What the firewall should hold for one entry: every monitored port until its
    longest grant without a port scope (the whitelist's expiry, host-scoped grants);
    when a port-scoped grant runs longer, each monitored port on its own, so that the
    longer time reaches only that grant's ports. Empty: close everything."""
    live = [g for g in grants if g.scoped and g.expires_at > now]
    whole = max([unscoped or 0] + [g.expires_at for g in live if not g.ports])
    longer: Plan = {}
    for grant in live:
        if grant.ports and grant.expires_at > whole:
            for port in grant.ports:
                longer[port] = max(longer.get(port, 0), grant.expires_at)
    if not longer:
        return {"": whole} if whole > now else {}
    plan = dict.fromkeys(ports, whole) if whole > now else {}
    plan.update(longer)
    return plan


def grant_line(grant: Grant) -> bytes:
    """One record: a key's grant of an entry until expires_at (replaces its earlier one)."""
    record: dict[str, object] = {
        "op": "grant",
        "entry": grant.entry,
        "key": grant.key_name,
        "expires_at": grant.expires_at,
        "granted_at": grant.granted_at,
        "how": grant.how,
    }
    if grant.ports:
        # Not a boolean: a reader from before port scopes drops the record rather than
        # take it for a host-scoped grant of every port (never widen).
        record["scoped"] = {"ports": list(grant.ports)}
    elif grant.scoped:
        record["scoped"] = True
    return _line(record)


def revoke_line(entry: str, key_name: str | None) -> bytes:
    """One record: the grants of `entry` end, those of `key_name` only, or all (None)."""
    return _line({"op": "revoke", "entry": entry, "key": key_name})


def _line(record: dict[str, object]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n"


GrantIndex = dict[str, dict[str | None, Grant]]  # entry -> granting key's name -> grant


def apply_lines(index: GrantIndex, data: bytes) -> list[GrantId]:
    """Fold log lines into `index`, in order: a grant replaces that key's earlier one of
    the entry, a revoke drops the key's (or every, key None) grant of it. Returns what
    the lines touched. A damaged or torn line (a crash mid-append) costs that record
    only."""
    touched: list[GrantId] = []
    for line in data.split(b"\n"):
        record = _parse(line)
        if record is None:
            continue
        if isinstance(record, Grant):
            index.setdefault(record.entry, {})[record.key_name] = record
            touched.append(record.ident)
            continue
        entry, key_name = record
        touched.append(record)
        if key_name is None:
            index.pop(entry, None)
        else:
            grants = index.get(entry)
            if grants is not None:
                grants.pop(key_name, None)
                if not grants:
                    del index[entry]
    return touched


def fold_grants(data: bytes, now: float) -> dict[GrantId, Grant]:
    """The grants a whole log holds that are live at `now`."""
    index: GrantIndex = {}
    apply_lines(index, data)
    return {
        grant.ident: grant
        for grants in index.values()
        for grant in grants.values()
        if grant.expires_at > now
    }


def _parse(line: bytes) -> Grant | tuple[str, str | None] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    entry, key_name = record.get("entry"), record.get("key")
    if not isinstance(entry, str) or not (key_name is None or isinstance(key_name, str)):
        return None
    if record.get("op") == "revoke":
        return entry, key_name
    expires_at, granted_at, how = (
        record.get("expires_at"),
        record.get("granted_at"),
        record.get("how"),
    )
    scoped, ports = record.get("scoped", False), ()
    if isinstance(scoped, dict):
        listed = scoped.get("ports")
        if not (
            isinstance(listed, list) and listed and all(isinstance(port, str) for port in listed)
        ):
            return None
        scoped, ports = True, tuple(listed)
    if (
        record.get("op") != "grant"
        or type(expires_at) is not int
        or how not in HOWS
        or not (granted_at is None or type(granted_at) is int)
        or type(scoped) is not bool
    ):
        return None
    return Grant(entry, key_name, expires_at, granted_at, how, scoped, ports)


def encode_grants(grants: Iterable[Grant]) -> bytes:
    """A compacted log: one grant line per live grant."""
    return b"".join(grant_line(grant) for grant in grants)
