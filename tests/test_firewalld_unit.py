"""knocker/firewalld without a bus and on fake time: rule strings, zone settings, messages,
error classes, and the grant/rollback/restore logic against a fake firewalld (our own logic
only; the real firewalld is in test_firewalld_integration.py)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jeepney import DBusAddress, HeaderFields, Message, new_signal

from knocker.addresses import IPNetwork, parse_network
from knocker.config import FirewalldConfig, MonitoredPort, parse_config
from knocker.errors import FirewallError, FirewallUnavailable
from knocker.firewall import create_firewall
from knocker.firewalld import FirewalldFirewall
from knocker.firewalld.backend import QUEUE_LIMIT, QUEUE_WAIT
from knocker.firewalld.calls import POLL_INTERVAL, FirewalldClient, apply_timed, wait_running
from knocker.firewalld.coordination import (
    PREPARED_MARKER,
    STATUS_FILE,
    STATUS_STALE,
    read_status,
    write_status,
)
from knocker.firewalld.docker import (
    docker_port_from_proxy,
    docker_ports_from_api,
    docker_published_ports,
    docker_warnings,
)
from knocker.firewalld.failures import FIREWALLD_EXCEPTION, DBusError, classify
from knocker.firewalld.messages import (
    BUS_NAME,
    IF_MAIN,
    PATH,
    msg_add_rich_rule,
    msg_config_zone_update,
    signal_rules,
)
from knocker.firewalld.rules import (
    accept_rule,
    block_rule,
    block_rules,
    grant_rules,
    parse_version,
    stray_grants,
    supports_zone_priority,
    target_rules,
    zone_changes,
    zone_settings,
)
from knocker.firewalld.schedule import (
    CHECK,
    HEARTBEAT,
    PERIODIC_CHECK,
    RECHECK,
    RECHECK_DELAY,
    RECONCILE,
    Job,
    ReapplySchedule,
)
from knocker.firewalld.watcher import Watcher
from knocker.store import FileStore
from knocker.whitelist import parse_entry

REPO = Path(__file__).resolve().parents[1]
SSH = MonitoredPort(22, "tcp")
GAME = MonitoredPort(27015, "udp")
NET4 = ipaddress.ip_network("192.0.2.0/24")
NET6 = ipaddress.ip_network("2001:db8::/64")


def config(**overrides: Any) -> FirewalldConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "monitored_ports": (SSH, GAME),
        "monitored_ips": (NET4, NET6),
    }
    values.update(overrides)
    return FirewalldConfig(**values)


def net(text: str) -> IPNetwork:
    network = parse_network(text)
    assert network is not None
    return network


# ------------------------------------------------------------------ fake time, a fake firewalld


class FakeClock:
    """Wall and monotonic time that move only when the code under test sleeps. The wall
    clock starts at the real whole second, so status-file mtimes still look fresh."""

    def __init__(self) -> None:
        self.wall = float(int(time.time()))
        self.mono = 1000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.wall += seconds
        self.mono += seconds


def dbus_error(code: str, text: str = "") -> DBusError:
    return DBusError(FIREWALLD_EXCEPTION, f"{code}: {text}" if text else code)


class FakeFirewalld:
    """Answers Knocker's D-Bus messages like firewalld does (rules, zones, reload), records
    every call, and raises injected failures: fail[(member, nth)] = exception."""

    def __init__(self, version: str = "2.3.1") -> None:
        self.version = version
        self.state = "RUNNING"
        self.owner = True
        self.permanent: dict[str, dict[str, Any]] = {"public": {"sources": [], "rules_str": []}}
        self.runtime: dict[str, set[str]] = {}
        self.timeouts: dict[str, int] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[tuple[str, int], Any] = {}  # an exception, or body -> exception
        self.states: list[str] = []  # states to report before self.state
        self.reloads = 0
        self.closed = 0
        self.clock = FakeClock()  # what the backend over this firewalld reads and sleeps on
        self.reload_runtime()

    # Connection protocol
    def call(self, message: Any, timeout: float) -> tuple[Any, ...]:
        member = message.header.fields[HeaderFields.member]
        body = tuple(message.body)
        self.calls.append((member, body))
        nth = sum(1 for name, _ in self.calls if name == member)
        failure = self.fail.get((member, nth)) or self.fail.get((member, 0))
        if callable(failure):  # a side effect first (a timer firing), then the error
            failure = failure(*body)
        if failure is not None:
            raise failure
        handler = getattr(self, f"on_{member}")
        result: tuple[Any, ...] = handler(message, *body)
        return result

    def close(self) -> None:
        self.closed += 1

    # bus daemon
    def on_NameHasOwner(self, message: Any, name: str) -> tuple[Any, ...]:
        return (self.owner,)

    def on_AddMatch(self, message: Any, rule: str) -> tuple[Any, ...]:
        return ()

    # properties
    def on_Get(self, message: Any, interface: str, name: str) -> tuple[Any, ...]:
        if not self.owner:
            raise DBusError("org.freedesktop.DBus.Error.ServiceUnknown", "")
        if name == "state":
            return (("s", self.states.pop(0) if self.states else self.state),)
        return (("s", self.version),)

    # runtime
    def reload_runtime(self) -> None:
        self.runtime = {zone: set(s.get("rules_str", [])) for zone, s in self.permanent.items()}
        self.timeouts = {}

    def on_reload(self, message: Any) -> tuple[Any, ...]:
        self.reloads += 1
        self.reload_runtime()
        return ()

    def zone(self, name: str) -> set[str]:
        if name not in self.runtime:
            raise dbus_error("INVALID_ZONE", name)
        return self.runtime[name]

    def on_addRichRule(self, message: Any, zone: str, rule: str, timeout: int) -> tuple[Any, ...]:
        rules = self.zone(zone)
        if rule in rules:
            raise dbus_error("ALREADY_ENABLED", rule)
        rules.add(rule)
        if timeout:
            self.timeouts[rule] = timeout
        return (zone,)

    def on_removeRichRule(self, message: Any, zone: str, rule: str) -> tuple[Any, ...]:
        rules = self.zone(zone)
        if rule not in rules:
            raise dbus_error("NOT_ENABLED", rule)
        rules.discard(rule)
        self.timeouts.pop(rule, None)
        return (zone,)

    def on_queryRichRule(self, message: Any, zone: str, rule: str) -> tuple[Any, ...]:
        return (rule in self.zone(zone),)

    def on_getRichRules(self, message: Any, zone: str) -> tuple[Any, ...]:
        return (sorted(self.zone(zone)),)

    def on_getActiveZones(self, message: Any) -> tuple[Any, ...]:
        return (
            {
                zone: {"sources": list(settings.get("sources", []))}
                for zone, settings in self.permanent.items()
                if settings.get("sources") and zone in self.runtime
            },
        )

    def on_getZoneSettings2(self, message: Any, zone: str) -> tuple[Any, ...]:
        settings = dict(self.permanent[zone])
        settings["rules_str"] = sorted(self.zone(zone))
        return ({key: ("v", value) for key, value in settings.items()},)

    # permanent
    def on_getZoneNames(self, message: Any) -> tuple[Any, ...]:
        return (sorted(self.permanent),)

    def on_getZoneByName(self, message: Any, zone: str) -> tuple[Any, ...]:
        return (f"/org/fedoraproject/FirewallD1/config/zone/{sorted(self.permanent).index(zone)}",)

    def zone_at(self, message: Any) -> str:
        index = int(str(message.header.fields[HeaderFields.path]).rsplit("/", 1)[1])
        return sorted(self.permanent)[index]

    def check_settings(self, settings: dict[str, Any]) -> None:
        if self.version.startswith("1.") and "ingress_priority" in settings:
            raise dbus_error("INVALID_OPTION", "option 'ingress_priority' is not valid")

    def on_addZone2(self, message: Any, zone: str, settings: dict[str, Any]) -> tuple[Any, ...]:
        if zone in self.permanent:
            raise dbus_error("NAME_CONFLICT", zone)
        self.check_settings(settings)
        self.permanent[zone] = {key: value[1] for key, value in settings.items()}
        return (f"/org/fedoraproject/FirewallD1/config/zone/{sorted(self.permanent).index(zone)}",)

    def on_getSettings2(self, message: Any) -> tuple[Any, ...]:
        settings = self.permanent[self.zone_at(message)]
        return ({key: ("v", value) for key, value in settings.items()},)

    def on_update2(self, message: Any, settings: dict[str, Any]) -> tuple[Any, ...]:
        self.check_settings(settings)
        self.permanent[self.zone_at(message)].update(
            {key: value[1] for key, value in settings.items()}
        )
        return ()

    # helpers for assertions
    def members(self) -> list[str]:
        return [member for member, _ in self.calls]

    def rule_calls(self) -> list[tuple[str, tuple[Any, ...]]]:
        wanted = {"addRichRule", "removeRichRule"}
        return [(member, body[1:]) for member, body in self.calls if member in wanted]


@pytest.fixture
def fake() -> FakeFirewalld:
    return FakeFirewalld()


def over(fake: FakeFirewalld, settings: FirewalldConfig, directory: Path) -> FirewalldFirewall:
    """A backend talking to `fake` and living on its fake clock."""
    clock = fake.clock
    return FirewalldFirewall(
        settings,
        str(directory),
        connect=lambda: fake,
        clock=clock.time,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
    )


def backend(
    fake: FakeFirewalld, tmp_path: Path, entries: dict[str, int] | None = None, **overrides: Any
) -> FirewalldFirewall:
    """A prepared backend over `fake` (the watcher is not started: tests drive it)."""
    firewall = over(fake, config(**overrides), tmp_path)
    firewall.prepare(entries or {}, fake.clock.time())
    fake.calls.clear()
    return firewall


def accept(entry: str, port: MonitoredPort = SSH) -> str:
    return accept_rule(net(entry), port)


# ------------------------------------------------------------------ rule strings


def test_accept_rule_uses_firewalld_canonical_word_order_for_ipv4() -> None:
    """A grant rule reads exactly as firewalld prints it back (trap 3)."""
    assert accept_rule(net("198.51.100.7"), SSH) == (
        'rule priority="1000" family="ipv4" source address="198.51.100.7" '
        'port port="22" protocol="tcp" accept'
    )


def test_accept_rule_for_ipv6_entry_uses_ipv6_family_and_compressed_address() -> None:
    """The entry's family decides the rule family; the address is in canonical form."""
    assert accept_rule(net("2001:DB8:0:0::7"), GAME) == (
        'rule priority="1000" family="ipv6" source address="2001:db8::7" '
        'port port="27015" protocol="udp" accept'
    )


def test_accept_rule_for_cidr_entries_keeps_the_prefix() -> None:
    """Whitelisted networks become source ranges."""
    assert 'source address="10.1.0.0/16"' in accept_rule(net("10.1.0.0/16"), SSH)
    assert 'source address="2001:db8:1::/64"' in accept_rule(net("2001:db8:1::/64"), SSH)


def test_block_rules_cover_every_port_in_both_families_with_the_configured_action() -> None:
    """One blocking rule per monitored port and IP family, at priority 9999."""
    assert block_rules(config(default_action="drop")) == [
        'rule priority="9999" family="ipv4" port port="22" protocol="tcp" drop',
        'rule priority="9999" family="ipv6" port port="22" protocol="tcp" drop',
        'rule priority="9999" family="ipv4" port port="27015" protocol="udp" drop',
        'rule priority="9999" family="ipv6" port port="27015" protocol="udp" drop',
    ]
    assert all(r.endswith(" reject") for r in block_rules(config(default_action="reject")))


def test_grant_rules_open_every_monitored_port() -> None:
    """A grant is one accept rule per monitored port."""
    assert grant_rules(net("192.0.2.9"), config()) == [
        accept("192.0.2.9", SSH),
        accept("192.0.2.9", GAME),
    ]


def test_stray_grants_finds_knocker_rules_of_unwanted_entries_only() -> None:
    """Leftover grant rules are recognised by shape; block rules and others stay."""
    rules = [
        accept("192.0.2.1"),
        accept("192.0.2.2"),
        accept("2001:db8::5"),
        block_rule("ipv4", SSH, "drop"),
        'rule family="ipv4" source address="192.0.2.3" accept',
    ]
    wanted = {"192.0.2.1 22/tcp", "2001:db8::5 22/tcp"}
    assert stray_grants(rules, wanted) == [accept("192.0.2.2")]


# ------------------------------------------------------------------ zone settings


def test_parse_version_reads_numeric_parts() -> None:
    """Versions compare as tuples; a suffix ends the parse."""
    assert parse_version("1.3.3") == (1, 3, 3)
    assert parse_version("2.3.1") == (2, 3, 1)
    assert parse_version("2.0.0rc1") == (2, 0, 0)
    assert supports_zone_priority((2, 0)) and not supports_zone_priority((1, 3, 3))


def test_zone_settings_on_firewalld_2_carry_sources_rules_and_priority() -> None:
    """ingress and egress priority are both set to zone_priority on firewalld >= 2.0."""
    settings = zone_settings(config(zone_priority=-100, zone_target="ACCEPT"), "2.3.1")
    assert settings["sources"] == ("as", ["192.0.2.0/24", "2001:db8::/64"])
    assert settings["rules_str"] == ("as", block_rules(config()))
    assert settings["ingress_priority"] == ("i", -100)
    assert settings["egress_priority"] == ("i", -100)
    assert settings["target"] == ("s", "ACCEPT")


def test_zone_settings_without_priority_or_target_leave_them_to_firewalld() -> None:
    """zone_priority: null and an unset zone_target are not sent at all."""
    settings = zone_settings(config(zone_priority=None), "1.3.3")
    assert "ingress_priority" not in settings and "egress_priority" not in settings
    assert "target" not in settings
    assert "priority" not in settings  # invalid on every version


def test_zone_settings_refuse_a_priority_on_firewalld_1_with_the_fix_in_the_message() -> None:
    """firewalld 1.3.x has no zone priority: refuse, telling the user about `null`."""
    with pytest.raises(FirewallError) as caught:
        zone_settings(config(zone_priority=-100), "1.3.3")
    assert "zone_priority: null" in caught.value.message
    assert "1.3.3" in caught.value.message


def test_reject_target_is_spelled_the_way_firewalld_wants_it() -> None:
    """knocker.yaml says REJECT; firewalld's zone API says %%REJECT%%."""
    assert zone_settings(config(zone_target="REJECT"), "2.3.1")["target"][1] == "%%REJECT%%"
    assert zone_settings(config(zone_target="DROP"), "2.3.1")["target"][1] == "DROP"


def test_zone_changes_ignore_spelling_and_order_but_see_real_differences() -> None:
    """Sources compare as networks, rules as sets; a new port is a change."""
    desired = zone_settings(config(zone_target="default"), "2.3.1")
    current = {
        "sources": ["2001:DB8:0::/64", "192.0.2.0/24"],
        "rules_str": list(reversed(block_rules(config()))),
        "target": "{chain}_{zone}",
        "ingress_priority": -100,
        "egress_priority": -100,
        "short": "renamed by an admin",
    }
    assert zone_changes(current, desired) == {}
    other = zone_settings(config(monitored_ports=(SSH,), zone_priority=-5), "2.3.1")
    assert set(zone_changes(current, other)) == {
        "rules_str",
        "ingress_priority",
        "egress_priority",
    }


# ------------------------------------------------------------------ messages


def test_add_rich_rule_message_addresses_firewalld_runtime_zone_interface() -> None:
    """The message is built without a bus: destination, path, interface, signature, body."""
    message = msg_add_rich_rule("knocker", accept("192.0.2.9"), 30)
    fields = message.header.fields
    assert fields[HeaderFields.destination] == "org.fedoraproject.FirewallD1"
    assert fields[HeaderFields.path] == "/org/fedoraproject/FirewallD1"
    assert fields[HeaderFields.interface] == "org.fedoraproject.FirewallD1.zone"
    assert fields[HeaderFields.member] == "addRichRule"
    assert fields[HeaderFields.signature] == "ssi"
    assert message.body == ("knocker", accept("192.0.2.9"), 30)


def test_zone_update_message_targets_the_zone_object_with_variants() -> None:
    """update2 goes to the config zone object, with a{sv} values as (signature, value)."""
    path = "/org/fedoraproject/FirewallD1/config/zone/7"
    message = msg_config_zone_update(path, {"sources": ("as", ["192.0.2.0/24"])})
    assert message.header.fields[HeaderFields.path] == path
    assert message.header.fields[HeaderFields.signature] == "a{sv}"
    assert message.body == ({"sources": ("as", ["192.0.2.0/24"])},)


def test_signal_rules_match_reloaded_and_firewalld_name_owner_changes_only() -> None:
    """The watcher subscribes to Reloaded and NameOwnerChanged(arg0 = firewalld's name)."""
    reloaded, owner = signal_rules()
    assert "member='Reloaded'" in reloaded.serialise()
    assert "arg0='org.fedoraproject.FirewallD1'" in owner.serialise()
    assert "member='NameOwnerChanged'" in owner.serialise()


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "error",
    [
        DBusError("org.freedesktop.DBus.Error.ServiceUnknown", "not provided"),
        DBusError("org.freedesktop.DBus.Error.NoReply", ""),
        dbus_error("NOT_RUNNING"),
        ConnectionRefusedError(111, "refused"),
        FileNotFoundError(2, "no socket"),
        TimeoutError(),
    ],
)
def test_unreachable_firewalld_or_bus_is_a_503(error: BaseException) -> None:
    """Gone, restarting, timed out or no bus at all: try again later."""
    result = classify(error, "granting 192.0.2.1")
    assert isinstance(result, FirewallUnavailable)
    assert result.status == 503


@pytest.mark.parametrize("code", ["INVALID_RULE", "INVALID_ZONE", "INVALID_ADDR", "ZONE_CONFLICT"])
def test_firewalld_refusals_are_a_500_with_the_code(code: str) -> None:
    """firewalld answered no: a server-side problem, reported with firewalld's code."""
    result = classify(dbus_error(code, "details"), "granting 192.0.2.1")
    assert type(result) is FirewallError
    assert result.status == 500
    assert code in result.message


def test_not_authorized_is_a_500_that_points_at_root_or_polkit() -> None:
    """A non-root Knocker without the polkit rule learns what to do."""
    error = DBusError("org.fedoraproject.FirewallD1.NotAuthorizedException", "config")
    result = classify(error, "granting 192.0.2.1")
    assert result.status == 500 and "polkit" in result.message


def test_error_code_is_read_only_from_firewalld_exceptions() -> None:
    """The leading word is a firewalld code only for firewalld's own exception type."""
    assert dbus_error("ALREADY_ENABLED", "rule").code == "ALREADY_ENABLED"
    assert DBusError("org.freedesktop.DBus.Error.Failed", "ALREADY_ENABLED: x").code == ""


# ------------------------------------------------------------------ trap 2 sequence


def test_apply_timed_sends_zero_timeout_add_then_remove_then_timed_add(fake: FakeFirewalld) -> None:
    """The measured remedy for stale timers: addRichRule(R, 0), removeRichRule(R),
    addRichRule(R, ttl), all with the very same string."""
    rule = accept("192.0.2.9")
    apply_timed(FirewalldClient(fake), "public", rule, 30)
    assert fake.rule_calls() == [
        ("addRichRule", (rule, 0)),
        ("removeRichRule", (rule,)),
        ("addRichRule", (rule, 30)),
    ]
    assert fake.timeouts[rule] == 30


def test_apply_timed_accepts_already_enabled_for_a_rule_that_is_there(fake: FakeFirewalld) -> None:
    """Re-knock: the first add finds the rule (ALREADY_ENABLED), the remove cancels its timer."""
    rule = accept("192.0.2.9")
    client = FirewalldClient(fake)
    client.add_rich_rule("public", rule, 10)
    apply_timed(client, "public", rule, 40)
    assert fake.timeouts[rule] == 40 and rule in fake.runtime["public"]


def test_apply_timed_accepts_not_enabled_when_the_rule_vanished_meanwhile(
    fake: FakeFirewalld,
) -> None:
    """NOT_ENABLED on the remove (a timer fired in between) is not a failure."""

    def timer_fired(zone: str, rule: str) -> BaseException:
        fake.runtime[zone].discard(rule)
        return dbus_error("NOT_ENABLED")

    fake.fail[("removeRichRule", 1)] = timer_fired
    apply_timed(FirewalldClient(fake), "public", accept("192.0.2.9"), 30)
    assert fake.rule_calls()[-1] == ("addRichRule", (accept("192.0.2.9"), 30))


def test_apply_timed_raises_other_firewalld_errors(fake: FakeFirewalld) -> None:
    """Anything but the two expected codes stops the sequence."""
    fake.fail[("addRichRule", 1)] = dbus_error("INVALID_RULE")
    with pytest.raises(DBusError):
        apply_timed(FirewalldClient(fake), "public", accept("192.0.2.9"), 30)
    assert fake.members() == ["addRichRule"]


# ------------------------------------------------------------------ grant / rollback


def test_grant_opens_every_monitored_port_for_the_ttl(fake: FakeFirewalld, tmp_path: Path) -> None:
    """Each monitored port gets the entry's accept rule with firewalld's timeout."""
    firewall = backend(fake, tmp_path)
    firewall.grant("192.0.2.9", 60)
    assert fake.timeouts == {accept("192.0.2.9", SSH): 60, accept("192.0.2.9", GAME): 60}


def test_grant_of_an_ipv6_network_uses_ipv6_rules(fake: FakeFirewalld, tmp_path: Path) -> None:
    """The entry's family decides the rule family."""
    backend(fake, tmp_path).grant("2001:db8:7::/64", 60)
    assert set(fake.timeouts) == {accept("2001:db8:7::/64", SSH), accept("2001:db8:7::/64", GAME)}


def test_partial_grant_failure_removes_what_this_grant_added(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """Second port fails: the first port's new rule is removed and the knock fails (500)."""
    firewall = backend(fake, tmp_path)
    fake.fail[("addRichRule", 3)] = dbus_error("INVALID_VALUE", "bad timeout")  # 2nd port
    with pytest.raises(FirewallError) as caught:
        firewall.grant("192.0.2.9", 60)
    assert caught.value.status == 500 and "INVALID_VALUE" in caught.value.message
    assert accept("192.0.2.9", SSH) not in fake.runtime["knocker"]
    assert accept("192.0.2.9", GAME) not in fake.runtime["knocker"]


def test_failed_re_knock_puts_the_earlier_grant_back(fake: FakeFirewalld, tmp_path: Path) -> None:
    """A failing extension leaves the entry as the whitelist still has it: open for the
    time it had left, not closed and not extended."""
    whitelist = {"192.0.2.9": int(fake.clock.time()) + 100}
    firewall = backend(fake, tmp_path, whitelist)
    firewall._current = lambda: whitelist  # what start_worker hands over
    fake.fail[("addRichRule", 4)] = dbus_error("COMMAND_FAILED")  # 2nd port, timed add
    with pytest.raises(FirewallError):
        firewall.grant("192.0.2.9", 3600)
    for port in (SSH, GAME):
        assert fake.timeouts[accept("192.0.2.9", port)] == 100


def test_grant_while_firewalld_is_gone_is_503_and_tries_no_rollback(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """ServiceUnknown: no point in rollback calls (each would fail); the knock gets 503."""
    firewall = backend(fake, tmp_path)
    fake.fail[("addRichRule", 0)] = DBusError("org.freedesktop.DBus.Error.ServiceUnknown", "")
    with pytest.raises(FirewallUnavailable):
        firewall.grant("192.0.2.9", 60)
    assert fake.members() == ["addRichRule"]


def test_rules_left_by_a_failed_grant_are_settled_before_the_next_one(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """A grant cut short mid-sequence (add with timeout 0 done, then the bus failed) must
    not leave a rule without timeout: the next mutation removes it."""
    firewall = backend(fake, tmp_path)
    fake.fail[("removeRichRule", 1)] = ConnectionResetError(104, "reset")
    with pytest.raises(FirewallUnavailable):
        firewall.grant("192.0.2.9", 60)
    assert accept("192.0.2.9", SSH) in fake.runtime["knocker"]  # the timeout-0 add
    fake.fail.clear()
    firewall.grant("192.0.2.10", 60)
    assert accept("192.0.2.9", SSH) not in fake.runtime["knocker"]
    assert accept("192.0.2.10", SSH) in fake.runtime["knocker"]


def test_grant_of_zero_seconds_or_a_bad_entry_is_refused(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """Nothing is sent for a grant that cannot be right."""
    firewall = backend(fake, tmp_path)
    with pytest.raises(FirewallError):
        firewall.grant("192.0.2.9", 0)
    with pytest.raises(FirewallError):
        firewall.grant("not-an-address", 10)
    assert fake.calls == []


def test_full_mutation_queue_answers_503_after_a_bounded_wait(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """With QUEUE_LIMIT mutations waiting in this process (firewalld stuck), the next grant
    waits QUEUE_WAIT for a place, then gets 503 without calling firewalld; once a place is
    free, grants go through again."""
    firewall = backend(fake, tmp_path)
    clock = fake.clock
    with contextlib.ExitStack() as waiting:
        for n in range(QUEUE_LIMIT):
            waiting.enter_context(firewall._admission.place(f"granting 192.0.2.{n}"))
        started = clock.monotonic()
        with pytest.raises(FirewallUnavailable) as caught:
            firewall.grant("192.0.2.200", 60)
        assert QUEUE_WAIT <= clock.monotonic() - started < QUEUE_WAIT + 0.1
        assert "queue is full" in caught.value.message
        assert fake.calls == []
    firewall.grant("192.0.2.200", 60)
    assert fake.timeouts[accept("192.0.2.200")] == 60


def test_revoke_removes_rules_and_ignores_ones_already_gone(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """Revocation is best effort: NOT_ENABLED (expired meanwhile) is fine."""
    firewall = backend(fake, tmp_path)
    firewall.grant("192.0.2.9", 60)
    firewall.revoke(["192.0.2.9", "192.0.2.10"])
    assert not any("192.0.2" in rule and "accept" in rule for rule in fake.runtime["knocker"])


def test_revoke_logs_failures_instead_of_raising(
    fake: FakeFirewalld, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Eviction and purge must go on when firewalld cannot be reached."""
    firewall = backend(fake, tmp_path)
    fake.fail[("removeRichRule", 0)] = DBusError("org.freedesktop.DBus.Error.NoReply", "")
    firewall.revoke(["192.0.2.9"])
    assert "could not revoke 192.0.2.9" in caplog.text


def test_revoke_with_firewalld_unreachable_stops_at_once_and_settles_later(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """A purge of many entries does not wait for a timeout per entry; the rules are
    removed before the next change once firewalld answers again."""
    firewall = backend(fake, tmp_path)
    for n in (1, 2, 3):
        firewall.grant(f"192.0.2.{n}", 60)
    fake.calls.clear()
    fake.fail[("removeRichRule", 0)] = DBusError("org.freedesktop.DBus.Error.NoReply", "")
    firewall.revoke(["192.0.2.1", "192.0.2.2", "192.0.2.3"])
    assert fake.members() == ["removeRichRule"]
    fake.fail.clear()
    firewall.grant("192.0.2.9", 60)
    left = {rule for rule in fake.runtime["knocker"] if "accept" in rule}
    assert left == {accept("192.0.2.9", SSH), accept("192.0.2.9", GAME)}


# ------------------------------------------------------------------ prepare


def test_prepare_creates_the_zone_reloads_and_restores_unexpired_entries(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """Zone with sources, target, priority and block rules; reload; each unexpired entry
    restored for its remaining time; expired ones skipped."""
    now = fake.clock.time()
    firewall = over(fake, config(zone_target="ACCEPT"), tmp_path)
    firewall.prepare({"192.0.2.7": int(now) + 120, "192.0.2.8": int(now) - 5}, now)
    zone = fake.permanent["knocker"]
    assert zone["sources"] == ["192.0.2.0/24", "2001:db8::/64"]
    assert zone["target"] == "ACCEPT" and zone["ingress_priority"] == -100
    assert set(zone["rules_str"]) == set(block_rules(config()))
    assert fake.reloads == 1
    assert fake.timeouts[accept("192.0.2.7")] == 120
    assert accept("192.0.2.8") not in fake.runtime["knocker"]
    assert "runtimeToPermanent" not in fake.members()
    assert firewall.problem() is None


def test_prepare_on_firewalld_1_refuses_a_zone_priority(tmp_path: Path) -> None:
    """1.3.x with zone_priority set: the service must not start, and the message says why."""
    fake = FakeFirewalld("1.3.3")
    firewall = over(fake, config(zone_priority=-100), tmp_path)
    with pytest.raises(FirewallError) as caught:
        firewall.prepare({}, fake.clock.time())
    assert "zone_priority: null" in caught.value.message
    assert "addZone2" not in fake.members()


def test_prepare_on_firewalld_1_works_without_priority(tmp_path: Path) -> None:
    """zone_priority: null on 1.3.x: zone created without priority keys."""
    fake = FakeFirewalld("1.3.3")
    firewall = over(fake, config(zone_priority=None), tmp_path)
    firewall.prepare({}, fake.clock.time())
    assert "ingress_priority" not in fake.permanent["knocker"]


def test_prepare_updates_a_changed_zone_and_leaves_a_matching_one_alone(tmp_path: Path) -> None:
    """A zone already as wanted is not reloaded (a reload would drop every runtime-only
    rule on the machine); our leftover grants are removed instead."""
    fake = FakeFirewalld()
    over(fake, config(), tmp_path).prepare({}, fake.clock.time())
    leftover = accept("192.0.2.50")
    fake.runtime["knocker"].add(leftover)
    fake.reloads = 0
    (tmp_path / PREPARED_MARKER).unlink()  # a new service start
    over(fake, config(), tmp_path).prepare({}, fake.clock.time())
    assert fake.reloads == 0 and leftover not in fake.runtime["knocker"]
    (tmp_path / PREPARED_MARKER).unlink()
    narrower = config(monitored_ports=(SSH,))
    over(fake, narrower, tmp_path).prepare({}, fake.clock.time())
    assert fake.reloads == 1
    assert set(fake.permanent["knocker"]["rules_str"]) == set(block_rules(narrower))


def test_prepare_warns_when_the_default_target_closes_unmonitored_ports_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unset zone_target: firewalld's default target rejects every other port for
    monitored_ips, Knocker's own included; say so. An explicit target is not second-guessed."""
    fake = FakeFirewalld()
    over(fake, config(), tmp_path).prepare({}, fake.clock.time())
    assert "zone_target: ACCEPT" in caplog.text
    caplog.clear()
    other, fresh = tmp_path / "other", FakeFirewalld()
    other.mkdir()
    accepting = config(zone_target="ACCEPT")
    over(fresh, accepting, other).prepare({}, fresh.clock.time())
    assert "zone_target" not in caplog.text


def test_prepare_runs_once_per_service_start(fake: FakeFirewalld, tmp_path: Path) -> None:
    """A second prepare of the same service (gunicorn workers without preload) is skipped."""
    firewall = over(fake, config(), tmp_path)
    firewall.prepare({}, fake.clock.time())
    calls = len(fake.calls)
    over(fake, config(), tmp_path).prepare({}, fake.clock.time())
    assert len(fake.calls) == calls


def test_prepare_waits_for_running_state(fake: FakeFirewalld, tmp_path: Path) -> None:
    """firewalld owns its name before its rules are in place: wait for RUNNING."""
    fake.states = ["INIT", "INIT", "INIT"]
    over(fake, config(), tmp_path).prepare({}, fake.clock.time())
    assert fake.clock.sleeps == [POLL_INTERVAL] * 3  # one pause per INIT seen
    assert fake.members()[:8] == ["NameHasOwner", "Get"] * 4  # then RUNNING
    assert "knocker" in fake.permanent


def test_failed_state_stops_startup_with_a_clear_message(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """A firewalld whose own config failed to load is not waited for."""
    fake.state = "FAILED"
    firewall = over(fake, config(), tmp_path)
    with pytest.raises(FirewallError) as caught:
        firewall.prepare({}, fake.clock.time())
    assert "FAILED" in caught.value.message


def test_prepare_reports_the_step_and_cause_of_a_failure(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """Any failure stops startup with firewalld's own words."""
    fake.fail[("addZone2", 1)] = dbus_error("ZONE_CONFLICT", "192.0.2.0/24 is in zone home")
    firewall = over(fake, config(), tmp_path)
    with pytest.raises(FirewallError) as caught:
        firewall.prepare({}, fake.clock.time())
    assert "zone knocker" in caught.value.message and "ZONE_CONFLICT" in caught.value.message


def test_wait_running_gives_up_after_the_timeout(fake: FakeFirewalld) -> None:
    """No firewalld: a bounded wait, then 503-class error naming the last state seen."""
    fake.owner = False
    clock = fake.clock
    with pytest.raises(FirewallUnavailable) as caught:
        wait_running(FirewalldClient(fake), 30.0, clock.monotonic, clock.sleep)
    assert "not RUNNING after 30 s" in caught.value.message
    assert 30.0 <= sum(clock.sleeps) < 30.0 + 2 * POLL_INTERVAL


# ------------------------------------------------------------------ staying correct


def test_reconcile_after_reload_reapplies_missing_grants_for_their_remaining_time(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """Reloaded: every unexpired entry is back with the time it has left; rules a knock
    re-applied after the reload keep their fresh timer."""
    now = int(fake.clock.time())
    whitelist = {"192.0.2.1": now + 50, "2001:db8::1": now + 500, "192.0.2.3": now - 1}
    firewall = backend(fake, tmp_path)
    firewall._current = lambda: whitelist
    fake.on_reload(None)
    firewall.grant("2001:db8::1", 900)  # knocked again after the reload
    firewall.reconcile(FirewalldClient(fake), "reloaded")
    assert fake.timeouts[accept("192.0.2.1", SSH)] == 50
    assert fake.timeouts[accept("2001:db8::1", GAME)] == 900
    assert accept("192.0.2.3") not in fake.runtime["knocker"]
    assert firewall.problem() is None


def test_reconcile_recreates_a_zone_lost_with_a_fresh_config(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """A restart with a pristine configuration: zone created again, reloaded, grants back."""
    now = int(fake.clock.time())
    firewall = backend(fake, tmp_path)
    firewall._current = lambda: {"192.0.2.1": now + 50}
    del fake.permanent["knocker"]
    fake.reload_runtime()
    firewall.reconcile(FirewalldClient(fake), "restarted")
    assert "knocker" in fake.permanent
    assert accept("192.0.2.1") in fake.runtime["knocker"]


def test_runtime_tampering_is_repaired_by_a_reload_but_never_in_a_loop(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """A block rule removed at runtime (no reload, no signal) comes back with one reload;
    if it keeps disappearing, Knocker reports it instead of reloading again and again."""
    firewall = backend(fake, tmp_path)
    block = block_rules(config())[0]
    fake.runtime["knocker"].discard(block)
    fake.reloads = 0
    reader = FirewalldClient(fake)
    assert "missing rule" in " ".join(firewall.zone_problems(reader))
    firewall.reconcile(reader, "periodic check")
    assert fake.reloads == 1 and block in fake.runtime["knocker"]
    fake.runtime["knocker"].discard(block)
    with pytest.raises(FirewallError):
        firewall.reconcile(reader, "periodic check")
    assert fake.reloads == 1


# ------------------------------------------------------------------ the watcher's schedule


def test_schedule_reconciles_at_once_when_the_watcher_starts_with_firewalld_there() -> None:
    """A new watcher does not know what it missed: one reconcile first, then nothing."""
    schedule = ReapplySchedule(present=True, now=0.0)
    assert schedule.next_job(0.0) == Job(RECONCILE, "watcher started")
    assert schedule.next_job(0.0) is None


def test_schedule_waits_for_firewalld_to_appear_before_reconciling() -> None:
    """Without firewalld on the bus nothing is tried, however long; its return is a restart."""
    schedule = ReapplySchedule(present=False, now=0.0)
    assert schedule.next_job(10 * PERIODIC_CHECK) is None
    schedule.appeared()
    assert schedule.next_job(10 * PERIODIC_CHECK) == Job(RECONCILE, "restarted")


def test_schedule_retries_a_failed_reconcile_after_a_heartbeat_not_before() -> None:
    """A failed reconcile keeps its reason and comes back HEARTBEAT seconds later."""
    schedule = ReapplySchedule(present=True, now=0.0)
    job = schedule.next_job(0.0)
    assert job is not None
    schedule.reconcile_failed(job.reason, 5.0)
    assert schedule.next_job(5.0 + HEARTBEAT - 0.01) is None
    assert schedule.next_job(5.0 + HEARTBEAT) == Job(RECONCILE, "watcher started")


def test_schedule_looks_again_after_a_reconcile_and_then_periodically() -> None:
    """RECHECK_DELAY after a reconcile a second look; with nothing pending, a cheap check
    every PERIODIC_CHECK seconds."""
    schedule = ReapplySchedule(present=True, now=0.0)
    schedule.next_job(0.0)
    schedule.reconciled(1.0)
    assert schedule.next_job(1.0 + RECHECK_DELAY - 0.01) is None
    assert schedule.next_job(1.0 + RECHECK_DELAY) == Job(RECHECK)
    assert schedule.next_job(PERIODIC_CHECK - 0.01) is None
    assert schedule.next_job(PERIODIC_CHECK) == Job(CHECK)
    assert schedule.next_job(PERIODIC_CHECK + 1) is None
    assert schedule.next_job(2 * PERIODIC_CHECK) == Job(CHECK)


def test_schedule_gathers_signals_into_one_reconcile_and_forgets_them_when_firewalld_goes() -> None:
    """Reloaded and a restart seen together make one reconcile naming both; firewalld
    leaving the bus cancels what was pending (nothing can be done until it is back)."""
    schedule = ReapplySchedule(present=True, now=0.0)
    schedule.next_job(0.0)
    schedule.reloaded()
    schedule.appeared()
    assert schedule.next_job(1.0) == Job(RECONCILE, "reloaded, restarted")
    schedule.reloaded()
    schedule.vanished()
    assert schedule.next_job(10 * PERIODIC_CHECK) is None


def test_schedule_heartbeat_is_due_every_heartbeat_seconds() -> None:
    """The shared status is touched at least every HEARTBEAT seconds."""
    schedule = ReapplySchedule(present=True, now=0.0)
    assert not schedule.beat_due(HEARTBEAT - 0.01)
    assert schedule.beat_due(HEARTBEAT)
    schedule.beat(HEARTBEAT)
    assert not schedule.beat_due(2 * HEARTBEAT - 0.01)


# ------------------------------------------------------------------ the watcher, on fake time


def reloaded_signal() -> Message:
    return new_signal(DBusAddress(PATH, interface=IF_MAIN), "Reloaded")


def owner_signal(new_owner: str) -> Message:
    bus = DBusAddress("/org/freedesktop/DBus", interface="org.freedesktop.DBus")
    message = new_signal(bus, "NameOwnerChanged", "sss", (BUS_NAME, ":1.7", new_owner))
    message.header.fields[HeaderFields.sender] = "org.freedesktop.DBus"  # the bus sets it
    return message


class FakeSignals:
    """The watcher's signal connection: subscriptions go to `fake`; each receive plays
    the next step of `script` (a message, None for a quiet wait, or a callable making
    one) while the fake clock moves on; at the end of the script the watcher is stopped."""

    def __init__(self, fake: FakeFirewalld, script: list[Any], watcher: Watcher) -> None:
        self.fake, self.script, self.watcher = fake, script, watcher

    def call(self, message: Any, timeout: float) -> tuple[Any, ...]:
        return self.fake.call(message, timeout)

    def receive(self, timeout: float) -> Message | None:
        self.fake.clock.sleep(timeout)
        if not self.script:
            self.watcher.stop()
            return None
        step = self.script.pop(0)
        message: Message | None = step() if callable(step) else step
        return message

    def close(self) -> None:
        pass


def watch(
    firewall: FirewalldFirewall, fake: FakeFirewalld, tmp_path: Path, script: list[Any]
) -> None:
    """Run the elected watcher's listening loop over `fake` until `script` is played."""
    clock = fake.clock
    watcher = Watcher(
        firewall, str(tmp_path / "watcher.lock"), monotonic=clock.monotonic, sleep=clock.sleep
    )
    watcher._listen(FakeSignals(fake, script, watcher), FirewalldClient(fake))


def test_watcher_puts_grants_back_after_a_reload_signal(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """Reloaded: the grants firewalld dropped come back for the time they have left."""
    firewall = backend(fake, tmp_path)
    whitelist = {"192.0.2.1": int(fake.clock.time()) + 60}
    firewall._current = lambda: whitelist
    firewall.grant("192.0.2.1", 60)
    fake.reloads = 0

    def reload() -> Message:
        fake.on_reload(None)
        return reloaded_signal()

    quiet = [None] * 40  # ten seconds without a signal
    watch(firewall, fake, tmp_path, [*quiet, reload, None])
    assert fake.reloads == 1  # only firewalld's own: Knocker had no reason to reload
    assert fake.timeouts[accept("192.0.2.1")] == 50  # reloaded at +10.25 s of 60
    assert fake.timeouts[accept("192.0.2.1", GAME)] == 50
    assert read_status(str(tmp_path / STATUS_FILE), fake.clock.time()) is None


def test_watcher_reports_firewalld_gone_and_restores_when_it_is_back(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    """Owner lost: the shared status says firewalld is not running; owner back (a restart
    with a pristine configuration): zone and grants are put back and the status is ok."""
    firewall = backend(fake, tmp_path)
    whitelist = {"2001:db8::1": int(fake.clock.time()) + 300}
    firewall._current = lambda: whitelist
    firewall.grant("2001:db8::1", 300)
    status = str(tmp_path / STATUS_FILE)
    seen: list[str | None] = []

    def stop() -> Message:
        fake.owner = False
        fake.runtime = {}
        return owner_signal("")

    def start() -> Message:
        seen.append(read_status(status, fake.clock.time()))
        fake.owner = True
        del fake.permanent["knocker"]  # a fresh configuration
        fake.reload_runtime()
        return owner_signal(":1.9")

    watch(firewall, fake, tmp_path, [None, stop, None, start, None])
    assert seen == ["firewalld is not running (no owner of its D-Bus name)"]
    assert "knocker" in fake.permanent
    assert accept("2001:db8::1", GAME) in fake.runtime["knocker"]
    assert read_status(status, fake.clock.time()) is None


def test_status_file_tells_every_process_what_the_watcher_saw(tmp_path: Path) -> None:
    """/ready's reason comes from the shared status: fresh ok, failure, stale, missing."""
    path = str(tmp_path / "status.json")
    assert read_status(path, time.time()) is not None
    write_status(path, True, "")
    assert read_status(path, time.time()) is None
    assert "watching" in str(read_status(path, time.time() + STATUS_STALE + 1))
    write_status(path, False, "firewalld is not running")
    assert read_status(path, time.time()) == "firewalld is not running"
    assert json.loads(Path(path).read_text())["pid"] == os.getpid()


def test_problem_is_cached_briefly(fake: FakeFirewalld, tmp_path: Path) -> None:
    """/ready reads a small file at most once a second per process, never the bus."""
    firewall = backend(fake, tmp_path)
    assert firewall.problem() is None
    write_status(str(tmp_path / STATUS_FILE), False, "gone")
    assert firewall.problem() is None  # cached
    firewall._problem_cache = (-1e9, None)
    assert firewall.problem() == "gone"
    assert fake.calls == []


def test_create_firewall_picks_this_backend_when_enabled(tmp_path: Path) -> None:
    """The registry line in knocker/firewall.py reaches FirewalldFirewall."""
    assert isinstance(create_firewall(config(), str(tmp_path)), FirewalldFirewall)


# ------------------------------------------------------------------ Docker


def test_docker_api_answer_lists_published_host_ports() -> None:
    """PublicPort/Type of every container's published ports."""
    body = json.dumps(
        [
            {
                "Ports": [
                    {"PrivatePort": 22, "PublicPort": 2222, "Type": "tcp", "IP": "0.0.0.0"},
                    {"PrivatePort": 53, "Type": "udp"},
                ]
            },
            {"Ports": [{"PrivatePort": 27015, "PublicPort": 27015, "Type": "udp"}]},
        ]
    ).encode()
    assert docker_ports_from_api(body) == {(2222, "tcp"), (27015, "udp")}


def test_docker_proxy_command_line_gives_its_host_port() -> None:
    """docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port 8022 ..."""
    argv = [
        "/usr/bin/docker-proxy",
        "-proto",
        "tcp",
        "-host-ip",
        "0.0.0.0",
        "-host-port",
        "22",
        "-container-ip",
        "172.17.0.2",
        "-container-port",
        "22",
    ]
    assert docker_port_from_proxy(argv) == (22, "tcp")
    assert docker_port_from_proxy(["/usr/sbin/sshd", "-D"]) is None


def test_docker_warning_names_the_port_and_the_workaround() -> None:
    """Only monitored ports that Docker publishes are warned about."""
    warnings = docker_warnings({(22, "tcp"), (80, "tcp")}, [SSH, GAME])
    assert len(warnings) == 1
    assert "22/tcp" in warnings[0] and "host networking" in warnings[0]


def test_docker_detection_never_fails(tmp_path: Path) -> None:
    """A broken socket or /proc does not stop startup."""
    broken = tmp_path / "docker.sock"
    broken.write_text("not a socket")
    assert docker_published_ports(str(broken), str(tmp_path / "noproc")) == set()


# ------------------------------------------------------------------ polkit rule


def test_polkit_rule_grants_the_knocker_user_only_the_config_actions() -> None:
    """The shipped rule names exactly .config and .config.info, for user knocker only."""
    text = (REPO / "deploy/polkit/50-knocker-firewalld.rules").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.strip().startswith("//"))
    actions = set(part.split('"')[1] for part in code.split("action.id ==")[1:])
    assert actions == {
        "org.fedoraproject.FirewallD1.config",
        "org.fedoraproject.FirewallD1.config.info",
    }
    assert 'subject.user == "knocker"' in code
    assert "polkit.Result.YES" in code


# ------------------------------------------------------------------ port-scoped keys
# The store over a real FirewalldFirewall over the fake: what each lifecycle path leaves
# in firewalld for an address with a port-scoped grant (docs/firewalld.md#port-scoped-keys).

ADDRESS = "192.0.2.77"


class PortLab:
    """A FileStore whose firewall is FirewalldFirewall over `fake`, both on its clock."""

    def __init__(self, fake: FakeFirewalld, directory: Path, capacity: int = 100) -> None:
        self.fake, self.directory, self.capacity = fake, directory, capacity
        self.config = parse_config(
            {
                "api_keys": [{"name": "k", "key": "k" * 32, "max_ttl": 9000}],
                "security": {"max_whitelist_entries": capacity},
                "whitelist": {"storage_path": str(directory / "whitelist.json")},
                "firewalld": {
                    "enabled": True,
                    "monitored_ips": ["192.0.2.0/24"],
                    "monitored_ports": [{"port": 22}, {"port": 27015, "protocol": "udp"}],
                },
            }
        )
        self.firewall = over(fake, self.config.firewalld, directory)
        self.store = self._open()

    def _open(self) -> FileStore:
        store = FileStore(self.config, self.firewall, clock=self.fake.clock.time)
        self.firewall._current = store.entries  # what start_worker hands the watcher
        return store

    def restart(self) -> None:
        """Knocker stops and starts again: a new store, prepare() with its entries."""
        self.store.close()
        self.firewall.close()
        self.firewall = over(self.fake, self.config.firewalld, self.directory)
        self.store = self._open()
        (self.directory / PREPARED_MARKER).unlink()  # a new service start, a new marker
        self.firewall.prepare(self.store.entries(), self.fake.clock.time())

    def knock(self, ttl: int, name: str, ports: tuple[str, ...] = (), entry: str = ADDRESS) -> None:
        key = parse_entry(entry)
        assert key is not None
        self.store.knock(
            key, ttl, self.fake.clock.time(), key_name=name, scoped=bool(ports), ports=ports
        )

    def revoke(self, name: str | None, entry: str = ADDRESS) -> list[str]:
        key = parse_entry(entry)
        assert key is not None
        return [g.key_name or "" for g in self.store.revoke(key, name, self.fake.clock.time())]

    def open_ports(self, entry: str = ADDRESS) -> dict[str, int]:
        """Monitored port -> the timeout firewalld holds for its accept rule of `entry`."""
        rules = self.fake.runtime.get("knocker", set())
        return {
            str(port): self.fake.timeouts.get(accept(entry, port), 0)
            for port in (SSH, GAME)
            if accept(entry, port) in rules
        }


@pytest.fixture
def ports_lab(fake: FakeFirewalld, tmp_path: Path) -> Iterator[PortLab]:
    lab = PortLab(fake, tmp_path)
    lab.firewall.prepare({}, fake.clock.time())
    yield lab
    lab.store.close()
    lab.firewall.close()


def test_port_scoped_knock_opens_only_its_port(ports_lab: PortLab) -> None:
    """A key scoped to 22/tcp opens 22/tcp and leaves the other monitored port closed."""
    ports_lab.knock(600, "ssh-only", ("22/tcp",))
    assert ports_lab.open_ports() == {"22/tcp": 600}


def test_unscoped_knock_opens_every_port_without_cutting_a_longer_port_grant(
    ports_lab: PortLab,
) -> None:
    """The unscoped grant opens both ports for its time; the longer port-scoped grant
    keeps its own port open for longer, and only that port."""
    ports_lab.knock(600, "ssh-only", ("22/tcp",))
    ports_lab.knock(60, "phone")
    assert ports_lab.open_ports() == {"22/tcp": 600, "27015/udp": 60}
    ports_lab.knock(900, "phone")  # now the unscoped grant is the longest: one target
    assert ports_lab.open_ports() == {"22/tcp": 900, "27015/udp": 900}
    assert ports_lab.store.entries() == {ADDRESS: int(ports_lab.fake.clock.time()) + 900}


def test_re_knock_of_a_port_scoped_key_extends_only_its_port(ports_lab: PortLab) -> None:
    ports_lab.knock(60, "phone")
    ports_lab.knock(100, "ssh-only", ("22/tcp",))
    ports_lab.fake.clock.wall += 50
    ports_lab.knock(300, "ssh-only", ("22/tcp",))
    assert ports_lab.open_ports() == {"22/tcp": 300, "27015/udp": 10}


def test_sign_out_of_the_unscoped_grant_leaves_only_the_scoped_port(ports_lab: PortLab) -> None:
    """Revoking cuts back to what the remaining grants allow, port by port; revoking
    every grant closes everything."""
    ports_lab.knock(600, "phone")
    ports_lab.knock(300, "ssh-only", ("22/tcp",))
    assert ports_lab.open_ports() == {"22/tcp": 600, "27015/udp": 600}
    assert ports_lab.revoke("phone") == ["phone"]
    assert ports_lab.open_ports() == {"22/tcp": 300}
    ports_lab.knock(600, "phone")
    assert sorted(ports_lab.revoke(None)) == ["phone", "ssh-only"]
    assert ports_lab.open_ports() == {}


def test_sign_out_of_the_port_scoped_grant_keeps_the_unscoped_one(ports_lab: PortLab) -> None:
    ports_lab.knock(60, "phone")
    ports_lab.knock(600, "ssh-only", ("22/tcp",))
    ports_lab.revoke("ssh-only")
    assert ports_lab.open_ports() == {"22/tcp": 60, "27015/udp": 60}


def test_purge_of_an_expired_unscoped_grant_closes_the_other_ports_only(ports_lab: PortLab) -> None:
    """Past the unscoped expiry the purge closes what firewalld's own timer should have
    closed, and leaves the port-scoped grant's port open."""
    ports_lab.knock(60, "phone")
    ports_lab.knock(600, "ssh-only", ("22/tcp",))
    fake = ports_lab.fake
    fake.clock.wall += 2
    ports_lab.store.tick(fake.clock.time())  # whitelist.json written: the purge is due later
    fake.clock.wall += 120
    fake.runtime["knocker"].add(accept(ADDRESS, GAME))  # as if the timer had not fired
    ports_lab.store.tick(fake.clock.time())  # past the cleanup interval
    assert ports_lab.store.entries() == {f"{ADDRESS} 22/tcp": int(fake.clock.time()) + 478}
    assert set(ports_lab.open_ports()) == {"22/tcp"}


def test_eviction_of_an_unscoped_entry_keeps_what_its_port_grant_allows(
    fake: FakeFirewalld, tmp_path: Path
) -> None:
    lab = PortLab(fake, tmp_path, capacity=1)
    lab.firewall.prepare({}, fake.clock.time())
    try:
        lab.knock(60, "phone")
        lab.knock(600, "ssh-only", ("22/tcp",))
        lab.knock(60, "phone", entry="192.0.2.78")  # evicts ADDRESS from the whitelist
        assert set(lab.open_ports()) == {"22/tcp"}
        assert set(lab.open_ports("192.0.2.78")) == {"22/tcp", "27015/udp"}
    finally:
        lab.store.close()
        lab.firewall.close()


def test_restart_restores_a_port_scoped_grant_to_its_port_only(ports_lab: PortLab) -> None:
    """Startup restore: only the scoped port comes back, and a leftover rule for the
    other port of the same address is removed (never widen after a restart)."""
    ports_lab.knock(600, "ssh-only", ("22/tcp",))
    ports_lab.knock(600, "phone", entry="192.0.2.78")
    fake = ports_lab.fake
    fake.runtime["knocker"].add(accept(ADDRESS, GAME))  # left behind while Knocker was down
    ports_lab.restart()
    assert set(ports_lab.open_ports()) == {"22/tcp"}
    assert set(ports_lab.open_ports("192.0.2.78")) == {"22/tcp", "27015/udp"}
    whitelist = json.loads((ports_lab.directory / "whitelist.json").read_text())
    assert list(whitelist) == ["192.0.2.78"]  # an upstream reader never sees the scoped one


def test_firewalld_reload_re_applies_a_port_scoped_grant_to_its_port_only(
    ports_lab: PortLab,
) -> None:
    ports_lab.knock(60, "phone")
    ports_lab.knock(600, "ssh-only", ("22/tcp",))
    ports_lab.fake.on_reload(None)
    assert ports_lab.open_ports() == {}
    ports_lab.firewall.reconcile(FirewalldClient(ports_lab.fake), "reloaded")
    assert ports_lab.open_ports() == {"22/tcp": 600, "27015/udp": 60}
    ports_lab.revoke("phone")
    ports_lab.fake.on_reload(None)
    ports_lab.firewall.reconcile(FirewalldClient(ports_lab.fake), "reloaded")
    assert ports_lab.open_ports() == {"22/tcp": 600}


def test_failed_port_grant_puts_the_earlier_grant_back(ports_lab: PortLab) -> None:
    """A port-scoped knock whose firewalld call fails leaves the firewall as it was."""
    ports_lab.knock(60, "phone")
    adds = ports_lab.fake.members().count("addRichRule")
    ports_lab.fake.fail[("addRichRule", adds + 3)] = dbus_error("INVALID_RULE")
    with pytest.raises(FirewallError):
        ports_lab.knock(600, "ssh-only", ("22/tcp",))
    assert ports_lab.open_ports() == {"22/tcp": 60, "27015/udp": 60}
    assert [g.key_name for g in ports_lab.store.grants(ports_lab.fake.clock.time())] == ["phone"]


def test_a_port_the_config_no_longer_monitors_opens_nothing() -> None:
    """target_rules: a bare entry is every monitored port, a one-port target that port
    only when it is still monitored."""
    assert list(target_rules("192.0.2.9", config())) == [
        accept("192.0.2.9", SSH),
        accept("192.0.2.9", GAME),
    ]
    assert target_rules("192.0.2.9 27015/udp", config()) == {
        accept("192.0.2.9", GAME): "192.0.2.9 27015/udp"
    }
    assert target_rules("192.0.2.9 80/tcp", config()) == {}
