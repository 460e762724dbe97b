"""firewalld's methods as Python calls, and the call sequences Knocker builds from them.

Owns: FirewalldClient (one method per D-Bus call, over any Connection: the bus or a fake
firewalld in unit tests) and the sequences over it: (re)applying a timed rule so no stale
timer removes it (trap 2), a grant that rolls back, waiting for RUNNING, creating or
updating the permanent zone, and checking the running zone. Time is an argument; the only
I/O is through the Connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jeepney import Message

from ..config import FirewalldConfig
from ..errors import FirewallError, FirewallUnavailable
from .bus import Connection
from .failures import DBUS_FAILURES, DBusError, is_unavailable
from .messages import (
    msg_add_rich_rule,
    msg_config_add_zone,
    msg_config_zone_by_name,
    msg_config_zone_names,
    msg_config_zone_settings,
    msg_config_zone_update,
    msg_get_active_zones,
    msg_get_property,
    msg_get_rich_rules,
    msg_name_has_owner,
    msg_query_rich_rule,
    msg_reload,
    msg_remove_rich_rule,
    msg_runtime_zone_settings,
)
from .rules import Variant, block_rules, same_setting, unwrap_variants, zone_changes, zone_settings

log = logging.getLogger("knocker.firewalld")

CALL_TIMEOUT = 5.0  # one ordinary D-Bus call
RELOAD_TIMEOUT = 60.0  # reload() rebuilds the whole ruleset: 0.1-0.4 s measured, more on big setups
RUNNING_TIMEOUT = 30.0  # firewalld owns its bus name before it has applied its rules
POLL_INTERVAL = 0.1


class FirewalldClient:
    """The firewalld methods Knocker uses, over any Connection (a fake one in unit tests)."""

    def __init__(self, conn: Connection, timeout: float = CALL_TIMEOUT) -> None:
        self.conn = conn
        self.timeout = timeout

    def _call(self, message: Message, timeout: float | None = None) -> tuple[Any, ...]:
        return self.conn.call(message, self.timeout if timeout is None else timeout)

    def has_owner(self) -> bool:
        return bool(self._call(msg_name_has_owner())[0])

    def property(self, name: str) -> Any:
        value = self._call(msg_get_property(name))[0]
        # a variant arrives as (signature, value)
        return value[1] if isinstance(value, tuple) and len(value) == 2 else value

    def state(self) -> str:
        return str(self.property("state"))

    def version(self) -> str:
        return str(self.property("version"))

    def reload(self) -> None:
        self._call(msg_reload(), RELOAD_TIMEOUT)

    def add_rich_rule(self, zone: str, rule: str, timeout: int) -> None:
        self._call(msg_add_rich_rule(zone, rule, timeout))

    def remove_rich_rule(self, zone: str, rule: str) -> None:
        self._call(msg_remove_rich_rule(zone, rule))

    def query_rich_rule(self, zone: str, rule: str) -> bool:
        return bool(self._call(msg_query_rich_rule(zone, rule))[0])

    def rich_rules(self, zone: str) -> list[str]:
        return list(self._call(msg_get_rich_rules(zone))[0])

    def active_zones(self) -> dict[str, dict[str, list[str]]]:
        return dict(self._call(msg_get_active_zones())[0])

    def runtime_zone_settings(self, zone: str) -> dict[str, Any]:
        return unwrap_variants(self._call(msg_runtime_zone_settings(zone))[0])

    def config_zone_names(self) -> list[str]:
        return list(self._call(msg_config_zone_names())[0])

    def config_zone_path(self, zone: str) -> str:
        # Trap 1: reload() renumbers these paths; look one up right before each use.
        return str(self._call(msg_config_zone_by_name(zone))[0])

    def config_add_zone(self, zone: str, settings: Mapping[str, Variant]) -> None:
        self._call(msg_config_add_zone(zone, settings))

    def config_zone_settings(self, zone: str) -> dict[str, Any]:
        return unwrap_variants(self._call(msg_config_zone_settings(self.config_zone_path(zone)))[0])

    def config_update_zone(self, zone: str, settings: Mapping[str, Variant]) -> None:
        self._call(msg_config_zone_update(self.config_zone_path(zone), settings))


def apply_timed(client: FirewalldClient, zone: str, rule: str, ttl: int) -> None:
    """(Re)apply one timed rule so that no stale firewalld timer can remove it early.

    Trap 2: reload() drops rules but keeps their timers, and a timer removes whatever
    equal rule is there when it fires. removeRichRule is what cancels a timer, but it
    answers NOT_ENABLED before cancelling when the rule is absent. So first make sure R is
    there without touching the timer table (timeout 0), then remove it (cancelling any
    timer stored under R), then add it with the new timeout."""
    try:
        client.add_rich_rule(zone, rule, 0)
    except DBusError as exc:
        if exc.code != "ALREADY_ENABLED":
            raise
    try:
        client.remove_rich_rule(zone, rule)
    except DBusError as exc:
        if exc.code != "NOT_ENABLED":
            raise
    client.add_rich_rule(zone, rule, ttl)


def remove_rule(client: FirewalldClient, zone: str, rule: str) -> None:
    try:
        client.remove_rich_rule(zone, rule)
    except DBusError as exc:
        if exc.code != "NOT_ENABLED":
            raise


def settle(client: FirewalldClient, zone: str, rule: str, remaining: int | None) -> None:
    """Put a rule back to what the whitelist says: its remaining time, or gone."""
    if remaining is not None and remaining >= 1:
        apply_timed(client, zone, rule, remaining)
    else:
        remove_rule(client, zone, rule)


class GrantFailed(Exception):
    """A grant failed; `unsettled` are rules it may have left behind (firewalld was gone
    or failed again while we rolled back), to be settled later."""

    def __init__(self, cause: BaseException, unsettled: list[str]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.unsettled = unsettled


def grant_all(
    client: FirewalldClient,
    zone: str,
    rules: list[str],
    ttl: int,
    previous: Callable[[str], int | None],
) -> None:
    """Apply every rule of one grant, or put the rules this call touched back to their
    previous state (`previous(rule)`: seconds left of an earlier grant of it, or None)
    and raise GrantFailed. When firewalld is unreachable no rollback is tried (each call
    would wait for a timeout); the rules are reported as unsettled instead."""
    touched: list[str] = []
    try:
        for rule in rules:
            touched.append(rule)  # before the calls: a half-done sequence may have added it
            apply_timed(client, zone, rule, ttl)
    except DBUS_FAILURES as failure:
        if is_unavailable(failure):
            raise GrantFailed(failure, touched) from failure
        unsettled = []
        for rule in touched:
            try:
                settle(client, zone, rule, previous(rule))
            except DBUS_FAILURES as exc:
                log.error("firewalld: could not roll back %s: %s", rule, exc)
                unsettled.append(rule)
        raise GrantFailed(failure, unsettled) from failure


def wait_running(
    client: FirewalldClient,
    timeout: float,
    monotonic: Callable[[], float],
    sleep: Callable[[float], None],
) -> str:
    """Wait until firewalld owns its name and its `state` property says RUNNING (it takes
    the name before its rules are in place). Returns the version."""
    deadline = monotonic() + timeout
    last = "firewalld is not on the bus"
    while True:
        try:
            if client.has_owner():
                state = client.state()
                if state == "RUNNING":
                    return client.version()
                if state == "FAILED":
                    raise FirewallError(
                        "firewalld is in state FAILED (its configuration did not load; "
                        "see firewalld's log)"
                    )
                last = f"firewalld state is {state}"
        except DBusError as exc:
            if not is_unavailable(exc):
                raise
            last = str(exc)
        if monotonic() >= deadline:
            raise FirewallUnavailable(f"firewalld not RUNNING after {timeout:.0f} s: {last}")
        sleep(POLL_INTERVAL)


def ensure_zone(client: FirewalldClient, config: FirewalldConfig, version: str) -> bool:
    """Create or update the permanent zone; True when the permanent config changed."""
    desired = zone_settings(config, version)
    zone = config.zone_name
    if zone not in client.config_zone_names():
        client.config_add_zone(zone, desired)
        log.info("firewalld: created permanent zone %s", zone)
        return True
    changes = zone_changes(client.config_zone_settings(zone), desired)
    if changes:
        client.config_update_zone(zone, changes)
        log.info("firewalld: updated permanent zone %s (%s)", zone, ", ".join(sorted(changes)))
        return True
    return False


def runtime_zone_problems(
    client: FirewalldClient, config: FirewalldConfig, version: str
) -> list[str]:
    """What differs between the running zone and the one Knocker wants (empty: in place)."""
    zone = config.zone_name
    active = client.active_zones()
    if zone not in active:
        return [f"zone {zone} is not active"]
    problems: list[str] = []
    desired = zone_settings(config, version)
    sources = list(active[zone].get("sources", []))
    if not same_setting("sources", sources, desired["sources"][1]):
        problems.append(f"zone {zone} has sources {sources}")
    for rule in block_rules(config):
        if not client.query_rich_rule(zone, rule):
            problems.append(f"missing rule {rule}")
    runtime_keys = [key for key in ("target", "ingress_priority") if key in desired]
    if runtime_keys:
        runtime = client.runtime_zone_settings(zone)
        for key in runtime_keys:
            if key in runtime and not same_setting(key, runtime[key], desired[key][1]):
                problems.append(f"zone {zone} has {key} {runtime[key]!r}")
    return problems


def missing_rules(client: FirewalldClient, zone: str, rules: Iterable[str]) -> list[str]:
    """The rules firewalld does not have. One getRichRules answers most of it; a rule not
    found by its text is confirmed with queryRichRule (trap 3: compare by meaning)."""
    present = set(client.rich_rules(zone))
    return [
        rule for rule in rules if rule not in present and not client.query_rich_rule(zone, rule)
    ]
