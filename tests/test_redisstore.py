"""knocker.store.redisstore against a real redis-server: the same semantics as the file
backend, shared between stores (each store stands for one instance), and the failure
behaviour of docs/redis.md#failure-modes."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from knocker.errors import StorageUnavailable
from knocker.firewall import NullFirewall
from knocker.ratelimit import Outcome
from knocker.store import open_backend
from knocker.store.redisstore import RedisStore
from tests.support.clock import FakeClock
from tests.support.net import ip, key
from tests.support.polling import wait_until
from tests.support.redisgroups import NOW, Instances, redis_config
from tests.support.redisserver import ENGINES, RedisServer, make_tls_files, serving, wait_down

pytestmark = pytest.mark.redis


@pytest.fixture(params=ENGINES)
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """Every test here runs against Redis and against Valkey."""
    with serving(tmp_path / "redis", engine=request.param) as running:
        yield running


@pytest.fixture
def instances(tmp_path: Path, server: RedisServer) -> Iterator[Instances]:
    with Instances(tmp_path, server) as group:
        yield group


def allowed_soon(store: RedisStore, address: str, now: float, want: bool = True) -> bool:
    return (
        wait_until(
            lambda: store.allows(ip(address), now) == want or None,
            5,
            interval=0.01,
            what=f"{address} allowed={want}",
        )
        is True
    )


def test_the_server_is_the_engine_the_test_names(server: RedisServer) -> None:
    """The parametrisation really reaches two servers: Valkey names itself."""
    with server.client() as client:
        info = client.info("server")
    assert (info.get("server_name") == "valkey") == (server.engine == "valkey"), info
    if server.engine == "valkey":
        assert int(str(info["valkey_version"]).split(".")[0]) >= 8


def test_open_backend_picks_redis_when_configured(tmp_path: Path, server: RedisServer) -> None:
    """whitelist.backend: redis opens a RedisStore naming the URL, not the file path."""
    store = open_backend(redis_config(tmp_path, server), NullFirewall(), FakeClock(NOW))
    try:
        assert isinstance(store, RedisStore)
        assert server.url in store.location
    finally:
        store.close()


def test_knock_on_one_instance_is_allowed_on_another(instances: Instances) -> None:
    """A grant made through A reaches B's in-memory replica through the change stream."""
    a, b = instances.open(), instances.open()
    result = a.knock(key("198.51.100.7"), 60, NOW)
    assert result.expires_at == NOW + 60
    assert a.allows(ip("198.51.100.7"), NOW)
    assert allowed_soon(b, "198.51.100.7", NOW)
    assert not b.allows(ip("198.51.100.8"), NOW)
    assert b.entries() == {"198.51.100.7": NOW + 60}


def test_reknock_never_shortens_a_grant_made_elsewhere(instances: Instances) -> None:
    """B's shorter knock keeps A's longer expiry, and reports it."""
    a, b = instances.open(), instances.open()
    a.knock(key("198.51.100.7"), 600, NOW)
    assert b.knock(key("198.51.100.7"), 60, NOW + 1).expires_at == NOW + 600


def test_grants_expire_on_every_instance(instances: Instances) -> None:
    """Past its expiry an entry is refused everywhere and gone from the server."""
    a, b = instances.open(), instances.open()
    a.knock(key("198.51.100.7"), 60, NOW)
    assert allowed_soon(b, "198.51.100.7", NOW)
    assert not b.allows(ip("198.51.100.7"), NOW + 60)
    # the next write purges it on the server; a fresh instance never sees it
    a.knock(key("198.51.100.9"), 60, NOW + 61)
    with instances.server.client() as client:
        assert client.zrange("knocker:whitelist", 0, -1) == ["198.51.100.9"]


def test_capacity_holds_across_instances_evicting_the_soonest(instances: Instances) -> None:
    """max_whitelist_entries counts every instance's grants; the soonest-expiring entry
    is evicted everywhere, never the one being granted."""
    security = {"max_whitelist_entries": 2}
    a, b = instances.open(security=security), instances.open(security=security)
    a.knock(key("198.51.100.1"), 100, NOW)
    b.knock(key("198.51.100.2"), 50, NOW)
    result = a.knock(key("198.51.100.3"), 10, NOW)
    assert result.evicted == ("198.51.100.2",)
    assert allowed_soon(b, "198.51.100.2", NOW, want=False)
    assert allowed_soon(b, "198.51.100.3", NOW)
    assert b.entries() == {"198.51.100.1": NOW + 100, "198.51.100.3": NOW + 10}


def test_rate_limit_budget_is_shared_and_exact(instances: Instances) -> None:
    """Three successes in the window, counted on any instance, block the fourth
    everywhere; the window sliding past the first frees one knock."""
    security = {
        "knock_rate_limit": {"successful_requests": 3, "failed_requests": 2, "window_seconds": 60}
    }
    a, b, c = (instances.open(security=security) for _ in range(3))
    client = bytes(16)
    for store, t in ((a, 0), (b, 1), (c, 2)):
        assert store.rate_reserve(client, NOW + t)
        store.rate_settle(client, Outcome.SUCCESS, NOW + t)
    assert not a.rate_reserve(client, NOW + 3) and not b.rate_reserve(client, NOW + 3)
    assert c.rate_reserve(client, NOW + 60.5)  # the first success left the window
    assert a.rate_reserve(b"\x01" * 16, NOW + 3)  # another client


def test_reservations_hold_places_so_concurrent_knocks_never_overrun(instances: Instances) -> None:
    """Three knocks in flight on three instances fill a budget of three: a fourth is
    refused before any of them settles; an uncounted outcome gives the place back."""
    security = {
        "knock_rate_limit": {"successful_requests": 3, "failed_requests": 5, "window_seconds": 60}
    }
    a, b, c = (instances.open(security=security) for _ in range(3))
    client = bytes(16)
    assert all(store.rate_reserve(client, NOW + t / 10) for t, store in enumerate((a, b, c)))
    assert not a.rate_reserve(client, NOW + 1)
    b.rate_settle(client, Outcome.UNCOUNTED, NOW + 0.1)
    assert a.rate_reserve(client, NOW + 1)


def test_a_knock_settles_its_own_reservation_exactly_once(instances: Instances) -> None:
    """reserve -> knock -> settle(SUCCESS): the KNOCK script counts the success and frees
    the failure place in the same write; the settle after it counts nothing twice."""
    security = {
        "knock_rate_limit": {"successful_requests": 2, "failed_requests": 1, "window_seconds": 60}
    }
    a = instances.open(security=security)
    client = bytes(16)
    for t in (0, 1):
        assert a.rate_reserve(client, NOW + t)
        a.knock(key("198.51.100.7"), 60, NOW + t)
        a.rate_settle(client, Outcome.SUCCESS, NOW + t)
    with instances.server.client() as redis_client:
        assert redis_client.zcard(f"knocker:rate:s:{client.hex()}") == 2
        assert redis_client.zcard(f"knocker:rate:f:{client.hex()}") == 0
    assert not a.rate_reserve(client, NOW + 2)


def test_failed_knocks_have_their_own_budget(instances: Instances) -> None:
    """Two failures on two instances use up the failure budget (2)."""
    security = {
        "knock_rate_limit": {"successful_requests": 3, "failed_requests": 2, "window_seconds": 60}
    }
    a, b = instances.open(security=security), instances.open(security=security)
    assert a.rate_reserve(bytes(16), NOW)
    a.rate_settle(bytes(16), Outcome.FAILURE, NOW)
    assert b.rate_reserve(bytes(16), NOW + 0.5)
    b.rate_settle(bytes(16), Outcome.FAILURE, NOW + 0.5)
    assert not a.rate_reserve(bytes(16), NOW + 1)


def test_new_instance_starts_from_the_whole_shared_whitelist(instances: Instances) -> None:
    """An instance opened later loads every live grant (the resync)."""
    a = instances.open()
    for last in range(1, 6):
        a.knock(key(f"198.51.100.{last}"), 60, NOW)
    late = instances.open(start=False)
    assert len(late) == 5 and late.allows(ip("198.51.100.5"), NOW)
    assert late.ready() is None


def test_trimmed_stream_gap_triggers_a_full_resync(instances: Instances) -> None:
    """A follower that finds a gap in the change sequence reloads everything."""
    a, b = instances.open(), instances.open()
    a.knock(key("198.51.100.1"), 60, NOW)
    assert allowed_soon(b, "198.51.100.1", NOW)
    with instances.server.client() as client:
        client.incrby("knocker:seq", 5)  # as if five changes had been trimmed away
    a.knock(key("198.51.100.2"), 60, NOW)
    assert allowed_soon(b, "198.51.100.2", NOW)


def test_outage_refuses_knocks_serves_replica_then_fails_closed_and_recovers(
    instances: Instances, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM of the server: knocks 503 with nothing stored, /ready names the problem,
    /verify answers from the replica until max_staleness_seconds, then refuses; after a
    restart on the same directory every instance resynchronises by itself, and each
    transition is logged once."""
    caplog.set_level(logging.INFO, logger="knocker.store")
    a = instances.open(max_staleness_seconds=2)
    b = instances.open(max_staleness_seconds=2)
    a.knock(key("198.51.100.7"), 600, NOW)
    assert allowed_soon(b, "198.51.100.7", NOW)
    instances.server.signal(signal.SIGTERM)
    wait_down(instances.server)
    with pytest.raises(StorageUnavailable):
        b.knock(key("198.51.100.8"), 60, NOW)
    assert not b.allows(ip("198.51.100.8"), NOW)
    wait_until(b.ready, 5, interval=0.05, what="/ready to report the outage")
    assert b.allows(ip("198.51.100.7"), NOW)  # inside max_staleness_seconds
    assert allowed_soon(b, "198.51.100.7", NOW, want=False)  # past it: fail closed
    instances.server.start()
    assert allowed_soon(b, "198.51.100.7", NOW)
    wait_until(
        lambda: a.ready() is None and b.ready() is None, 5, interval=0.05, what="/ready on both"
    )
    assert not b.allows(ip("198.51.100.8"), NOW)  # the refused knock was not stored
    a.knock(key("198.51.100.9"), 60, NOW)
    assert allowed_soon(b, "198.51.100.9", NOW)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 2  # once per instance
    assert sum("max_staleness_seconds" in m for m in messages) == 2
    assert sum("reachable again" in m for m in messages) == 2


def test_paused_server_knock_times_out_and_is_not_stored_on_resume(instances: Instances) -> None:
    """SIGSTOP (a partition): the knock fails 503 after command_timeout_ms; when the server
    resumes, the queued script sees its deadline passed and stores nothing."""
    a = instances.open()
    instances.server.signal(signal.SIGSTOP)
    try:
        with pytest.raises(StorageUnavailable):
            a.knock(key("198.51.100.8"), 60, NOW)
        wait_until(a.ready, 5, interval=0.05, what="/ready to report the partition")
    finally:
        instances.server.signal(signal.SIGCONT)
    wait_until(lambda: a.ready() is None, 10, interval=0.05, what="resync after SIGCONT")
    with instances.server.client() as client:
        assert client.zcard("knocker:whitelist") == 0
    assert not a.allows(ip("198.51.100.8"), NOW)


def test_kill_9_after_acknowledged_knocks_loses_nothing(instances: Instances) -> None:
    """appendfsync always: every knock answered before kill -9 is there after a restart
    on the same directory."""
    a = instances.open()
    granted = {f"198.51.100.{last}" for last in range(1, 51)}
    for entry in granted:
        a.knock(key(entry), 600, NOW)
    instances.server.kill()
    instances.server.start()
    with instances.server.client() as client:
        assert set(client.zrange("knocker:whitelist", 0, -1)) == granted
    late = instances.open(start=False)
    assert len(late) == 50


def test_password_from_environment_reaches_the_server(
    tmp_path: Path, server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requirepass: redis.password_env authenticates; a wrong one leaves it not ready."""
    with server.client() as client:
        client.config_set("requirepass", "s3cret-for-test")
    monkeypatch.setenv("KNOCKER_TEST_REDIS_PW", "s3cret-for-test")
    good = RedisStore(
        redis_config(tmp_path / "a", server, password_env="KNOCKER_TEST_REDIS_PW"),
        NullFirewall(),
        clock=FakeClock(NOW),
    )
    monkeypatch.setenv("KNOCKER_TEST_REDIS_PW", "wrong")
    bad = RedisStore(
        redis_config(tmp_path / "b", server, password_env="KNOCKER_TEST_REDIS_PW"),
        NullFirewall(),
        clock=FakeClock(NOW),
    )
    try:
        assert good.ready() is None
        assert bad.ready() is not None and "s3cret" not in bad.ready()
        assert "wrong" not in (bad.ready() or "")
    finally:
        good.close()
        bad.close()


def test_password_from_a_file_reaches_the_server(tmp_path: Path, server: RedisServer) -> None:
    """redis.password_file: its first line is the password (the newline is not part
    of it)."""
    with server.client() as client:
        client.config_set("requirepass", "file-secret-for-test")
    secret = tmp_path / "redis-password"
    secret.write_text("file-secret-for-test\n")
    store = RedisStore(
        redis_config(tmp_path / "a", server, password_file=str(secret)),
        NullFirewall(),
        clock=FakeClock(NOW),
    )
    try:
        assert store.ready() is None
        store.knock(key("198.51.100.7"), 60, NOW)
    finally:
        store.close()


def test_started_before_the_server_it_fails_closed_then_catches_up(instances: Instances) -> None:
    """Knocker may start before Redis (a compose file): not ready, /verify refuses
    everyone, knocks 503; once the server is up the follower synchronises on its own."""
    with instances.server.client() as client:
        client.zadd("knocker:whitelist", {"198.51.100.7": NOW + 600})
    instances.server.signal(signal.SIGTERM)
    wait_down(instances.server)
    early = instances.open()
    assert early.ready() is not None
    assert not early.allows(ip("198.51.100.7"), NOW)
    with pytest.raises(StorageUnavailable):
        early.knock(key("198.51.100.8"), 60, NOW)
    instances.server.start()
    assert allowed_soon(early, "198.51.100.7", NOW)
    assert early.ready() is None


def test_tls_with_a_private_ca_verifies_the_server(tmp_path: Path) -> None:
    """rediss:// with redis.tls_ca_file: knocks go over TLS to a server whose certificate
    that CA signed; without the CA (system CAs only) the server is not trusted."""
    tls = make_tls_files(tmp_path / "tls")
    server = RedisServer(tmp_path / "tls-redis", tls=tls).start()
    try:
        trusting = RedisStore(
            redis_config(tmp_path / "a", server, tls_ca_file=str(tls / "ca.crt")),
            NullFirewall(),
            clock=FakeClock(NOW),
        )
        doubting = RedisStore(
            redis_config(tmp_path / "b", server), NullFirewall(), clock=FakeClock(NOW)
        )
        try:
            assert trusting.ready() is None
            trusting.knock(key("198.51.100.7"), 60, NOW)
            assert "certificate" in (doubting.ready() or "")
        finally:
            trusting.close()
            doubting.close()
    finally:
        server.stop()


def test_concurrent_knocks_on_three_instances_respect_capacity_and_converge(
    instances: Instances,
) -> None:
    """240 knocks from 12 threads on 3 instances, capacity 10: the server holds exactly
    10 entries, and every replica ends up with the same 10."""
    security = {"max_whitelist_entries": 10}
    stores = [instances.open(security=security) for _ in range(3)]

    def knocker(index: int) -> None:
        store = stores[index % 3]
        for n in range(20):
            store.knock(key(f"10.{index}.{n}.1"), 100 + index * 20 + n, NOW)

    threads = [threading.Thread(target=knocker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    with instances.server.client() as client:
        held = {e: int(s) for e, s in client.zrange("knocker:whitelist", 0, -1, withscores=True)}
    assert len(held) == 10
    for store in stores:
        wait_until(lambda s=store: s.entries() == held, 5, interval=0.02, what="convergence")


def test_concurrent_reservations_across_instances_never_overrun_a_budget(
    instances: Instances,
) -> None:
    """12 threads on 3 instances race for a budget of 5: exactly 5 get a place."""
    security = {
        "knock_rate_limit": {"successful_requests": 5, "failed_requests": 50, "window_seconds": 60}
    }
    stores = [instances.open(security=security) for _ in range(3)]
    granted: list[bool] = []
    lock = threading.Lock()

    def racer(index: int) -> None:
        for n in range(4):
            result = stores[index % 3].rate_reserve(bytes(16), NOW + index / 100 + n / 1000)
            with lock:
                granted.append(result)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(granted) == 48
    assert granted.count(True) == 5
