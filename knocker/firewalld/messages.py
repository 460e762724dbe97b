"""Pure: the D-Bus messages Knocker exchanges with firewalld, built and read without a bus.

Owns: firewalld's bus name, object paths and interfaces; one builder per method Knocker
calls (jeepney's new_method_call only constructs a Message); the match rules of the two
signals the watcher needs and what a received signal means. bus.py does the sending.
"""

from __future__ import annotations

from collections.abc import Mapping

from jeepney import DBusAddress, HeaderFields, MatchRule, Message, new_method_call
from jeepney.bus_messages import message_bus

from .rules import Variant

BUS_NAME = "org.fedoraproject.FirewallD1"
PATH = "/org/fedoraproject/FirewallD1"
CONFIG_PATH = PATH + "/config"
IF_MAIN = "org.fedoraproject.FirewallD1"
IF_ZONE = "org.fedoraproject.FirewallD1.zone"
IF_CONFIG = "org.fedoraproject.FirewallD1.config"
IF_CONFIG_ZONE = "org.fedoraproject.FirewallD1.config.zone"
IF_PROPERTIES = "org.freedesktop.DBus.Properties"


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


def msg_add_match(rule: MatchRule) -> Message:
    return message_bus.AddMatch(rule)


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


# What a received signal means for the watcher.
RELOADED = "reloaded"
APPEARED = "appeared"  # firewalld took its bus name: it (re)started
VANISHED = "vanished"  # firewalld left the bus


def signal_event(message: Message, rules: list[MatchRule]) -> str | None:
    """RELOADED, APPEARED or VANISHED for a signal matching `rules`, else None."""
    if not any(rule.matches(message) for rule in rules):
        return None
    member = message.header.fields.get(HeaderFields.member)
    if member == "Reloaded":
        return RELOADED
    if member == "NameOwnerChanged" and len(message.body) == 3:
        return APPEARED if message.body[2] else VANISHED
    return None
