"""Two enforcing hosts following one Redis: each a firewalld lab of its own (tests/fwlab:
network namespaces, a private bus, a real firewalld, real TCP probes) running `knocker
serve` with the redis backend. Redis listens on a unix socket in the test's directory,
which both namespaces share (a socket file is not a network address).

A knock on host A opens the monitored port on host B within 1 s; an eviction made on B
closes it on both; the lab's port-scoped key (2222 of the monitored 2222 and 2224) opens
its port alone on both hosts, also after B's firewalld reloads. Needs root; locally
skipped without the prerequisites, a failure under CI=true.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.fwlab import Lab, cleanup_stale_namespaces
from tests.fwlab.lab import client4, client6
from tests.fwlab.service import OPS_KEY, PORT_KEY, NetnsKnocker, firewalld_section
from tests.support.config import TEST_KEY
from tests.support.redisserver import RedisServer
from tests.test_firewalld_integration import BACK_WITHIN, opened, require

pytestmark = [pytest.mark.firewalld, pytest.mark.redis]

OPENS_WITHIN = 1.0  # seconds: the bound for "a knock opens every enforcing host"


def redis_knocker(lab: Lab, directory: Path, server: RedisServer) -> NetnsKnocker:
    knocker = NetnsKnocker(lab, directory, firewalld_section(lab.firewalld.version))
    config = knocker.config
    config["whitelist"]["backend"] = "redis"
    config["redis"] = {"url": server.url}
    assert any(key["key"] == PORT_KEY for key in config["api_keys"])  # kept: scoped to 2222
    config["security"] = {"max_whitelist_entries": 3}
    knocker.write_config(config)
    return knocker


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetnsKnocker, ...]]:
    require("1.3")
    cleanup_stale_namespaces()
    workdir = tmp_path_factory.mktemp("redis-fw")
    server = RedisServer(workdir / "redis", unix=True).start()
    labs: list[Lab] = []
    knockers: list[NetnsKnocker] = []
    try:
        for name in ("a", "b"):
            labs.append(Lab("1.3", workdir / f"lab-{name}").start())
            knockers.append(redis_knocker(labs[-1], workdir / f"knocker-{name}", server))
            knockers[-1].start()
        yield tuple(knockers)
    finally:
        for knocker in knockers:
            knocker.stop()
        for lab in labs:
            lab.close()
        server.stop()


def opens_within(knocker: NetnsKnocker, source: str, timeout: float) -> float | None:
    """Seconds until `source` reaches the monitored port of `knocker`'s host."""
    started = time.monotonic()
    while time.monotonic() - started <= timeout:
        if opened(knocker.lab, source, timeout=0.2):
            return time.monotonic() - started
        time.sleep(0.02)
    return None


def closes_within(
    knocker: NetnsKnocker, source: str, timeout: float, port: int = Lab.MONITORED
) -> bool:
    """Whether `source` stops reaching `port` on `knocker`'s host within `timeout`."""
    deadline = time.monotonic() + timeout
    while opened(knocker.lab, source, timeout=0.2, port=port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_knock_on_host_a_opens_the_port_on_host_b_within_1_s(
    hosts: tuple[NetnsKnocker, ...],
) -> None:
    """IPv4 and IPv6: the knock answered by A opens B's firewalld for that address."""
    a, b = hosts
    for source in (client4(5), client6(5)):
        assert not opened(b.lab, source)
        status, body = a.knock(body={"ttl": 120}, source=source)
        assert status == 200, (body, a.log()[-2000:])
        assert opened(a.lab, source)
        took = opens_within(b, source, OPENS_WITHIN + 2)
        assert took is not None and took <= OPENS_WITHIN, (took, b.log()[-3000:])
        assert not opened(b.lab, client4(6) if ":" not in source else client6(6))


def test_eviction_on_host_b_closes_the_port_on_both_hosts(hosts: tuple[NetnsKnocker, ...]) -> None:
    """max_whitelist_entries 3 (two entries from the test above): two knocks on B evict
    the soonest-expiring entry, which closes on A as well as on B."""
    a, b = hosts
    assert b.knock(body={"ttl": 60}, source=client4(7))[0] == 200
    assert b.knock(body={"ttl": 600}, source=client4(8))[0] == 200  # evicts client4(7)
    for knocker in (a, b):
        assert opens_within(knocker, client4(8), 3) is not None
        assert closes_within(knocker, client4(7), 3), f"{client4(7)} still open on {knocker.lab}"


def test_revocation_on_host_a_closes_the_port_on_both_hosts(
    hosts: tuple[NetnsKnocker, ...],
) -> None:
    """DELETE /grants/{entry} answered by A (REVOKE's removals in the change stream):
    B's applier closes its firewall too."""
    a, b = hosts
    assert b.knock(body={"ttl": 600}, source=client4(9))[0] == 200
    assert opens_within(a, client4(9), 3) is not None
    status, _, raw = a.request(
        "DELETE", f"/grants/{client4(9)}", {"X-Api-Key": OPS_KEY}, source=client4(10)
    )
    assert status == 200, raw
    for knocker in (a, b):
        assert closes_within(knocker, client4(9), 3), f"{client4(9)} still open on {knocker.lab}"


def test_reload_on_host_b_brings_back_a_grant_made_through_host_a(
    hosts: tuple[NetnsKnocker, ...],
) -> None:
    """firewalld on B reloads (every runtime rule dropped): B's watcher re-applies the
    shared whitelist, including the grant A answered, within BACK_WITHIN seconds."""
    a, b = hosts
    source = client4(13)
    assert a.knock(body={"ttl": 120}, source=source)[0] == 200
    assert opens_within(b, source, 3) is not None
    b.lab.probe.reload()
    took = opens_within(b, source, BACK_WITHIN)
    assert took is not None, f"{source} not open on B after its reload\n" + b.log()[-3000:]
    assert opened(a.lab, source)  # A's firewall was not touched


def test_port_scoped_knock_on_host_a_opens_only_its_port_on_host_b(
    hosts: tuple[NetnsKnocker, ...],
) -> None:
    """The port-only key (2222) knocked on A: 2222 opens on B, 2224 on neither host; an
    unscoped knock of the same address opens both, its sign-out on B closes 2224 on both
    again; B's firewalld reload puts 2222 alone back; a revoke on A closes 2222 on both."""
    a, b = hosts
    sources = (client4(11), client6(11))
    for source in sources:
        status, body = a.knock(PORT_KEY, body={"ttl": 600}, source=source)
        assert status == 200, (body, a.log()[-2000:])
        assert opened(a.lab, source)
        assert opens_within(b, source, 3) is not None, b.log()[-3000:]
        for name, knocker in (("a", a), ("b", b)):
            assert not opened(knocker.lab, source, timeout=1.0, port=Lab.SECOND), name
    source = sources[0]
    assert a.knock(body={"ttl": 300}, source=source)[0] == 200  # unscoped, shorter
    assert opened(a.lab, source, port=Lab.SECOND)
    deadline = time.monotonic() + 3
    while not opened(b.lab, source, timeout=0.2, port=Lab.SECOND):
        assert time.monotonic() < deadline, "the unscoped grant does not open 2224 on b"
        time.sleep(0.05)
    status, _, raw = b.request("DELETE", "/knock", {"X-Api-Key": TEST_KEY}, source=source)
    assert status == 200, raw
    for name, knocker in (("a", a), ("b", b)):
        assert closes_within(knocker, source, 3, Lab.SECOND), f"2224 still open on {name}"
        # 2222's rule is re-granted (remove, add) as the plan is applied: wait for it
        assert opens_within(knocker, source, 3) is not None, f"2222 closed on {name}"
    b.lab.probe.reload()  # drops every runtime rule; B's watcher re-applies entries()
    assert opens_within(b, source, BACK_WITHIN) is not None, b.log()[-3000:]
    assert not opened(b.lab, source, timeout=1.0, port=Lab.SECOND)
    for address in sources:
        path = "/grants/" + quote(address, safe="")
        status, _, raw = a.request("DELETE", path, {"X-Api-Key": OPS_KEY}, source=client4(12))
        assert status == 200, raw
        for name, knocker in (("a", a), ("b", b)):
            assert closes_within(knocker, address, 3, Lab.MONITORED), f"{address} open on {name}"
