"""firewalld over D-Bus with jeepney: Knocker's zone, timed accept rules, staying correct.

Owns: everything Knocker says to firewalld. The first half is pure (rule strings in
firewalld's canonical order, zone settings, jeepney messages, error classification) and is
unit-tested without a bus. BusConnection is the only code that talks to the bus.
FirewalldFirewall ties both to the Firewall protocol of knocker/firewall.py, plus the lock
and status files in the state directory that make several worker processes act as one.
The measured traps this code works around are numbered as in docs/firewalld.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from jeepney import DBusAddress, HeaderFields, MatchRule, Message, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

from .addresses import IPNetwork, canonical, parse_network
from .config import FirewalldConfig, MonitoredPort
from .errors import FirewallError, FirewallUnavailable

log = logging.getLogger("knocker.firewalld")

BUS_NAME = "org.fedoraproject.FirewallD1"
PATH = "/org/fedoraproject/FirewallD1"
CONFIG_PATH = PATH + "/config"
IF_MAIN = "org.fedoraproject.FirewallD1"
IF_ZONE = "org.fedoraproject.FirewallD1.zone"
IF_CONFIG = "org.fedoraproject.FirewallD1.config"
IF_CONFIG_ZONE = "org.fedoraproject.FirewallD1.config.zone"
IF_PROPERTIES = "org.freedesktop.DBus.Properties"

# Rich-rule priorities: lower runs first, so a grant (1000) beats the block rule (9999).
ACCEPT_PRIORITY = 1000
BLOCK_PRIORITY = 9999

CALL_TIMEOUT = 5.0  # one ordinary D-Bus call
RELOAD_TIMEOUT = 60.0  # reload() rebuilds the whole ruleset: 0.1-0.4 s measured, more on big setups
RUNNING_TIMEOUT = 30.0  # firewalld owns its bus name before it has applied its rules
POLL_INTERVAL = 0.1
LOCK_WAIT = 5.0  # a grant waits at most this long for another mutation to finish
QUEUE_LIMIT = 16  # grants/revocations waiting in one process before we answer 503
QUEUE_WAIT = 0.2
STATUS_CACHE = 1.0  # problem() reads the status file at most this often per process
HEARTBEAT = 2.0  # the watcher touches the status file this often
STATUS_STALE = 15.0  # a status older than this means nobody is watching firewalld
ELECTION_RETRY = 0.5
RECHECK_DELAY = 2.0  # second look after a reload, for grants whose whitelist write was in flight
PERIODIC_CHECK = 30.0  # the watcher also looks for missing rules this often (a lost signal)
REPAIR_RELOAD_INTERVAL = 60.0  # at most one reload per minute to repair a runtime-only change
PREPARE_LOCK_WAIT = 300.0

# Errors that mean "firewalld is not there right now" (503), not "firewalld said no" (500).
UNAVAILABLE_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Timeout",
        "org.freedesktop.DBus.Error.TimedOut",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.NoServer",
        "org.freedesktop.DBus.Error.LimitsExceeded",
    }
)
UNAVAILABLE_CODES = frozenset({"NOT_RUNNING", "RUNNING_BUT_FAILED"})
NOT_AUTHORIZED_ERRORS = frozenset(
    {
        "org.fedoraproject.FirewallD1.NotAuthorizedException",
        "org.freedesktop.DBus.Error.AccessDenied",
    }
)
FIREWALLD_EXCEPTION = "org.fedoraproject.FirewallD1.Exception"

# Knocker's names inside the state directory (next to whitelist.json).
PREPARE_LOCK = ".knocker-firewalld-prepare.lock"
PREPARED_MARKER = ".knocker-firewalld-prepared"
MUTATION_LOCK = ".knocker-firewalld-mutation.lock"
WATCHER_LOCK = ".knocker-firewalld-watcher.lock"
STATUS_FILE = ".knocker-firewalld-status.json"


# ---------------------------------------------------------------------------------------
# Pure: versions, rule strings, zone settings.


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


# a{sv} values in jeepney are (signature, value) pairs.
Variant = tuple[str, Any]


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


def _same(key: str, current: Any, desired: Any) -> bool:
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
        if key not in ("short", "description") and not _same(key, current.get(key), variant[1])
    }


def unwrap_variants(settings: Mapping[str, Variant]) -> dict[str, Any]:
    return {key: value[1] for key, value in settings.items()}


# ---------------------------------------------------------------------------------------
# Pure: D-Bus messages (what jeepney sends; BusConnection does the sending).


def _address(path: str, interface: str, bus_name: str = BUS_NAME) -> DBusAddress:
    return DBusAddress(path, bus_name=bus_name, interface=interface)


def msg_get_property(name: str) -> Message:
    return new_method_call(_address(PATH, IF_PROPERTIES), "Get", "ss", (IF_MAIN, name))


def msg_reload() -> Message:
    return new_method_call(_address(PATH, IF_MAIN), "reload")


def msg_add_rich_rule(zone: str, rule: str, timeout: int) -> Message:
    return new_method_call(_address(PATH, IF_ZONE), "addRichRule", "ssi", (zone, rule, timeout))


def msg_remove_rich_rule(zone: str, rule: str) -> Message:
    return new_method_call(_address(PATH, IF_ZONE), "removeRichRule", "ss", (zone, rule))


def msg_query_rich_rule(zone: str, rule: str) -> Message:
    return new_method_call(_address(PATH, IF_ZONE), "queryRichRule", "ss", (zone, rule))


def msg_get_rich_rules(zone: str) -> Message:
    return new_method_call(_address(PATH, IF_ZONE), "getRichRules", "s", (zone,))


def msg_get_active_zones() -> Message:
    return new_method_call(_address(PATH, IF_ZONE), "getActiveZones")


def msg_runtime_zone_settings(zone: str) -> Message:
    return new_method_call(_address(PATH, IF_ZONE), "getZoneSettings2", "s", (zone,))


def msg_config_zone_names() -> Message:
    return new_method_call(_address(CONFIG_PATH, IF_CONFIG), "getZoneNames")


def msg_config_zone_by_name(zone: str) -> Message:
    return new_method_call(_address(CONFIG_PATH, IF_CONFIG), "getZoneByName", "s", (zone,))


def msg_config_add_zone(zone: str, settings: Mapping[str, Variant]) -> Message:
    return new_method_call(
        _address(CONFIG_PATH, IF_CONFIG), "addZone2", "sa{sv}", (zone, dict(settings))
    )


def msg_config_zone_settings(zone_path: str) -> Message:
    return new_method_call(_address(zone_path, IF_CONFIG_ZONE), "getSettings2")


def msg_config_zone_update(zone_path: str, settings: Mapping[str, Variant]) -> Message:
    return new_method_call(
        _address(zone_path, IF_CONFIG_ZONE), "update2", "a{sv}", (dict(settings),)
    )


def msg_name_has_owner() -> Message:
    return message_bus.NameHasOwner(BUS_NAME)


def signal_rules() -> list[MatchRule]:
    """Reloaded, and NameOwnerChanged for firewalld's name (a restart: lost, then owned)."""
    reloaded = MatchRule(type="signal", interface=IF_MAIN, member="Reloaded", path=PATH)
    owner = MatchRule(
        type="signal",
        sender="org.freedesktop.DBus",
        interface="org.freedesktop.DBus",
        member="NameOwnerChanged",
        path="/org/freedesktop/DBus",
    )
    owner.add_arg_condition(0, BUS_NAME)
    return [reloaded, owner]


# ---------------------------------------------------------------------------------------
# Pure: errors.


class DBusError(Exception):
    """An error reply. `name` is the D-Bus error name; firewalld's own errors
    (org.fedoraproject.FirewallD1.Exception) carry a text starting with a code."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}" if text else name)
        self.name = name
        self.text = text

    @property
    def code(self) -> str:
        if self.name != FIREWALLD_EXCEPTION:
            return ""
        return self.text.split(":", 1)[0].strip()


def is_unavailable(exc: BaseException) -> bool:
    """True when the failure means firewalld or the bus is not reachable right now."""
    if isinstance(exc, DBusError):
        return exc.name in UNAVAILABLE_ERRORS or exc.code in UNAVAILABLE_CODES
    return isinstance(exc, (OSError, TimeoutError, EOFError))


def classify(exc: BaseException, doing: str) -> FirewallError:
    """The KnockerError a failed D-Bus exchange becomes: 503 when firewalld or the bus is
    unreachable (try again later), 500 when firewalld answered no."""
    if is_unavailable(exc):
        if isinstance(exc, DBusError):
            reason = exc.name.rsplit(".", 1)[-1] if exc.name in UNAVAILABLE_ERRORS else exc.text
        else:
            reason = str(exc) or type(exc).__name__
        return FirewallUnavailable(f"firewalld unavailable while {doing}: {reason}")
    if isinstance(exc, DBusError) and exc.name in NOT_AUTHORIZED_ERRORS:
        return FirewallError(
            f"firewalld refused {doing}: not authorized (run Knocker as root, or install "
            "deploy/polkit/50-knocker-firewalld.rules for its user; see docs/firewalld.md)"
        )
    return FirewallError(f"firewalld failed {doing}: {exc}")


# ---------------------------------------------------------------------------------------
# Pure: Docker's published ports (their NAT bypasses firewalld zones, trap 9).


def docker_ports_from_api(body: bytes) -> set[tuple[int, str]]:
    """(host port, protocol) of every port published by a running container, from
    Docker's GET /containers/json answer."""
    containers = json.loads(body)
    found: set[tuple[int, str]] = set()
    if not isinstance(containers, list):
        return found
    for container in containers:
        ports = container.get("Ports") if isinstance(container, dict) else None
        for item in ports if isinstance(ports, list) else ():
            if isinstance(item, dict) and isinstance(item.get("PublicPort"), int):
                found.add((item["PublicPort"], str(item.get("Type", "tcp"))))
    return found


def docker_port_from_proxy(argv: list[str]) -> tuple[int, str] | None:
    """(host port, protocol) from a docker-proxy command line, else None."""
    if not argv or not argv[0].endswith("docker-proxy"):
        return None
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    try:
        port = int(options.get("-host-port", ""))
    except ValueError:
        return None
    return port, options.get("-proto", "tcp")


def docker_warnings(published: set[tuple[int, str]], ports: Iterable[MonitoredPort]) -> list[str]:
    return [
        f"monitored port {port.port}/{port.protocol} is published by Docker: Docker's NAT "
        "rules bypass firewalld zones, so it stays reachable without a knock. Publish it on "
        "127.0.0.1 only, or run that container with host networking (network_mode: host) "
        "so firewalld sees its traffic; see docs/firewalld.md"
        for port in ports
        if (port.port, port.protocol) in published
    ]


# ---------------------------------------------------------------------------------------
# I/O: the bus.


class Connection(Protocol):
    """What the firewalld client needs from a bus: one call at a time, reply body back."""

    def call(self, message: Message, timeout: float) -> tuple[Any, ...]: ...

    def close(self) -> None: ...


def bus_address() -> str:
    """jeepney's 'SYSTEM' is $DBUS_SYSTEM_BUS_ADDRESS, else /var/run/dbus/system_bus_socket."""
    return "SYSTEM"


class BusConnection:
    """A blocking jeepney connection opened on first use and dropped after any transport
    failure, so the next call reconnects (the bus daemon may restart too). Not
    thread-safe: FirewalldFirewall serialises its use. Never shared across fork()."""

    def __init__(self, address: str | None = None) -> None:
        self._address = address or bus_address()
        self._conn: DBusConnection | None = None
        self._pid = 0

    def raw(self) -> DBusConnection:
        if self._conn is None or self._pid != os.getpid():
            self._conn = None  # a socket inherited across fork belongs to the parent
            self._conn = open_dbus_connection(bus=self._address, auth_timeout=2.0)
            self._pid = os.getpid()
        return self._conn

    def call(self, message: Message, timeout: float) -> tuple[Any, ...]:
        try:
            reply = self.raw().send_and_get_reply(message, timeout=timeout)
        except (OSError, TimeoutError, EOFError, ValueError):
            # A late reply would confuse the next call: start afresh.
            self.close()
            raise
        if reply.header.message_type is MessageType.error:
            name = str(reply.header.fields.get(HeaderFields.error_name, "unknown error"))
            body = reply.body
            text = str(body[0]) if body and isinstance(body[0], str) else ""
            raise DBusError(name, text)
        return tuple(reply.body)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                conn.close()


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


# ---------------------------------------------------------------------------------------
# Logic over a client (unit-tested with a fake connection).

DBUS_FAILURES = (DBusError, OSError, TimeoutError, EOFError)


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
    previous: Callable[[], int | None],
) -> None:
    """Apply every rule of one grant, or put the rules this call touched back to their
    previous state (`previous()`: seconds left of an earlier grant of the entry, or None)
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
        remaining = previous()
        for rule in touched:
            try:
                settle(client, zone, rule, remaining)
            except DBUS_FAILURES as exc:
                log.error("firewalld: could not roll back %s: %s", rule, exc)
                unsettled.append(rule)
        raise GrantFailed(failure, unsettled) from failure


def wait_running(client: FirewalldClient, timeout: float, sleep: Callable[[float], None]) -> str:
    """Wait until firewalld owns its name and its `state` property says RUNNING (it takes
    the name before its rules are in place). Returns the version."""
    deadline = time.monotonic() + timeout
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
        if time.monotonic() >= deadline:
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
    if not _same("sources", sources, desired["sources"][1]):
        problems.append(f"zone {zone} has sources {sources}")
    for rule in block_rules(config):
        if not client.query_rich_rule(zone, rule):
            problems.append(f"missing rule {rule}")
    runtime_keys = [key for key in ("target", "ingress_priority") if key in desired]
    if runtime_keys:
        runtime = client.runtime_zone_settings(zone)
        for key in runtime_keys:
            if key in runtime and not _same(key, runtime[key], desired[key][1]):
                problems.append(f"zone {zone} has {key} {runtime[key]!r}")
    return problems


def missing_rules(client: FirewalldClient, zone: str, rules: Iterable[str]) -> list[str]:
    """The rules firewalld does not have. One getRichRules answers most of it; a rule not
    found by its text is confirmed with queryRichRule (trap 3: compare by meaning)."""
    present = set(client.rich_rules(zone))
    return [
        rule for rule in rules if rule not in present and not client.query_rich_rule(zone, rule)
    ]


_ACCEPT_RULE = re.compile(
    rf'^rule priority="{ACCEPT_PRIORITY}" family="ipv[46]" source address="([^"]+)" '
    r'port port="\d+" protocol="[a-z]+" accept$'
)


def stray_grants(rules: Iterable[str], wanted: set[str]) -> list[str]:
    """Knocker-shaped accept rules of the zone whose source is not a wanted entry."""
    stray = []
    for rule in rules:
        match = _ACCEPT_RULE.match(rule)
        if match is None:
            continue
        network = parse_network(match.group(1))
        if network is None or canonical(network) not in wanted:
            stray.append(rule)
    return stray


# ---------------------------------------------------------------------------------------
# Coordination between processes: lock files and the shared status.


class LockTimeout(Exception):
    pass


class FileLock:
    """flock(2) on a file in the state directory. flock belongs to the open file, so each
    process opens its own (after fork); threads of one process must take turns by other
    means (FirewalldFirewall's thread lock)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._pid = 0

    def _file(self) -> int:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._file(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{os.path.basename(self.path)} held for {timeout:.0f} s")
            time.sleep(0.005)

    def release(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Closing the file also releases the lock."""
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1


def write_status(path: str, ok: bool, reason: str) -> None:
    """Atomically replace the shared status (no fsync: the watcher rebuilds it anyway)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"ok": ok, "reason": reason, "pid": os.getpid()}, handle)
    os.replace(tmp, path)


def read_status(path: str, now: float, stale_after: float = STATUS_STALE) -> str | None:
    """None when the shared status says firewalld is in place and is fresh, else why not."""
    try:
        age = now - os.stat(path).st_mtime
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return "firewalld integration has not been set up"
    except (OSError, ValueError) as exc:
        return f"firewalld status unreadable: {exc}"
    if not isinstance(data, dict):
        return "firewalld status unreadable"
    if not data.get("ok"):
        return str(data.get("reason") or "firewalld is not in place")
    if age > stale_after:
        return f"no Knocker process is watching firewalld (status {age:.0f} s old)"
    return None


def _process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            # starttime is field 22; fields after the ")" that ends the name start at 3
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def service_id() -> str:
    """Which service start this process belongs to: its gunicorn master. `knocker serve`
    prepares in the master itself; under a plain `gunicorn knocker.app:create_app()` the
    workers prepare, and they are forks of the master with its very command line."""
    pid, parent = os.getpid(), os.getppid()
    master = parent if parent > 1 and _cmdline(pid) == _cmdline(parent) else pid
    return f"{master}:{_process_start(master)}"


# ---------------------------------------------------------------------------------------
# Docker detection (I/O), never fatal.


def docker_published_ports(
    socket_path: str = "/var/run/docker.sock", proc: str = "/proc"
) -> set[tuple[int, str]]:
    found: set[tuple[int, str]] = set()
    if os.path.exists(socket_path):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(socket_path)
                sock.sendall(b"GET /containers/json HTTP/1.0\r\nHost: docker\r\n\r\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                    if sum(map(len, chunks)) > 16 << 20:
                        break
            head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
            if head.split(b" ", 2)[1:2] == [b"200"]:
                found |= docker_ports_from_api(body)
        except (OSError, ValueError, IndexError) as exc:
            log.debug("firewalld: Docker API not readable: %s", exc)
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as handle:
                argv = [arg.decode(errors="replace") for arg in handle.read().split(b"\0") if arg]
        except OSError:
            continue
        port = docker_port_from_proxy(argv)
        if port is not None:
            found.add(port)
    return found


def warn_about_docker(config: FirewalldConfig) -> None:
    try:
        published = docker_published_ports()
    except Exception as exc:  # noqa: BLE001 - a warning must never stop the service
        log.debug("firewalld: Docker check failed: %s", exc)
        return
    for warning in docker_warnings(published, config.monitored_ports):
        log.warning("firewalld: %s", warning)


# ---------------------------------------------------------------------------------------
# The backend.


Entries = Mapping[str, int]


class FirewalldFirewall:
    """The Firewall protocol over firewalld (design: docs/firewalld.md).

    Locking: one thread of a process talks over its connection at a time (_thread_lock);
    a rule sequence additionally holds the machine-wide mutation flock, so a watcher's
    re-apply and a worker's grant of the same rule never interleave their calls."""

    def __init__(
        self,
        config: FirewalldConfig,
        state_dir: str,
        connect: Callable[[], Connection] = BusConnection,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self._connect = connect
        self._clock = clock
        self._conn: Connection | None = None
        self._conn_pid = 0
        self._slots = threading.BoundedSemaphore(QUEUE_LIMIT)
        self._thread_lock = threading.Lock()
        self._mutation = FileLock(os.path.join(state_dir, MUTATION_LOCK))
        self._status_path = os.path.join(state_dir, STATUS_FILE)
        self._current: Callable[[], Entries] | None = None
        self._unsettled: dict[str, str] = {}  # rule -> entry, left by failed grants
        self._watcher: _Watcher | None = None
        self._problem_cache: tuple[float, str | None] = (-1e9, None)
        self._repair_reload_at = -1e9

    # -- helpers

    def _client(self) -> FirewalldClient:
        if self._conn is None or self._conn_pid != os.getpid():
            self._conn = self._connect()  # never the parent's socket after fork()
            self._conn_pid = os.getpid()
        return FirewalldClient(self._conn)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._conn_pid == os.getpid():
            conn.close()

    @contextlib.contextmanager
    def _mutating(self, doing: str) -> Iterator[FirewalldClient]:
        """Admission (a bounded queue: 503 when full), this process's turn, then the
        machine-wide turn; unreachable-firewalld failures drop the connection."""
        if not self._slots.acquire(timeout=QUEUE_WAIT):
            raise FirewallUnavailable(f"firewalld mutation queue is full while {doing}")
        try:
            if not self._thread_lock.acquire(timeout=LOCK_WAIT):
                raise FirewallUnavailable(f"firewalld is busy while {doing}")
            try:
                try:
                    self._mutation.acquire(LOCK_WAIT)
                except LockTimeout as exc:
                    raise FirewallUnavailable(f"firewalld is busy while {doing}") from exc
                except OSError as exc:  # the state directory is not ours to write
                    raise FirewallError(f"firewalld lock file unusable: {exc}") from exc
                try:
                    client = self._client()
                    try:
                        yield client
                    except DBUS_FAILURES as exc:
                        if is_unavailable(exc):
                            self._drop_connection()
                        raise
                finally:
                    self._mutation.release()
            finally:
                self._thread_lock.release()
        finally:
            self._slots.release()

    def _remaining(self, entry: str) -> int | None:
        if self._current is None:
            return None
        expiry = self._current().get(entry)
        return None if expiry is None else seconds_left(expiry, self._clock())

    def _settle_unsettled(self, client: FirewalldClient) -> None:
        """Rules a failed grant may have left (e.g. firewalld vanished mid-sequence): put
        them back to what the whitelist says before doing anything else."""
        for rule, entry in list(self._unsettled.items()):
            try:
                settle(client, self.config.zone_name, rule, self._remaining(entry))
            except DBusError as exc:
                if is_unavailable(exc):
                    raise
                log.error("firewalld: giving up on leftover rule %s: %s", rule, exc)
            self._unsettled.pop(rule, None)

    def set_status(self, ok: bool, reason: str) -> None:
        try:
            write_status(self._status_path, ok, reason)
        except OSError as exc:
            log.error("firewalld: cannot write %s: %s", self._status_path, exc)
        self._problem_cache = (-1e9, None)

    def touch_status(self) -> None:
        """The watcher's heartbeat: a fresh mtime says someone is still watching."""
        with contextlib.suppress(OSError):
            os.utime(self._status_path)

    # -- Firewall protocol

    def prepare(self, entries: Entries, now: float) -> None:
        lock = FileLock(os.path.join(self.state_dir, PREPARE_LOCK))
        marker = os.path.join(self.state_dir, PREPARED_MARKER)
        me = service_id()
        try:
            lock.acquire(PREPARE_LOCK_WAIT)
            with contextlib.suppress(OSError), open(marker, encoding="utf-8") as handle:
                if handle.read().strip() == me:
                    log.info("firewalld: already set up by another process of this service")
                    return
            self._prepare(entries, now)
            with open(marker, "w", encoding="utf-8") as handle:
                handle.write(me + "\n")
        except (LockTimeout, OSError) as exc:
            raise FirewallError(f"firewalld setup: {exc}") from exc
        finally:
            lock.close()
            self._drop_connection()

    def _prepare(self, entries: Entries, now: float) -> None:
        zone = self.config.zone_name
        client = self._client()
        step = "waiting for firewalld"
        try:
            log.info("firewalld: waiting for state RUNNING")
            version = wait_running(client, RUNNING_TIMEOUT, time.sleep)
            log.info("firewalld: version %s is running", version)
            step = f"setting up zone {zone}"
            changed = ensure_zone(client, self.config, version)
            problems = [] if changed else runtime_zone_problems(client, self.config, version)
            if changed or problems:
                log.info("firewalld: reloading (%s)", "; ".join(problems) or "zone changed")
                step = "reloading"
                client.reload()
                wait_running(client, RUNNING_TIMEOUT, time.sleep)
            else:
                # No reload needed, and none done: it would also drop every other
                # runtime-only rule on the machine (fail2ban's bans, an admin's tests).
                # Only our own leftovers go.
                step = "removing leftover grants"
                wanted = {canonical(entry_network(e)) for e, x in entries.items() if x - now > 0}
                for rule in stray_grants(client.rich_rules(zone), wanted):
                    log.info("firewalld: removing leftover grant %s", rule)
                    remove_rule(client, zone, rule)
            step = "restoring grants"
            restored: list[str] = []
            started = time.monotonic()
            for entry, expiry in entries.items():
                # restoring many entries takes a while: count it against their time
                ttl = seconds_left(expiry, now + time.monotonic() - started)
                if ttl >= 1:
                    rules = grant_rules(entry_network(entry), self.config)
                    for rule in rules:
                        apply_timed(client, zone, rule, ttl)
                    if ttl >= 2:  # a 1 s grant may be gone before we look
                        restored.extend(rules)
            log.info("firewalld: restored %d whitelist entries", len(restored))
            step = "verifying"
            problems = runtime_zone_problems(client, self.config, version)
            problems += [f"missing grant {r}" for r in missing_rules(client, zone, restored)]
            if problems:
                raise FirewallError(f"firewalld zone {zone} not in place: {'; '.join(problems)}")
        except DBUS_FAILURES as exc:
            raise classify(exc, step) from exc
        self._warn_about_target(client)
        warn_about_docker(self.config)
        self.set_status(True, "")
        log.info("firewalld: zone %s ready", zone)

    def _warn_about_target(self, client: FirewalldClient) -> None:
        """firewalld's default zone target rejects whatever the zone does not allow, so
        with an unset zone_target every port of this host (Knocker's own included) is
        closed to monitored_ips, not only the monitored ones. Say so once at startup."""
        if self.config.zone_target is not None:
            return  # the user chose it
        try:
            target = client.config_zone_settings(self.config.zone_name).get("target")
        except DBUS_FAILURES:
            return
        if target != "ACCEPT":
            log.warning(
                "firewalld: zone %s has firewalld's default target: traffic from "
                "monitored_ips to ports other than the monitored ones is rejected too "
                "(Knocker's own port included). Set `zone_target: ACCEPT` to leave "
                "unmonitored ports alone; see docs/firewalld.md",
                self.config.zone_name,
            )

    def start_worker(self, current: Callable[[], Entries]) -> None:
        self._current = current
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = _Watcher(self)
            self._watcher.start()

    def grant(self, entry: str, ttl: int) -> None:
        if ttl < 1:
            raise FirewallError(f"cannot grant {entry} for {ttl} s")
        rules = grant_rules(entry_network(entry), self.config)
        doing = f"granting {entry}"
        try:
            with self._mutating(doing) as client:
                self._settle_unsettled(client)
                try:
                    grant_all(
                        client, self.config.zone_name, rules, ttl, lambda: self._remaining(entry)
                    )
                except GrantFailed as failed:
                    self._unsettled.update(dict.fromkeys(failed.unsettled, entry))
                    if is_unavailable(failed.cause):
                        self._drop_connection()
                    raise classify(failed.cause, doing) from failed.cause
        except DBUS_FAILURES as exc:  # from settling earlier leftovers
            raise classify(exc, doing) from exc
        log.debug("firewalld: granted %s for %d s", entry, ttl)

    def revoke(self, entries: Iterable[str]) -> None:
        pending = list(entries)
        while pending:
            entry = pending.pop(0)
            try:
                rules = grant_rules(entry_network(entry), self.config)
                with self._mutating(f"revoking {entry}") as client:
                    for rule in rules:
                        remove_rule(client, self.config.zone_name, rule)
            except (FirewallError, *DBUS_FAILURES) as exc:
                log.warning("firewalld: could not revoke %s: %s", entry, exc)
                if isinstance(exc, FirewallUnavailable) or is_unavailable(exc):
                    # Do not wait for a timeout per entry: the rest is settled (removed,
                    # unless the entry is whitelisted again) before the next change.
                    for rest in [entry, *pending]:
                        with contextlib.suppress(FirewallError):
                            network = entry_network(rest)
                            self._unsettled.update(
                                dict.fromkeys(grant_rules(network, self.config), rest)
                            )
                    return

    def problem(self) -> str | None:
        now = time.monotonic()
        checked, cached = self._problem_cache
        if now - checked < STATUS_CACHE:
            return cached
        reason = read_status(self._status_path, time.time())
        self._problem_cache = (now, reason)
        return reason

    def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.join(timeout=2.0)
        with self._thread_lock:
            self._drop_connection()
        self._mutation.close()

    # -- used by the watcher

    def reconcile(self, reader: FirewalldClient, reason: str) -> int:
        """After firewalld changed under us: wait for RUNNING, put the zone back if it is
        gone or changed, re-apply every unexpired entry whose rules are missing, verify.
        `reader` is the watcher's own connection, for calls that change nothing."""
        version = wait_running(reader, RUNNING_TIMEOUT, time.sleep)
        with self._mutating("checking the zone") as client:
            self._settle_unsettled(client)
            reload = ensure_zone(client, self.config, version)
            if not reload and runtime_zone_problems(client, self.config, version):
                # Someone changed the running zone without a reload (firewall-cmd without
                # --permanent). A reload repairs it, but not in a loop if it does not.
                now = time.monotonic()
                reload = now - self._repair_reload_at >= REPAIR_RELOAD_INTERVAL
                if reload:
                    self._repair_reload_at = now
            if reload:
                client.reload()
                wait_running(client, RUNNING_TIMEOUT, time.sleep)
        applied = self.reapply_missing(reader)
        problems = runtime_zone_problems(reader, self.config, version)
        if problems:
            raise FirewallError(f"zone {self.config.zone_name} not in place: {'; '.join(problems)}")
        self.set_status(True, "")
        log.info("firewalld: %s; %d grant rules re-applied", reason, applied)
        return applied

    def zone_problems(self, reader: FirewalldClient) -> list[str]:
        return runtime_zone_problems(reader, self.config, reader.version())

    def reapply_missing(self, reader: FirewalldClient) -> int:
        """Re-apply the rules of unexpired entries that firewalld lacks. A present rule was
        (re)applied after the change with a fresh timer and is left alone."""
        if self._current is None:
            return 0
        zone = self.config.zone_name
        wanted: dict[str, str] = {}
        expiries = dict(self._current())
        for entry in expiries:
            with contextlib.suppress(FirewallError):
                wanted.update(dict.fromkeys(grant_rules(entry_network(entry), self.config), entry))
        missing = missing_rules(reader, zone, wanted)
        applied = 0
        for rule in missing:
            entry = wanted[rule]
            with self._mutating(f"re-applying {entry}") as client:
                if client.query_rich_rule(zone, rule):  # a knock got there first
                    continue
                ttl = seconds_left(expiries[entry], self._clock())
                if ttl >= 1:
                    apply_timed(client, zone, rule, ttl)
                    applied += 1
        return applied


class _Watcher(threading.Thread):
    """One process per service (the holder of the watcher flock) listens for Reloaded and
    for firewalld's bus name changing owner, and puts grants back. The other processes
    keep trying the lock, so one of them takes over within ELECTION_RETRY when the
    watching process dies (the kernel releases its flock)."""

    def __init__(self, backend: FirewalldFirewall) -> None:
        super().__init__(name="knocker-firewalld-watcher", daemon=True)
        self.backend = backend
        self._stop_event = threading.Event()
        self._lock = FileLock(os.path.join(backend.state_dir, WATCHER_LOCK))

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                try:
                    elected = self._lock.try_acquire()
                except OSError as exc:
                    log.error("firewalld: watcher lock unusable: %s", exc)
                    elected = False
                if elected:
                    log.info("firewalld: process %d watches firewalld", os.getpid())
                    self._watch()
                    return
                self._stop_event.wait(ELECTION_RETRY)
        finally:
            self._lock.close()

    def _watch(self) -> None:
        while not self._stop_event.is_set():
            signals, calls = BusConnection(), BusConnection()
            try:
                self._listen(signals, FirewalldClient(calls))
            except DBUS_FAILURES as exc:
                self.backend.set_status(False, f"system bus unreachable: {exc}")
                log.warning("firewalld: watcher lost the bus: %s", exc)
                self._stop_event.wait(1.0)
            except Exception:  # a bug must not silently end the watching: say it, go on
                log.exception("firewalld: watcher failed")
                self.backend.set_status(False, "the firewalld watcher failed (see the log)")
                self._stop_event.wait(5.0)
            finally:
                signals.close()
                calls.close()

    def _listen(self, signals: BusConnection, reader: FirewalldClient) -> None:
        rules = signal_rules()
        for rule in rules:
            signals.call(message_bus.AddMatch(rule), CALL_TIMEOUT)
        raw = signals.raw()  # from here on this connection only receives
        present = reader.has_owner()
        pending = {"watcher started"} if present else set()
        if not present:
            self.backend.set_status(False, "firewalld is not running (no owner of its D-Bus name)")
        retry_at = recheck_at = 0.0
        last_beat = time.monotonic()
        check_at = last_beat + PERIODIC_CHECK
        while not self._stop_event.is_set():
            if pending and present and time.monotonic() >= retry_at:
                reason = ", ".join(sorted(pending))
                pending.clear()
                try:
                    self.backend.reconcile(reader, reason)
                    recheck_at = time.monotonic() + RECHECK_DELAY
                except (FirewallError, *DBUS_FAILURES) as exc:
                    log.warning("firewalld: after %s: %s", reason, exc)
                    self.backend.set_status(False, f"firewalld {reason}, not in place: {exc}")
                    pending.add(reason)
                    retry_at = time.monotonic() + HEARTBEAT
                last_beat = time.monotonic()
            elif recheck_at and time.monotonic() >= recheck_at:
                # Second look: a grant whose whitelist write was in flight during the
                # first pass is in current() now.
                recheck_at = 0.0
                try:
                    self.backend.reapply_missing(reader)
                except (FirewallError, *DBUS_FAILURES) as exc:
                    log.warning("firewalld: re-check failed: %s", exc)
            elif present and not pending and time.monotonic() >= check_at:
                # A signal may be lost (bus overload), or the zone changed at runtime
                # without one: look now and then, cheaply (a few read-only calls).
                check_at = time.monotonic() + PERIODIC_CHECK
                try:
                    if self.backend.reapply_missing(reader) or self.backend.zone_problems(reader):
                        pending.add("zone or grants changed")
                except (FirewallError, *DBUS_FAILURES) as exc:
                    log.warning("firewalld: periodic check failed: %s", exc)
                    pending.add("periodic check failed")
            if time.monotonic() - last_beat >= HEARTBEAT:
                self.backend.touch_status()
                last_beat = time.monotonic()
            try:
                message = raw.receive(timeout=0.25)
            except TimeoutError:
                continue
            if not any(rule.matches(message) for rule in rules):
                continue
            member = message.header.fields.get(HeaderFields.member)
            if member == "Reloaded":
                pending.add("reloaded")
            elif member == "NameOwnerChanged" and len(message.body) == 3:
                present = bool(message.body[2])
                if present:
                    pending.add("restarted")
                    continue
                pending.clear()
                log.warning("firewalld: firewalld left the bus")
                self.backend.set_status(
                    False, "firewalld is not running (no owner of its D-Bus name)"
                )
