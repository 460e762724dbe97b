"""Pure: the text Knocker sends firewalld, in firewalld's own spelling.

Owns: rich-rule strings (one canonical string per grant and port, in firewalld's word
order), the zone's permanent settings as a{sv} variants and how to compare them with what
firewalld reports, firewalld version numbers, and recognising Knocker's own leftover
grants. No bus, no clock: unit-tested on values alone. Trap numbers as in
docs/firewalld.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..addresses import IPNetwork, canonical, parse_network
from ..config import FirewalldConfig, MonitoredPort
from ..errors import FirewallError
from ..store.grant_format import port_target

# Rich-rule priorities: lower runs first, so a grant (1000) beats the block rule (9999).
ACCEPT_PRIORITY = 1000
BLOCK_PRIORITY = 9999

# a{sv} values in jeepney are (signature, value) pairs.
Variant = tuple[str, Any]


def parse_version(text: str) -> tuple[int, ...]:
    """'2.3.1' -> (2, 3, 1); a non-numeric tail ('1.3.3a') stops the parse."""
    parts: list[int] = []
    for piece in text.strip().split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


def supports_zone_priority(version: tuple[int, ...]) -> bool:
    """ingress_priority/egress_priority came with firewalld 2.0 (1.3.x: INVALID_OPTION)."""
    return version >= (2,)


def family_of(network: IPNetwork) -> str:
    return "ipv4" if network.version == 4 else "ipv6"


def accept_rule(entry: IPNetwork, port: MonitoredPort) -> str:
    """The one canonical string per grant and port (trap 2: the timer table is keyed by the
    string as sent, so we never send another spelling) in firewalld's own order (trap 3)."""
    return (
        f'rule priority="{ACCEPT_PRIORITY}" family="{family_of(entry)}" '
        f'source address="{canonical(entry)}" '
        f'port port="{port.port}" protocol="{port.protocol}" accept'
    )


def block_rule(family: str, port: MonitoredPort, action: str) -> str:
    return (
        f'rule priority="{BLOCK_PRIORITY}" family="{family}" '
        f'port port="{port.port}" protocol="{port.protocol}" {action}'
    )


def block_rules(config: FirewalldConfig) -> list[str]:
    """One blocking rule per monitored port and IP family. Both families always: a rule
    for a family the zone has no source of never matches, and it keeps the port closed if
    someone later adds such a source to the zone by hand."""
    return [
        block_rule(family, port, config.default_action)
        for port in config.monitored_ports
        for family in ("ipv4", "ipv6")
    ]


def grant_rules(entry: IPNetwork, config: FirewalldConfig) -> list[str]:
    return [accept_rule(entry, port) for port in config.monitored_ports]


# A firewall target is what the store asks to open or close: an entry ("192.0.2.1", every
# monitored port) or one port of it ("192.0.2.1 22/tcp", a port-scoped grant). The store
# never names both kinds for one entry at once (docs/firewalld.md#port-scoped-keys).


def target_rules(target: str, config: FirewalldConfig) -> dict[str, str]:
    """The accept rules of a target, each with its one-port target. A port the config no
    longer monitors opens nothing: a grant never reaches a port Knocker does not manage."""
    entry, _, port = target.partition(" ")
    network = entry_network(entry)
    ports = [p for p in config.monitored_ports if not port or str(p) == port]
    return {accept_rule(network, p): port_target(canonical(network), p) for p in ports}


def target_expiry(targets: Mapping[str, int], one_port: str) -> int | None:
    """The expiry `targets` give one port of an entry: its own target's or the entry's."""
    entry = one_port.partition(" ")[0]
    found = [x for x in (targets.get(one_port), targets.get(entry)) if x is not None]
    return max(found, default=None)


def seconds_left(expiry: float, now: float) -> int:
    """Whole seconds a grant still has, rounded up: a grant is never cut short."""
    return math.ceil(expiry - now)


def entry_network(entry: str) -> IPNetwork:
    network = parse_network(entry)
    if network is None:
        raise FirewallError(f"not an IP address or network: {entry!r}")
    return network


def zone_target(value: str) -> str:
    """knocker.yaml spells the reject target REJECT; firewalld's zone API says %%REJECT%%."""
    return "%%REJECT%%" if value == "REJECT" else value


def refuse_zone_priority_message(version: str, priority: int) -> str:
    return (
        f"firewalld {version} cannot set a zone priority (firewalld.zone_priority: {priority}); "
        "zone priorities came with firewalld 2.0. Set `zone_priority: null` in the firewalld "
        "section of knocker.yaml to run without one, or upgrade firewalld."
    )


def zone_settings(config: FirewalldConfig, version: str) -> dict[str, Variant]:
    """The permanent settings Knocker owns: sources, blocking rules, and target/priority
    when the config sets them. Refuses a priority on firewalld < 2.0."""
    settings: dict[str, Variant] = {
        "short": ("s", "Knocker"),
        "description": (
            "s",
            "Managed by Knocker: knocked clients get timed accept rules on monitored ports.",
        ),
        "sources": ("as", [str(network) for network in config.monitored_ips]),
        "rules_str": ("as", block_rules(config)),
    }
    if config.zone_target is not None:
        settings["target"] = ("s", zone_target(config.zone_target))
    if config.zone_priority is not None:
        if not supports_zone_priority(parse_version(version)):
            raise FirewallError(refuse_zone_priority_message(version, config.zone_priority))
        settings["ingress_priority"] = ("i", config.zone_priority)
        settings["egress_priority"] = ("i", config.zone_priority)
    return settings


def _networks(items: Iterable[Any]) -> set[str]:
    # firewalld keeps a source the way it was written; compare by meaning.
    return {canonical(net) if (net := parse_network(str(item))) else str(item) for item in items}


def same_setting(key: str, current: Any, desired: Any) -> bool:
    """Does firewalld's value for `key` mean what Knocker wants?"""
    if isinstance(desired, list):
        if not isinstance(current, list):
            return False
        if key == "sources":
            return _networks(current) == _networks(desired)
        return set(current) == set(desired)
    if key == "target" and current in ("default", "{chain}_{zone}", ""):
        # firewalld reports its default target in several spellings
        return bool(desired == "default")
    return bool(current == desired)


def zone_changes(current: Mapping[str, Any], desired: Mapping[str, Variant]) -> dict[str, Variant]:
    """The desired settings (a{sv}) that differ from `current` (getSettings2, unwrapped).
    The description fields are only written when a zone is created."""
    return {
        key: variant
        for key, variant in desired.items()
        if key not in ("short", "description")
        and not same_setting(key, current.get(key), variant[1])
    }


def unwrap_variants(settings: Mapping[str, Variant]) -> dict[str, Any]:
    return {key: value[1] for key, value in settings.items()}


_ACCEPT_RULE = re.compile(
    rf'^rule priority="{ACCEPT_PRIORITY}" family="ipv[46]" source address="([^"]+)" '
    r'port port="(\d+)" protocol="([a-z]+)" accept$'
)


def stray_grants(rules: Iterable[str], wanted: set[str]) -> list[str]:
    """Knocker-shaped accept rules of the zone that open no wanted one-port target
    ("192.0.2.1 22/tcp", canonical address): per port, so a port-scoped grant never
    keeps another port's leftover rule."""
    stray = []
    for rule in rules:
        match = _ACCEPT_RULE.match(rule)
        if match is None:
            continue
        network = parse_network(match.group(1))
        if (
            network is None
            or port_target(canonical(network), f"{match.group(2)}/{match.group(3)}") not in wanted
        ):
            stray.append(rule)
    return stray
