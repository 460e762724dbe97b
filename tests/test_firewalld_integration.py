"""Knocker + a real firewalld, with real traffic: Debian 12's firewalld 1.3.3 and Debian 13's
2.3.x, each in network namespaces of its own on a private system bus (tests/fwlab), with
a real `knocker serve` (2 workers) running inside the protected namespace. The client
namespace knocks over HTTP through the veth and probes TCP ports 2222 (monitored) and
2223 (not monitored). One firewalld and one Knocker per version are shared by the tests
of this module, which run in file order; each test uses client addresses of its own.

Needs root; locally skipped without the prerequisites, a failure under CI=true.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest

from knocker.addresses import parse_network
from knocker.config import FirewalldConfig, MonitoredPort
from knocker.firewalld.backend import STATUS_CACHE
from knocker.firewalld.coordination import STATUS_FILE
from knocker.firewalld.rules import accept_rule, block_rules, parse_version
from tests.fwlab import Lab, cleanup_stale_namespaces, fetch_v2_if_possible, missing_prerequisites
from tests.fwlab.lab import client4, client6
from tests.fwlab.service import OPS_KEY, PORT_KEY, NetnsKnocker, firewalld_section
from tests.support.config import TEST_KEY

pytestmark = pytest.mark.firewalld

MONITORED, UNMONITORED, SECOND = Lab.MONITORED, Lab.UNMONITORED, Lab.SECOND
PORT = MonitoredPort(MONITORED, "tcp")
BACK_WITHIN = 5.0  # seconds: grants must work again this soon after a reload/restart


def require(version: str) -> None:
    if version == "2.3":
        fetch_v2_if_possible()
    missing = missing_prerequisites(version)
    if missing:
        message = f"firewalld {version} lab needs: {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (make test-deps must provide them in CI)")
        pytest.skip(message)


def host_ruleset_hash() -> str:
    """The machine's own rules, without their packet counters (--stateless): traffic the
    machine carries meanwhile (a container's NAT, say) is not a change to its ruleset."""
    out = subprocess.run(
        ["nft", "--stateless", "list", "ruleset"], capture_output=True, text=True
    ).stdout
    return hashlib.sha256(out.encode()).hexdigest()


@pytest.fixture(scope="module", params=["1.3", "2.3"], ids=["firewalld-1.3", "firewalld-2.3"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    version: str = request.param
    require(version)
    before = host_ruleset_hash()
    lab = Lab(version, tmp_path_factory.mktemp(f"fwlab-{version}")).start()
    lab.host_ruleset_before = before
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def knocker(lab: Lab) -> Iterator[NetnsKnocker]:
    server = NetnsKnocker(lab, lab.workdir / "knocker", firewalld_section(lab.firewalld.version))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until predicate() held, or None if it did not within timeout."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(interval)


def opened(lab: Lab, source: str, timeout: float = 0.5, port: int = MONITORED) -> bool:
    family = 6 if ":" in source else 4
    return lab.connect(port, family, timeout=timeout, source=source) == "connected"


def knock(knocker: NetnsKnocker, source: str, ttl: int) -> dict[str, object]:
    status, body = knocker.knock(body={"ttl": ttl}, source=source)
    assert status == 200, (status, body, knocker.log()[-3000:])
    return body


def ready(knocker: NetnsKnocker) -> tuple[int, dict[str, object]]:
    status, _, raw = knocker.request("GET", "/ready")
    return status, json.loads(raw)


def grant_rule(entry: str) -> str:
    network = parse_network(entry)
    assert network is not None
    return accept_rule(network, PORT)


# ---------------------------------------------------------------------- in place


def test_zone_and_block_rules_are_in_place_and_ready(lab: Lab, knocker: NetnsKnocker) -> None:
    """The knocker zone is active with the client ranges as sources and one blocking rule
    per family on the monitored port; on 2.x it carries the configured priority."""
    assert parse_version(lab.firewalld.running_version())[:2] == parse_version(lab.version)
    assert ready(knocker) == (200, {"status": "ready"})
    active = lab.probe.active_zones()
    assert set(active["knocker"]["sources"]) == {"10.231.0.0/24", "fd42:4b4e::/64"}
    config = FirewalldConfig(enabled=True, monitored_ports=(PORT, MonitoredPort(SECOND, "tcp")))
    for rule in block_rules(config):
        assert lab.probe.query_rich_rule("knocker", rule), rule
    zone = lab.probe.permanent_zone("knocker")
    assert zone is not None
    if lab.version == "2.3":
        assert zone["ingress_priority"] == -100 and zone["egress_priority"] == -100


def test_monitored_port_is_closed_before_a_knock_and_unmonitored_port_is_open(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """Drop mode: connecting to the monitored port times out; the other port answers."""
    for source in (client4(3), client6(3)):
        family = 6 if ":" in source else 4
        assert lab.connect(MONITORED, family, timeout=1.0, source=source) == "timeout"
        assert lab.connect(UNMONITORED, family, timeout=1.0, source=source) == "connected"


def test_knock_opens_the_monitored_port_for_the_knocking_ipv4_address_only(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """After an IPv4 knock that address connects; a neighbour still times out."""
    knock(knocker, client4(2), 60)
    assert opened(lab, client4(2))
    assert lab.connect(MONITORED, 4, timeout=1.0, source=client4(3)) == "timeout"
    assert lab.connect(UNMONITORED, 4, source=client4(2)) == "connected"


def test_knock_opens_the_monitored_port_for_the_knocking_ipv6_address_only(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """After an IPv6 knock that address connects over IPv6; a neighbour still times out."""
    body = knock(knocker, client6(2), 60)
    assert body["whitelisted_entry"] == client6(2)
    assert opened(lab, client6(2))
    assert lab.connect(MONITORED, 6, timeout=1.0, source=client6(3)) == "timeout"


def test_grant_stays_open_until_its_ttl_and_closes_after_it(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """A 5 s grant (both families) works until ttl-1 s and is closed by ttl+3 s
    (firewalld's timers have whole-second resolution)."""
    ttl = 5
    sources = (client4(4), client6(4))
    started = time.monotonic()
    for source in sources:
        knock(knocker, source, ttl)
    while time.monotonic() - started < ttl - 1:
        for source in sources:
            assert opened(lab, source), f"{source} closed after {time.monotonic() - started:.1f} s"
        time.sleep(0.2)
    time.sleep(max(0.0, started + ttl + 3 - time.monotonic()))
    for source in sources:
        assert not opened(lab, source, timeout=1.0), f"{source} still open after ttl+3 s"


def test_sign_out_and_admin_revoke_close_the_port_within_1_s(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """DELETE /knock (the key's own grant of the caller) and DELETE /grants/{entry} (an
    admin key) remove the rich rules before answering: the revoked address's TCP probe
    is refused again within 1 s, while another address's grant stays open."""
    for source in (client4(5), client4(6), client6(5)):
        knock(knocker, source, 600)
        assert opened(lab, source)
    status, _, raw = knocker.request("DELETE", "/knock", {"X-Api-Key": TEST_KEY}, source=client4(5))
    assert status == 200, raw
    closed = wait_for(lambda: not opened(lab, client4(5), timeout=0.3), 1.0, interval=0.05)
    assert closed is not None, "the signed-out address still connects after 1 s"
    status, _, raw = knocker.request(
        "DELETE", "/grants/" + quote(client6(5), safe=""), {"X-Api-Key": OPS_KEY}, source=client4(6)
    )
    assert status == 200, raw
    closed = wait_for(lambda: not opened(lab, client6(5), timeout=0.3), 1.0, interval=0.05)
    assert closed is not None, "the revoked address still connects after 1 s"
    assert not lab.probe.query_rich_rule("knocker", grant_rule(client6(5)))
    assert opened(lab, client4(6))


def test_port_scoped_key_opens_only_its_port_and_sign_out_cuts_back_to_it(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """A key scoped to 2222/tcp opens 2222 and not the other monitored port (2224); an
    unscoped knock of the same address opens both; signing out of the unscoped grant
    leaves only 2222 open; an admin revoke closes 2222 too, within 1 s."""
    source, other = client4(13), client6(13)
    for address in (source, other):
        status, body = knocker.knock(PORT_KEY, body={"ttl": 600}, source=address)
        assert status == 200, (status, body, knocker.log()[-3000:])
        assert opened(lab, address)
        assert not opened(lab, address, timeout=1.0, port=SECOND)
    knock(knocker, source, 300)
    assert opened(lab, source) and opened(lab, source, port=SECOND)
    assert not opened(lab, other, timeout=1.0, port=SECOND)  # another address: unchanged
    status, _, raw = knocker.request("DELETE", "/knock", {"X-Api-Key": TEST_KEY}, source=source)
    assert status == 200, raw
    closed = wait_for(lambda: not opened(lab, source, timeout=0.3, port=SECOND), 1.0, interval=0.05)
    assert closed is not None, "the unscoped grant's extra port still connects after 1 s"
    assert opened(lab, source)
    status, _, raw = knocker.request("GET", "/grants", {"X-Api-Key": OPS_KEY}, source=other)
    scopes = {g["entry"]: g["scope"] for g in json.loads(raw)["grants"]}
    assert scopes[source] == {"hosts": None, "ports": [f"{MONITORED}/tcp"]}
    for address in (source, other):
        status, _, raw = knocker.request(
            "DELETE", "/grants/" + quote(address, safe=""), {"X-Api-Key": OPS_KEY}, source=other
        )
        assert status == 200, raw
        closed = wait_for(lambda a=address: not opened(lab, a, timeout=0.3), 1.0, interval=0.05)
        assert closed is not None, f"{address} still connects after its revoke"
        assert not opened(lab, address, timeout=0.5, port=SECOND)


# ---------------------------------------------------------------------- firewalld changes


def test_reload_over_dbus_is_followed_by_grants_working_again_within_5_s(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """reload() drops every runtime rule; Knocker's watcher puts the grants back."""
    sources = (client4(6), client6(6))
    for source in sources:
        knock(knocker, source, 120)
        assert opened(lab, source)
    lab.probe.reload()
    for source in sources:
        took = wait_for(lambda s=source: opened(lab, s, timeout=0.3), BACK_WITHIN)
        assert took is not None, f"{source} not open {BACK_WITHIN} s after reload\n" + knocker.log()
    assert ready(knocker)[0] == 200


def test_regrant_after_reload_survives_the_stale_pre_reload_timer(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """Trap 2: knock ttl 10, reload, re-knock ttl 40 - still open at +13 s and +20 s
    (the pre-reload timer must not remove the re-applied rule at +10 s)."""
    source = client4(7)
    started = time.monotonic()
    knock(knocker, source, 10)
    assert opened(lab, source)
    time.sleep(1)
    lab.probe.reload()
    assert wait_for(lambda: opened(lab, source, timeout=0.3), BACK_WITHIN) is not None
    knock(knocker, source, 40)
    for at in (13, 20):
        time.sleep(max(0.0, started + at - time.monotonic()))
        assert opened(lab, source, timeout=1.0), f"closed at +{at} s: a stale timer fired"
    assert lab.probe.query_rich_rule("knocker", grant_rule(source))


def test_restart_of_knocker_restores_grants_lost_while_it_was_down(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """Grants wiped while Knocker is stopped come back from whitelist.json at startup."""
    source = client4(5)
    knock(knocker, source, 120)
    assert opened(lab, source)
    knocker.stop()
    lab.probe.reload()  # nobody watches now: the grant is lost
    assert not opened(lab, source, timeout=1.0)
    knocker.start()
    assert opened(lab, source)
    assert ready(knocker)[0] == 200


def test_firewalld_restart_brings_grants_back_and_a_knock_meanwhile_grants_nothing(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """While firewalld is stopped /ready is 503 in every worker and a knock fails cleanly
    (503, nothing whitelisted, nothing in the firewall); once it is back, the earlier
    grant works again within 5 s and /ready is 200."""
    granted, refused = client4(8), client4(9)
    knock(knocker, granted, 120)
    assert opened(lab, granted)

    def not_running() -> bool:
        status, body = ready(knocker)
        return status == 503 and "not running" in str(body.get("error"))

    lab.firewalld.stop()
    try:
        assert wait_for(not_running, 5) is not None
        time.sleep(STATUS_CACHE + 0.1)  # each worker looks at the shared status once a second
        assert all(not_running() for _ in range(6)), "a worker still reports ready"
        status, body = knocker.knock(body={"ttl": 60}, source=refused)
        assert status == 503 and "error" in body
        assert knocker.verify(source=refused) == 401
    finally:
        lab.firewalld.start()
    took = wait_for(lambda: opened(lab, granted, timeout=0.3), BACK_WITHIN)
    assert took is not None, "grant not back after firewalld restart\n" + knocker.log()[-4000:]
    assert wait_for(lambda: ready(knocker)[0] == 200, 3) is not None
    assert not lab.probe.query_rich_rule("knocker", grant_rule(refused))
    assert not opened(lab, refused, timeout=1.0)
    assert refused not in knocker.whitelist_file()


def test_firewalld_restart_with_a_pristine_config_gets_zone_and_grants_back(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """A restart that lost the permanent zone: Knocker creates it again and re-applies."""
    source = client6(8)
    knock(knocker, source, 120)
    lab.firewalld.restart(fresh=True)
    took = wait_for(lambda: opened(lab, source, timeout=0.3), BACK_WITHIN)
    assert took is not None, "grant not back after a fresh restart\n" + knocker.log()[-4000:]
    assert lab.probe.permanent_zone("knocker") is not None
    assert lab.connect(MONITORED, 6, timeout=1.0, source=client6(9)) == "timeout"


def test_another_worker_takes_over_watching_when_the_watcher_dies(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """The watcher is elected by a lock: kill -9 its worker and a reload is still healed."""
    status_file = knocker.directory / STATUS_FILE
    watcher = json.loads(status_file.read_text())["pid"]
    assert knocker.process is not None
    master = knocker.process.pid
    assert watcher != master
    os.kill(watcher, signal.SIGKILL)  # a worker of the knocker process we started
    new_watcher = wait_for(
        lambda: json.loads(status_file.read_text())["pid"] not in (watcher, master), 10
    )
    assert new_watcher is not None, knocker.log()[-3000:]
    source = client4(10)
    knock(knocker, source, 120)
    lab.probe.reload()
    assert wait_for(lambda: opened(lab, source, timeout=0.3), BACK_WITHIN) is not None


# ---------------------------------------------------------------------- configurations


def test_zone_priority_is_refused_on_1_3_and_applied_on_2_3(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """1.3.x: `zone_priority: -100` stops Knocker with a clear message (and the shared
    Knocker runs with `null`); 2.x: the priority is in the running zone."""
    if lab.version == "1.3":
        other = NetnsKnocker(
            lab,
            lab.workdir / "knocker-priority",
            firewalld_section("1.3", zone_priority=-100),
            port=8401,
        )
        other.start(wait=False)
        assert other.wait_exit(30) != 0
        assert "zone_priority: null" in other.log()
        assert knocker.config["firewalld"]["zone_priority"] is None
        assert ready(knocker)[0] == 200
    else:
        runtime = lab.probe.call(
            "/org/fedoraproject/FirewallD1",
            "org.fedoraproject.FirewallD1.zone",
            "getZoneSettings2",
            "s",
            ("knocker",),
        )[0]
        assert runtime["ingress_priority"][1] == -100


def test_reject_mode_refuses_connections_instead_of_dropping_them(
    lab: Lab, knocker: NetnsKnocker
) -> None:
    """default_action: reject - an unknocked client is refused at once; a knock opens."""
    original = knocker.config
    knocker.stop()
    knocker.write_config(
        {**original, "firewalld": firewalld_section(lab.version, default_action="reject")}
    )
    knocker.start()
    try:
        # 3 s: an IPv6 refusal may only come with the SYN retransmission (ICMPv6 rate limit)
        for source in (client4(11), client6(11)):
            family = 6 if ":" in source else 4
            assert lab.connect(MONITORED, family, timeout=3.0, source=source) == "refused"
        knock(knocker, client4(12), 60)
        assert opened(lab, client4(12))
    finally:
        knocker.stop()
        knocker.write_config(original)
        knocker.start()


def test_the_machine_own_ruleset_is_untouched(lab: Lab, knocker: NetnsKnocker) -> None:
    """Everything happened inside the lab's namespaces."""
    assert host_ruleset_hash() == lab.host_ruleset_before


# ---------------------------------------------------------------------- harness hygiene


def test_namespaces_left_by_a_killed_run_are_emptied_and_removed() -> None:
    """A namespace with our prefix whose creator is dead goes, with what runs inside."""
    require("1.3")
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"knk-fw-{dead.pid}-99"
    subprocess.run(["ip", "netns", "add", name], check=True)
    leftover = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "300"])
    try:
        time.sleep(0.2)
        assert name in cleanup_stale_namespaces()
        assert leftover.wait(10) != 0
        assert (
            name
            not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        )
    finally:
        if leftover.poll() is None:
            leftover.kill()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
