"""Several real `knocker serve` instances (1 and 3 workers) sharing one real redis-server:
the README's "Several hosts" promises, end to end over HTTP on loopback."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serverproc import TEST_KEY, KnockerProcess
from tests.support.polling import wait_until
from tests.support.redisgroups import Cluster, shared_config, verified_everywhere
from tests.support.redisserver import ENGINES, RedisServer, serving, wait_down

pytestmark = [pytest.mark.redis, pytest.mark.server]


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """redis-server, or the engine a test names with parametrize("server", ..., indirect)."""
    engine = getattr(request, "param", "redis")
    with serving(tmp_path / "redis", unix=True, engine=engine) as running:
        yield running


@pytest.fixture
def cluster(tmp_path: Path, server: RedisServer) -> Iterator[Cluster]:
    with Cluster(tmp_path, server) as group:
        yield group


@pytest.mark.parametrize("server", ENGINES, indirect=True)
def test_knock_on_one_instance_opens_verify_on_all_of_them(cluster: Cluster) -> None:
    """A knock answered by instance 0 is honoured by instances 1 (3 workers) and 2."""
    cluster.start()
    a, b, c = cluster.instances
    assert b.verify(source="127.0.0.61") == 401
    status, body = a.knock(TEST_KEY, {"ttl": 60}, source="127.0.0.61")
    assert status == 200, body
    verified_everywhere(cluster, "127.0.0.61")
    assert c.verify(source="127.0.0.62") == 401
    assert all(process.request("GET", "/ready")[0] == 200 for process in cluster.instances)


def test_grant_expires_on_every_instance(cluster: Cluster) -> None:
    """A 1-second grant is refused everywhere once it has expired."""
    cluster.start()
    assert cluster.instances[1].knock(TEST_KEY, {"ttl": 1}, source="127.0.0.63")[0] == 200
    verified_everywhere(cluster, "127.0.0.63")
    verified_everywhere(cluster, "127.0.0.63", 401, timeout=4)


def test_capacity_across_instances_evicts_the_soonest_everywhere(cluster: Cluster) -> None:
    """max_whitelist_entries 2, three knocks on three instances: the soonest-expiring
    entry is refused on every instance, the others are allowed."""
    cluster.start(security={"max_whitelist_entries": 2})
    a, b, c = cluster.instances
    assert a.knock(TEST_KEY, {"ttl": 3000}, source="127.0.0.64")[0] == 200
    assert b.knock(TEST_KEY, {"ttl": 100}, source="127.0.0.65")[0] == 200
    assert c.knock(TEST_KEY, {"ttl": 2000}, source="127.0.0.66")[0] == 200
    verified_everywhere(cluster, "127.0.0.65", 401)
    verified_everywhere(cluster, "127.0.0.64")
    verified_everywhere(cluster, "127.0.0.66")


def test_rate_limit_is_shared_by_all_instances(cluster: Cluster) -> None:
    """A budget of 2 successes per minute: one knock on each of two instances uses it up,
    the third instance answers 429."""
    cluster.start(
        security={
            "knock_rate_limit": {
                "successful_requests": 2,
                "failed_requests": 10,
                "window_seconds": 60,
            }
        }
    )
    a, b, c = cluster.instances
    assert a.knock(TEST_KEY, source="127.0.0.67")[0] == 200
    assert b.knock(TEST_KEY, source="127.0.0.67")[0] == 200
    assert c.knock(TEST_KEY, source="127.0.0.67")[0] == 429
    assert c.knock(TEST_KEY, source="127.0.0.68")[0] == 200  # another client


@pytest.mark.parametrize("server", ENGINES, indirect=True)
def test_kill_9_of_redis_after_acknowledged_knocks_loses_nothing(cluster: Cluster) -> None:
    """appendfsync always: kill -9 of redis-server right after twenty 200s, restart on
    the same directory: every instance allows all twenty again, without a restart."""
    cluster.start(workers=(1, 3))
    a, b = cluster.instances
    sources = [f"127.0.1.{last}" for last in range(1, 21)]
    for source in sources:
        assert a.knock(TEST_KEY, {"ttl": 600}, source=source)[0] == 200
    cluster.server.kill()
    cluster.server.start()
    with cluster.server.client() as client:
        assert set(client.zrange("knocker:whitelist", 0, -1)) == set(sources)
    wait_until(
        lambda: b.request("GET", "/ready")[0] == 200,
        10,
        interval=0.1,
        what="instance 1 ready again",
    )
    for source in sources:
        verified_everywhere(cluster, source)


def test_partition_then_outage_step_by_step(cluster: Cluster) -> None:
    """SIGSTOP (partition): knocks 503 with nothing granted, /ready 503, /verify still
    answers from the replica. SIGCONT: ready again, nothing of the refused knock stored.
    SIGTERM (outage) past max_staleness_seconds: /verify fails closed (401). Restart:
    every instance resynchronises on its own and answers from the shared whitelist."""
    cluster.start(workers=(1, 3), redis={"max_staleness_seconds": 6})
    a, b = cluster.instances
    assert a.knock(TEST_KEY, {"ttl": 600}, source="127.0.0.70")[0] == 200
    verified_everywhere(cluster, "127.0.0.70")

    cluster.server.signal(signal.SIGSTOP)
    try:
        status, body = b.knock(TEST_KEY, {"ttl": 600}, source="127.0.0.71")
        assert status == 503 and "nothing was granted" in body["error"]
        wait_until(
            lambda: b.request("GET", "/ready")[0] == 503,
            10,
            interval=0.1,
            what="/ready 503 during the partition",
        )
        answers = [b.verify(source="127.0.0.70") for _ in range(10)]
        assert answers == [200] * 10, answers  # the replica, inside the staleness
        assert b.verify(source="127.0.0.71") == 401
    finally:
        cluster.server.signal(signal.SIGCONT)
    wait_until(
        lambda: all(p.request("GET", "/ready")[0] == 200 for p in cluster.instances),
        10,
        interval=0.1,
        what="/ready 200 after SIGCONT",
    )
    with cluster.server.client() as client:
        assert client.zrange("knocker:whitelist", 0, -1) == ["127.0.0.70"]
    verified_everywhere(cluster, "127.0.0.71", 401)

    cluster.server.signal(signal.SIGTERM)
    wait_down(cluster.server)
    assert a.knock(TEST_KEY, {"ttl": 600}, source="127.0.0.72")[0] == 503
    assert a.request("GET", "/ready")[0] == 503
    verified_everywhere(cluster, "127.0.0.70", 401, timeout=15)  # stale: fail closed
    cluster.server.start()
    verified_everywhere(cluster, "127.0.0.70", 200, timeout=15)
    assert b.knock(TEST_KEY, {"ttl": 600}, source="127.0.0.72")[0] == 200
    verified_everywhere(cluster, "127.0.0.72")
    for process in cluster.instances:
        log = process.log()
        # each worker logs each transition once: 1 + 3 workers, per transition
        assert log.count("unreachable:") <= 2 * 4, log
        assert "reachable again" in log


def test_acl_user_and_password_authenticate_and_never_reach_the_log(
    cluster: Cluster, tmp_path: Path
) -> None:
    """An ACL user whose password comes from redis.password_file: a serving instance
    knocks through it; another instance with the wrong password (redis.password_env)
    is not ready, says why, and fails closed. Neither password appears in any log or
    /ready answer."""
    good, wrong = "acl-password-for-the-test-0451", "wrong-password-for-the-test-9315"
    with cluster.server.client() as client:
        client.execute_command(
            "ACL", "SETUSER", "knocker", "on", f">{good}", "~knocker:*", "&*", "+@all"
        )
        client.execute_command("ACL", "SETUSER", "default", "off")
    secret = tmp_path / "redis-password"
    secret.write_text(good + "\n")
    secret.chmod(0o600)
    cluster.start(workers=(2,), redis={"username": "knocker", "password_file": str(secret)})
    directory = tmp_path / "knocker-wrong"
    refused = KnockerProcess(
        directory,
        shared_config(
            directory,
            cluster.server,
            redis={"username": "knocker", "password_env": "KNOCKER_TEST_REDIS_PASSWORD"},
        ),
        env={"KNOCKER_TEST_REDIS_PASSWORD": wrong},
    )
    cluster.instances.append(refused)
    refused.start()
    (serving,) = cluster.instances[:1]
    assert serving.knock(TEST_KEY, {"ttl": 60}, source="127.0.0.90")[0] == 200
    status, _, body = refused.request("GET", "/ready")
    assert status == 503 and b"redis" in body, body
    assert refused.verify(source="127.0.0.90") == 401  # never synchronised: fail closed
    assert refused.knock(TEST_KEY, {"ttl": 60}, source="127.0.0.91")[0] == 503
    for process in cluster.instances:
        answer = str(process.request("GET", "/ready"))
        log = process.log()
        assert good not in log and wrong not in log and good not in answer and wrong not in answer
    assert "WRONGPASS" in refused.log() or "invalid username-password" in refused.log()
