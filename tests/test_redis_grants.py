"""The grants interface of the redis backend against a real redis-server: the scripts
(KNOCK's records, SCOPED_KNOCK, REVOKE, LOAD_GRANTS, RESYNC) through RedisStore, shared
between stores standing for instances (port scopes: each enforcing, with a firewall that
keeps the open ports as firewalld's rules would); then GET /grants, DELETE /grants/{entry},
DELETE /knock and a host-scoped key across two real `knocker serve` instances sharing one
server. The same semantics as the file backend (tests/test_grants.py)."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from knocker.cli import main
from knocker.errors import FirewallError, StorageUnavailable
from knocker.firewall import NullFirewall
from knocker.store import FileStore
from knocker.store.grant_format import Grant
from knocker.store.redisstore import RedisStore
from tests.serverproc import ADMIN_KEY, TEST_KEY, KnockerProcess
from tests.support.config import base_config, make_config
from tests.support.net import ip, key
from tests.support.polling import wait_until
from tests.support.redisgroups import NOW, Cluster, Instances, shared_config, verified_everywhere
from tests.support.redisserver import RedisServer, serving

pytestmark = pytest.mark.redis

SCOPED_KEY = "scoped-key-0123456789abcdefghijklmnopqrstuvwxyz"
PORT_KEY = "port-key-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with serving(tmp_path / "redis", unix=True) as running:
        yield running


@pytest.fixture
def instances(tmp_path: Path, server: RedisServer) -> Iterator[Instances]:
    with Instances(tmp_path, server) as group:
        yield group


@pytest.fixture
def cluster(tmp_path: Path, server: RedisServer) -> Iterator[Cluster]:
    with Cluster(tmp_path, server) as group:
        yield group


def shown(grants: list[Grant]) -> list[tuple[str, str | None, int, str, bool]]:
    return [(g.entry, g.key_name, g.expires_at, g.how, g.scoped) for g in grants]


# ------------------------------------------------------------------ the scripts
def test_knock_records_who_granted_and_every_instance_lists_it(instances: Instances) -> None:
    a, b = instances.open(), instances.open()
    a.knock(key("198.51.100.7"), 100, NOW, key_name="phone")
    b.knock(key("198.51.100.7"), 50, NOW + 1, key_name="admin", how="remote")
    a.knock(key("198.51.100.8"), 30, NOW)  # no record: restored
    expected = [
        ("198.51.100.7", "admin", int(NOW) + 51, "remote", False),
        ("198.51.100.7", "phone", int(NOW) + 100, "knock", False),
        ("198.51.100.8", None, int(NOW) + 30, "restored", False),
    ]
    assert shown(a.grants(NOW + 2)) == shown(b.grants(NOW + 2)) == expected
    assert [g.granted_at for g in b.grants(NOW + 2)] == [int(NOW) + 1, int(NOW), None]
    # a re-knock never shortens the key's own grant
    a.knock(key("198.51.100.7"), 10, NOW + 3, key_name="phone")
    assert shown(a.grants(NOW + 3))[1][2] == int(NOW) + 100
    assert shown(a.grants(NOW + 60)) == [("198.51.100.7", "phone", int(NOW) + 100, "knock", False)]


def test_revoking_one_keys_grant_cuts_the_entry_back_on_every_instance(
    instances: Instances,
) -> None:
    """REVOKE: the entry keeps the longest remaining unscoped grant; the other instance's
    replica follows the stream."""
    a, b = instances.open(), instances.open()
    a.knock(key("198.51.100.7"), 100, NOW, key_name="phone")
    a.knock(key("198.51.100.7"), 50, NOW, key_name="admin")
    wait_until(
        lambda: b.replica.expiry(key("198.51.100.7")) == int(NOW) + 100,
        5,
        what="b follows the knock",
    )
    ended = b.revoke(key("198.51.100.7"), "phone", NOW + 1)
    assert shown(ended) == [("198.51.100.7", "phone", int(NOW) + 100, "knock", False)]
    assert b.replica.expiry(key("198.51.100.7")) == int(NOW) + 50
    wait_until(
        lambda: a.replica.expiry(key("198.51.100.7")) == int(NOW) + 50,
        5,
        what="a follows the revocation",
    )
    assert shown(a.grants(NOW + 1)) == [("198.51.100.7", "admin", int(NOW) + 50, "knock", False)]
    assert a.revoke(key("198.51.100.7"), "phone", NOW + 1) == []  # nothing left of it
    assert shown(a.revoke(key("198.51.100.7"), None, NOW + 2)) == [
        ("198.51.100.7", "admin", int(NOW) + 50, "knock", False)
    ]
    wait_until(lambda: not b.allows(ip("198.51.100.7"), NOW + 2), 5, what="b refuses")
    assert a.grants(NOW + 2) == [] and a.entries() == {}
    with instances.server.client() as client:
        assert client.exists("knocker:grants:198.51.100.7") == 0


def test_a_restored_entry_is_revocable_and_outlives_a_keys_grant(instances: Instances) -> None:
    """An entry longer than its records (migrated without them) has a restored grant;
    revoking the key's grant leaves the entry for the restored part."""
    a = instances.open()
    a.load({"198.51.100.9": int(NOW) + 500}, NOW)
    a.knock(key("198.51.100.9"), 100, NOW, key_name="phone")
    assert shown(a.grants(NOW)) == [
        ("198.51.100.9", None, int(NOW) + 500, "restored", False),
        ("198.51.100.9", "phone", int(NOW) + 100, "knock", False),
    ]
    a.revoke(key("198.51.100.9"), "phone", NOW)
    assert a.entries() == {"198.51.100.9": int(NOW) + 500}
    assert shown(a.revoke(key("198.51.100.9"), None, NOW)) == [
        ("198.51.100.9", None, int(NOW) + 500, "restored", False)
    ]
    assert a.entries() == {}


def test_scoped_grant_stays_out_of_the_whitelist_and_reaches_every_replica(
    instances: Instances,
) -> None:
    """SCOPED_KNOCK: allows() never sees it; scoped_allows() on every instance does,
    for its key only; a store opened later loads it in its resync; revoke ends it."""
    a, b = instances.open(), instances.open()
    result = a.knock(key("198.51.100.20"), 100, NOW, key_name="app-phone", scoped=True)
    assert result.expires_at == int(NOW) + 100
    wait_until(
        lambda: b.scoped_allows(ip("198.51.100.20"), ("app-phone",), NOW),
        5,
        what="b holds the scoped grant",
    )
    assert not b.scoped_allows(ip("198.51.100.20"), ("phone",), NOW)
    assert not a.allows(ip("198.51.100.20"), NOW) and not b.allows(ip("198.51.100.20"), NOW)
    assert b.entries() == {"198.51.100.20": int(NOW) + 100}  # the firewall opens it
    c = instances.open()
    assert c.scoped_allows(ip("198.51.100.20"), ("app-phone",), NOW)
    assert shown(c.grants(NOW)) == [("198.51.100.20", "app-phone", int(NOW) + 100, "knock", True)]
    with instances.server.client() as client:
        assert client.zcard("knocker:whitelist") == 0
    # an unscoped grant of the same address beside it; revoking the scoped one keeps it
    b.knock(key("198.51.100.20"), 30, NOW, key_name="phone")
    assert shown(c.revoke(key("198.51.100.20"), "app-phone", NOW)) == [
        ("198.51.100.20", "app-phone", int(NOW) + 100, "knock", True)
    ]
    wait_until(
        lambda: not a.scoped_allows(ip("198.51.100.20"), ("app-phone",), NOW),
        5,
        what="a drops the scoped grant",
    )
    assert a.allows(ip("198.51.100.20"), NOW)
    assert not b.scoped_allows(ip("198.51.100.20"), ("app-phone",), NOW + 200)  # expiry


def test_scoped_grants_are_capped_like_the_whitelist(instances: Instances) -> None:
    a, b = instances.open(security={"max_whitelist_entries": 2}), instances.open()
    a.knock(key("198.51.100.31"), 300, NOW, key_name="app-phone", scoped=True)
    a.knock(key("198.51.100.32"), 100, NOW, key_name="app-phone", scoped=True)
    result = a.knock(key("198.51.100.33"), 200, NOW, key_name="app-phone", scoped=True)
    assert result.evicted == ("198.51.100.32",)
    wait_until(
        lambda: b.scoped_allows(ip("198.51.100.33"), ("app-phone",), NOW), 5, what="b follows"
    )
    assert not b.scoped_allows(ip("198.51.100.32"), ("app-phone",), NOW)
    assert [g.entry for g in a.grants(NOW)] == ["198.51.100.31", "198.51.100.33"]


def test_an_evicted_entry_takes_its_unscoped_records_along(instances: Instances) -> None:
    a = instances.open(security={"max_whitelist_entries": 1})
    a.knock(key("198.51.100.41"), 100, NOW, key_name="phone")
    a.knock(key("198.51.100.41"), 100, NOW, key_name="app-phone", scoped=True)
    assert a.knock(key("198.51.100.42"), 200, NOW, key_name="phone").evicted == ("198.51.100.41",)
    with instances.server.client() as client:
        assert list(client.hgetall("knocker:grants:198.51.100.41")) == ["app-phone"]
    assert shown(a.grants(NOW)) == [
        ("198.51.100.41", "app-phone", int(NOW) + 100, "knock", True),
        ("198.51.100.42", "phone", int(NOW) + 200, "knock", False),
    ]


# ------------------------------------------------------------------ port scopes
PORTS = ("22/tcp", "8080/tcp")
PORT = ("22/tcp",)
FIREWALLD = {
    "enabled": True,
    "monitored_ports": [{"port": 22}, {"port": 8080}],
    "monitored_ips": ["0.0.0.0/0", "::/0"],
}


class PortsFirewall(NullFirewall):
    """One host's firewall as firewalld's rules make it: (entry, port) -> open. A target
    is an entry (every monitored port) or "entry port" (docs/firewalld.md)."""

    def __init__(self) -> None:
        self.open: set[tuple[str, str]] = set()
        self.refuse: str | None = None  # a port whose grants fail, as firewalld's might
        self._lock = threading.Lock()  # the knocking thread and the applier both call

    def _ports(self, target: str) -> tuple[str, list[str]]:
        entry, _, port = target.partition(" ")
        return entry, [port] if port else list(PORTS)

    def grant(self, entry: str, ttl: int) -> None:
        target, ports = self._ports(entry)
        if self.refuse in ports:
            raise FirewallError(f"rule for {self.refuse} refused")
        with self._lock:
            self.open.update((target, port) for port in ports)

    def revoke(self, entries: Iterable[str]) -> None:
        with self._lock:
            for text in entries:
                target, ports = self._ports(text)
                self.open.difference_update((target, port) for port in ports)

    def ports_of(self, entry: str) -> set[str]:
        with self._lock:
            return {port for target, port in self.open if target == entry}


def enforcing(
    instances: Instances, start: bool = True, **security: Any
) -> tuple[RedisStore, PortsFirewall]:
    """A store standing for one enforcing host (its own directory: its own applier once
    started; unstarted, only its own knocks change its replica and firewall)."""
    directory = instances.tmp_path / f"instance{len(instances.opened)}"
    sections: dict[str, Any] = {
        "whitelist": {"storage_path": str(directory / "whitelist.json"), "backend": "redis"},
        "redis": {"url": instances.server.url, "command_timeout_ms": 500},
        "firewalld": FIREWALLD,
    }
    if security:
        sections["security"] = security
    config = make_config(directory, **sections)
    firewall = PortsFirewall()
    store = RedisStore(config, firewall, clock=instances.clock)
    instances.opened.append(store)
    if start:
        store.start()
    return store, firewall


def ports_soon(firewall: PortsFirewall, entry: str, want: set[str], what: str) -> None:
    wait_until(lambda: firewall.ports_of(entry) == want, 5, interval=0.01, what=what)


def test_port_scoped_grant_opens_only_its_ports_on_every_enforcing_host(
    instances: Instances,
) -> None:
    """A knock with a port-scoped key on A opens its port alone on A and on B; an
    unscoped grant beside it opens every port; its sign-out cuts back to the port grant;
    a revoke of the port grant on B closes everything on both."""
    (a, fw_a), (b, fw_b) = enforcing(instances), enforcing(instances)
    x = "198.51.100.60"
    a.knock(key(x), 100, NOW, key_name="ssh", scoped=True, ports=("22/tcp",))
    assert fw_a.ports_of(x) == {"22/tcp"}
    ports_soon(fw_b, x, {"22/tcp"}, "b opens 22 only")
    assert b.entries() == {f"{x} 22/tcp": int(NOW) + 100}
    # ports are a firewall matter: the grant is a scoped one, never in the whitelist
    assert not b.allows(ip(x), NOW) and b.scoped_allows(ip(x), ("ssh",), NOW)
    assert [(g.key_name, g.ports) for g in b.grants(NOW)] == [("ssh", ("22/tcp",))]
    b.knock(key(x), 50, NOW, key_name="phone")  # shorter: 8080 until +50, 22 until +100
    assert fw_b.ports_of(x) == set(PORTS)
    ports_soon(fw_a, x, set(PORTS), "a opens both ports")
    assert a.entries() == {f"{x} 22/tcp": int(NOW) + 100, f"{x} 8080/tcp": int(NOW) + 50}
    a.revoke(key(x), "phone", NOW + 1)  # sign-out of the unscoped grant
    assert fw_a.ports_of(x) == {"22/tcp"}
    ports_soon(fw_b, x, {"22/tcp"}, "b closes 8080 again")
    ended = b.revoke(key(x), "ssh", NOW + 1)
    assert [(g.key_name, g.ports) for g in ended] == [("ssh", ("22/tcp",))]
    assert fw_b.ports_of(x) == set()
    ports_soon(fw_a, x, set(), "a closes 22")
    assert a.entries() == b.entries() == {}


def test_a_longer_whole_entry_grant_covers_a_port_grant_and_expiry_cuts_back(
    instances: Instances,
) -> None:
    """The file backend's plan: a whole-entry grant that runs longer opens every port;
    a port grant that outlives it keeps only its port; expiry closes the rest."""
    (a, fw_a), (b, fw_b) = enforcing(instances), enforcing(instances)
    x, y = "198.51.100.61", "198.51.100.62"
    a.knock(key(x), 100, NOW, key_name="ssh", scoped=True, ports=("22/tcp",))
    a.knock(key(x), 300, NOW, key_name="phone")
    ports_soon(fw_b, x, set(PORTS), "b opens x's every port")
    assert b.entries()[x] == int(NOW) + 300  # one target: the whole entry
    a.knock(key(y), 60, NOW, key_name="phone")
    a.knock(key(y), 200, NOW, key_name="ssh", scoped=True, ports=("22/tcp",))
    # both ports: 8080 until +60, 22 until +200 (b's firewall opened both already for
    # the first knock: wait for its replica to hold the second)
    wait_until(lambda: f"{y} 22/tcp" in b.entries(), 5, interval=0.01, what="b follows y")
    assert b.entries()[f"{y} 8080/tcp"] == int(NOW) + 60
    ports_soon(fw_b, y, set(PORTS), "b opens y's every port")
    instances.clock.advance(120)  # y's unscoped grant expired; its port grant runs on
    for firewall in (fw_a, fw_b):
        ports_soon(firewall, y, {"22/tcp"}, "the purge cuts y back to 22")
        assert firewall.ports_of(x) == set(PORTS)
    instances.clock.advance(100)  # NOW + 220: y's port grant ended too
    for firewall in (fw_a, fw_b):
        ports_soon(firewall, y, set(), "y closed")


def test_an_evicted_port_grant_closes_its_port_on_every_host(instances: Instances) -> None:
    """The evicting knock closes the victim's port on its own host at once (A follows
    nothing here: its own replica must drop the victim), and B's applier follows."""
    a, fw_a = enforcing(instances, start=False, max_whitelist_entries=1)
    b, fw_b = enforcing(instances)
    x, y = "198.51.100.63", "198.51.100.64"
    a.knock(key(x), 100, NOW, key_name="ssh", scoped=True, ports=("22/tcp",))
    ports_soon(fw_b, x, {"22/tcp"}, "b opens x")
    assert a.knock(key(y), 200, NOW, key_name="ssh", scoped=True, ports=("8080/tcp",)).evicted == (
        x,
    )
    assert fw_a.ports_of(x) == set() and fw_a.ports_of(y) == {"8080/tcp"}
    ports_soon(fw_b, x, set(), "b closes the evicted grant")
    ports_soon(fw_b, y, {"8080/tcp"}, "b opens y's port only")
    assert [(g.entry, g.ports) for g in b.grants(NOW)] == [(y, ("8080/tcp",))]


def test_a_host_that_joins_later_opens_the_port_grants_from_its_resync(
    instances: Instances,
) -> None:
    """RESYNC carries each scoped grant's ports: a new applier opens the same plan, and
    entries() (what a firewalld reload re-applies) names the port targets; a grant whose
    record is unreadable is left out, never widened to every port."""
    a, fw_a = enforcing(instances)
    x = "198.51.100.65"
    a.knock(key(x), 100, NOW, key_name="ssh", scoped=True, ports=("22/tcp",))
    a.knock(key("198.51.100.66"), 100, NOW, key_name="app-phone", scoped=True)
    with instances.server.client() as client:
        client.zadd("knocker:scoped", {"198.51.100.67 damaged": int(NOW) + 100})
        client.hset("knocker:grants:198.51.100.67", "damaged", f"{int(NOW) + 100} 0 knock 2")
    c, fw_c = enforcing(instances)
    ports_soon(fw_c, x, {"22/tcp"}, "c opens 22 only")
    ports_soon(fw_c, "198.51.100.66", set(PORTS), "c opens the host-scoped grant's every port")
    assert fw_c.ports_of("198.51.100.67") == set()
    assert c.entries() == {
        f"{x} 22/tcp": int(NOW) + 100,
        "198.51.100.66": int(NOW) + 100,
    }
    assert c.scoped_ports == {("ssh", key(x)): ("22/tcp",)}


def test_a_failed_knock_puts_the_port_plan_back_and_stores_nothing(instances: Instances) -> None:
    """Beside a port grant (22), an unscoped knock splits the entry into both ports; when
    the server times out (SIGSTOP) or one port's rule is refused, the firewall is back to
    22 alone and the server holds nothing of that knock."""
    a, firewall = enforcing(instances, start=False)
    x = "198.51.100.69"
    a.knock(key(x), 100, NOW, key_name="ssh", scoped=True, ports=("22/tcp",))
    instances.server.signal(signal.SIGSTOP)
    try:
        with pytest.raises(StorageUnavailable):
            a.knock(key(x), 50, NOW, key_name="phone")
    finally:
        instances.server.signal(signal.SIGCONT)
    assert firewall.ports_of(x) == {"22/tcp"}
    firewall.refuse = "8080/tcp"
    with pytest.raises(FirewallError):
        a.knock(key(x), 50, NOW, key_name="phone")
    assert firewall.ports_of(x) == {"22/tcp"}
    with instances.server.client() as client:
        assert client.zcard("knocker:whitelist") == 0
        assert list(client.hgetall(f"knocker:grants:{x}")) == ["ssh"]


def test_a_grant_record_keeps_its_ports_and_older_records_read_as_before(
    instances: Instances,
) -> None:
    """The grants hash: "expiry granted_at how 1 ports" for a port-scoped grant; a
    record without ports means what it always meant; a re-knock replaces the ports."""
    a = instances.open()
    x = "198.51.100.68"
    a.knock(key(x), 100, NOW, key_name="ssh", scoped=True, ports=("22/tcp", "8080/tcp"))
    with instances.server.client() as client:
        assert client.hget(f"knocker:grants:{x}", "ssh") == (
            f"{int(NOW) + 100} {int(NOW)} knock 1 22/tcp,8080/tcp"
        )
        client.hset(f"knocker:grants:{x}", "old", f"{int(NOW) + 50} {int(NOW)} knock 1")
    assert [(g.key_name, g.scoped, g.ports) for g in a.grants(NOW)] == [
        ("old", True, ()),
        ("ssh", True, ("22/tcp", "8080/tcp")),
    ]
    a.knock(key(x), 10, NOW + 1, key_name="ssh", scoped=True, ports=("22/tcp",))
    assert [(g.expires_at, g.ports) for g in a.grants(NOW + 1) if g.key_name == "ssh"] == [
        (int(NOW) + 100, ("22/tcp",))
    ]


# ------------------------------------------------------------------ migration
def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def write_config(directory: Path, server: RedisServer, backend: str) -> Path:
    config = base_config(directory, redis={"url": server.url})
    config["api_keys"].append(
        {"name": "app-phone", "key": SCOPED_KEY, "max_ttl": 600, "hosts": ["app.example.com"]}
    )
    config["api_keys"].append({"name": "ssh", "key": PORT_KEY, "max_ttl": 600, "ports": ["22/tcp"]})
    config["firewalld"] = {"monitored_ports": [{"port": 22}, {"port": 8080}]}
    config["whitelist"]["backend"] = backend
    directory.mkdir(exist_ok=True)
    path = directory / "knocker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_migrate_copies_grant_records_both_ways(tmp_path: Path, server: RedisServer) -> None:
    """file -> redis -> file: key names, how, host and port scopes survive; a scoped
    grant never lands in the whitelist proper, not even merged (--force) into a target
    holding a port-scoped grant of its own."""
    now = time.time()
    source = FileStore(make_config(tmp_path / "a"), NullFirewall())
    try:
        source.knock(key("198.51.100.51"), 600, now, key_name="phone")
        source.knock(key("198.51.100.52"), 600, now, key_name="app-phone", scoped=True)
        source.knock(key("198.51.100.53"), 600, now, key_name="ssh", scoped=True, ports=PORT)
        listed = shown(source.grants(now))
        ports = [g.ports for g in source.grants(now)]
    finally:
        source.close()
    assert len(listed) == 3 and ports == [(), (), PORT]
    assert (
        run(
            "migrate",
            "--to",
            "redis",
            "--config",
            str(write_config(tmp_path / "a", server, "redis")),
        )[0]
        == 0
    )
    with server.client() as client:
        assert list(client.zrange("knocker:whitelist", 0, -1)) == ["198.51.100.51"]
        assert sorted(client.zrange("knocker:scoped", 0, -1)) == [
            "198.51.100.52 app-phone",
            "198.51.100.53 ssh",
        ]
        assert client.hget("knocker:grants:198.51.100.53", "ssh").endswith(" 1 22/tcp")
    earlier = FileStore(make_config(tmp_path / "b"), NullFirewall())
    try:  # the target already holds a port-scoped grant of another address
        earlier.knock(key("198.51.100.54"), 600, now, key_name="ssh", scoped=True, ports=PORT)
    finally:
        earlier.close()
    config = str(write_config(tmp_path / "b", server, "file"))
    code, _, err = run("migrate", "--to", "file", "--force", "--config", config)
    assert code == 0, err
    written = json.loads((tmp_path / "b" / "whitelist.json").read_text())
    assert list(written) == ["198.51.100.51"]
    target = FileStore(make_config(tmp_path / "b"), NullFirewall())
    try:
        grants = target.grants(now)
        assert [g for g in shown(grants) if g[0] != "198.51.100.54"] == listed
        assert [g.ports for g in grants] == [(), (), PORT, PORT]
        assert not target.allows(ip("198.51.100.52"), now)
        assert target.scoped_allows(ip("198.51.100.52"), ("app-phone",), now)
    finally:
        target.close()


# ------------------------------------------------------------------ two real instances
def request(
    process: Any,
    method: str,
    path: str,
    key_: str,
    body: dict[str, Any] | None = None,
    source: str | None = None,
) -> tuple[int, Any]:
    headers = {"X-Api-Key": key_}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    status, _, raw = process.request(method, path, headers, data, source)
    return status, json.loads(raw) if raw else {}


ADMIN_CONFIG = {
    "name": "admin",
    "key": ADMIN_KEY,
    "max_ttl": 86400,
    "allow_remote_whitelist": True,
    "admin": True,
}


def test_grants_api_and_sign_out_across_two_instances(cluster: Cluster, tmp_path: Path) -> None:
    """GET /grants on B lists A's knocks; DELETE /grants/{entry} on A and DELETE /knock
    on B end grants that the other instance's /verify then refuses."""
    cluster.start(
        workers=(1, 2), api_keys=[{"name": "phone", "key": TEST_KEY, "max_ttl": 3600}, ADMIN_CONFIG]
    )
    a, b = cluster.instances
    assert a.knock(TEST_KEY, {"ttl": 600}, source="127.0.0.71")[0] == 200
    assert a.knock(TEST_KEY, {"ttl": 600}, source="127.0.0.72")[0] == 200
    verified_everywhere(cluster, "127.0.0.71")
    status, body = request(b, "GET", "/grants", ADMIN_KEY)
    assert status == 200, body
    assert [(g["entry"], g["key_name"], g["how"]) for g in body["grants"]] == [
        ("127.0.0.71", "phone", "knock"),
        ("127.0.0.72", "phone", "knock"),
    ]
    assert request(b, "GET", "/grants", TEST_KEY)[0] == 403
    status, body = request(a, "DELETE", "/grants/127.0.0.71", ADMIN_KEY)
    assert status == 200, body
    verified_everywhere(cluster, "127.0.0.71", 401, timeout=3)
    status, body = request(b, "DELETE", "/knock", TEST_KEY, source="127.0.0.72")
    assert status == 200, body
    verified_everywhere(cluster, "127.0.0.72", 401, timeout=3)
    assert request(a, "GET", "/grants", ADMIN_KEY) == (200, {"grants": []})
    assert request(a, "DELETE", "/knock", TEST_KEY, source="127.0.0.72")[0] == 404


def test_host_scoped_grant_on_one_instance_passes_on_another_only_for_its_host(
    cluster: Cluster,
) -> None:
    keys = [
        {"name": "phone", "key": TEST_KEY, "max_ttl": 3600},
        ADMIN_CONFIG,
        {"name": "app-phone", "key": SCOPED_KEY, "max_ttl": 600, "hosts": ["app.example.com"]},
    ]
    for index, count in enumerate((1, 2)):  # behind a proxy on 127.0.0.1
        directory = cluster.tmp_path / f"knocker{index}"
        config = shared_config(directory, cluster.server, api_keys=keys)
        config["server"] = {"trusted_proxies": ["127.0.0.1"]}
        cluster.add(KnockerProcess(directory, config, workers=count))
    a, b = cluster.instances
    assert a.knock(SCOPED_KEY, {"ttl": 600}, source="127.0.0.81")[0] == 200

    def verify(process: Any, host: str) -> int:
        return int(
            process.verify(
                source="127.0.0.1",
                headers={"X-Forwarded-For": "127.0.0.81", "X-Forwarded-Host": host},
            )
        )

    wait_until(
        lambda: all(verify(b, "app.example.com") == 200 for _ in range(6)),
        3,
        interval=0.02,
        what="b honours the scoped grant",
    )
    assert verify(b, "other.example.com") == 401
    assert verify(a, "other.example.com") == 401
    status, body = request(b, "DELETE", "/grants/127.0.0.81", ADMIN_KEY)
    assert status == 200, body
    wait_until(
        lambda: all(verify(a, "app.example.com") == 401 for _ in range(6)),
        3,
        interval=0.02,
        what="a drops the scoped grant",
    )


def test_port_scoped_grant_on_one_instance_is_listed_with_its_ports_on_another(
    cluster: Cluster,
) -> None:
    """A port-only key's knock on A: B's GET /grants shows its ports, /verify passes on
    every worker for any host (ports are a firewall matter), and its sign-out on B ends
    it everywhere."""
    keys = [
        {"name": "phone", "key": TEST_KEY, "max_ttl": 3600},
        ADMIN_CONFIG,
        {"name": "ssh", "key": PORT_KEY, "max_ttl": 600, "ports": ["22/tcp"]},
    ]
    cluster.start(
        workers=(1, 2),
        api_keys=keys,
        firewalld={"monitored_ports": [{"port": 22}, {"port": 8080}]},
    )
    a, b = cluster.instances
    assert a.knock(PORT_KEY, {"ttl": 600}, source="127.0.0.91")[0] == 200
    verified_everywhere(cluster, "127.0.0.91")
    status, body = request(b, "GET", "/grants", ADMIN_KEY)
    assert status == 200, body
    assert [(g["entry"], g["key_name"], g["scope"]) for g in body["grants"]] == [
        ("127.0.0.91", "ssh", {"hosts": None, "ports": ["22/tcp"]})
    ]
    status, body = request(b, "DELETE", "/knock", PORT_KEY, source="127.0.0.91")
    assert status == 200, body
    verified_everywhere(cluster, "127.0.0.91", 401, timeout=3)
    assert request(a, "GET", "/grants", ADMIN_KEY) == (200, {"grants": []})
