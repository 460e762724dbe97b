"""The grants interface of the redis backend against a real redis-server: the scripts
(KNOCK's records, SCOPED_KNOCK, REVOKE, LOAD_GRANTS) through RedisStore, shared between
stores standing for instances; then GET /grants, DELETE /grants/{entry}, DELETE /knock
and a host-scoped key across two real `knocker serve` instances sharing one server.
The same semantics as the file backend (tests/test_grants.py)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from knocker.cli import main
from knocker.firewall import NullFirewall
from knocker.store import FileStore
from knocker.store.grant_format import Grant
from tests.serverproc import ADMIN_KEY, TEST_KEY, KnockerProcess
from tests.support.config import base_config, make_config
from tests.support.net import ip, key
from tests.support.polling import wait_until
from tests.support.redisserver import RedisServer
from tests.test_redis_cluster import Cluster, shared_config, verified_everywhere
from tests.test_redisstore import NOW, Instances

pytestmark = pytest.mark.redis

SCOPED_KEY = "scoped-key-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    redis_server = RedisServer(tmp_path / "redis", unix=True).start()
    try:
        yield redis_server
    finally:
        redis_server.stop()


@pytest.fixture
def instances(tmp_path: Path, server: RedisServer) -> Iterator[Instances]:
    group = Instances(tmp_path, server)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
def cluster(tmp_path: Path, server: RedisServer) -> Iterator[Cluster]:
    group = Cluster(tmp_path, server)
    try:
        yield group
    finally:
        group.stop()


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
    config["whitelist"]["backend"] = backend
    directory.mkdir(exist_ok=True)
    path = directory / "knocker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_migrate_copies_grant_records_both_ways(tmp_path: Path, server: RedisServer) -> None:
    """file -> redis -> file: key names, how and host scopes survive; a scoped grant
    never lands in the whitelist proper."""
    now = time.time()
    source = FileStore(make_config(tmp_path / "a"), NullFirewall())
    try:
        source.knock(key("198.51.100.51"), 600, now, key_name="phone")
        source.knock(key("198.51.100.52"), 600, now, key_name="app-phone", scoped=True)
        listed = shown(source.grants(now))
    finally:
        source.close()
    assert len(listed) == 2
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
        assert list(client.zrange("knocker:scoped", 0, -1)) == ["198.51.100.52 app-phone"]
    code, _, err = run(
        "migrate", "--to", "file", "--config", str(write_config(tmp_path / "b", server, "file"))
    )
    assert code == 0, err
    target = FileStore(make_config(tmp_path / "b"), NullFirewall())
    try:
        assert shown(target.grants(now)) == listed
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
        cluster.instances.append(KnockerProcess(directory, config, workers=count))
        cluster.instances[-1].start()
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
