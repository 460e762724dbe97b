"""`knocker migrate --to redis|file` against a real redis-server (docs/redis.md#migrating)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from knocker.cli import main
from knocker.firewall import NullFirewall
from knocker.store import FileStore
from tests.support.config import base_config, make_config
from tests.support.net import key
from tests.support.redisserver import RedisServer, serving

pytestmark = pytest.mark.redis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with serving(tmp_path / "redis") as running:
        yield running


def write_config(directory: Path, server: RedisServer, backend: str) -> Path:
    config = base_config(directory, redis={"url": server.url})
    config["whitelist"]["backend"] = backend
    path = directory / "knocker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def file_whitelist(directory: Path, entries: list[str]) -> dict[str, int]:
    """Knock `entries` into the file backend for ten minutes; what it then holds."""
    store = FileStore(make_config(directory), NullFirewall())
    try:
        for entry in entries:
            store.knock(key(entry), 600, time.time())
        return store.entries()
    finally:
        store.close()


def test_migrate_to_redis_copies_the_live_file_whitelist_and_refuses_twice(
    tmp_path: Path, server: RedisServer
) -> None:
    """The file's entries land in Redis with their expiries; a second run refuses the
    non-empty target, --force merges."""
    held = file_whitelist(tmp_path, ["198.51.100.1", "198.51.100.0/24"])
    path = write_config(tmp_path, server, "redis")
    code, out, err = run("migrate", "--to", "redis", "--config", str(path))
    assert code == 0, err
    assert "copied 2 live entries" in out
    with server.client() as client:
        stored = dict(client.zrange("knocker:whitelist", 0, -1, withscores=True))
    assert {entry: int(score) for entry, score in stored.items()} == held
    assert len(held) == 2
    code, _, err = run("migrate", "--to", "redis", "--config", str(path))
    assert code == 1 and "--force" in err
    assert run("migrate", "--to", "redis", "--force", "--config", str(path))[0] == 0


def test_migrate_to_file_writes_what_the_file_backend_then_loads(
    tmp_path: Path, server: RedisServer
) -> None:
    """Redis -> whitelist.json: a FileStore opened afterwards allows the migrated
    entries; a non-empty file refuses without --force."""
    expiry = int(time.time()) + 600
    with server.client() as client:
        client.zadd("knocker:whitelist", {"198.51.100.9": expiry, "2001:db8::/64": expiry})
    path = write_config(tmp_path, server, "file")
    code, out, err = run("migrate", "--to", "file", "--config", str(path))
    assert code == 0, err
    store = FileStore(make_config(tmp_path), NullFirewall())
    try:
        assert store.entries() == {"198.51.100.9": expiry, "2001:db8::/64": expiry}
    finally:
        store.close()
    code, _, err = run("migrate", "--to", "file", "--config", str(path))
    assert code == 1 and "already holds 2 live entries" in err
