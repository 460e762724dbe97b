"""Groups of Knocker instances sharing one real redis-server, for the redis backend's
tests: RedisStore objects standing for instances (Instances) and whole `knocker serve`
processes (Cluster). Each is a context manager that closes or stops what it opened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knocker.config import Config
from knocker.firewall import NullFirewall
from knocker.store.redisstore import RedisStore
from tests.serverproc import KnockerProcess, base_config
from tests.support.clock import FakeClock
from tests.support.config import make_config
from tests.support.polling import wait_until
from tests.support.redisserver import RedisServer, wait_followers

NOW = 1_800_000_000.0  # the stores' fake time


def redis_config(directory: Path, server: RedisServer, **redis: Any) -> Config:
    """A Config for one RedisStore on `server` (short timeouts; `security` passes through)."""
    security = redis.pop("security", None)
    sections: dict[str, Any] = {
        "whitelist": {"storage_path": str(directory / "whitelist.json"), "backend": "redis"},
        "redis": {"url": server.url, "command_timeout_ms": 500, "connect_timeout_ms": 500, **redis},
    }
    if security is not None:
        sections["security"] = security
    return make_config(directory, **sections)


class Instances:
    """Stores on one server, as separate instances would hold them."""

    def __init__(self, tmp_path: Path, server: RedisServer) -> None:
        self.tmp_path, self.server = tmp_path, server
        self.clock = FakeClock(NOW)
        self.opened: list[RedisStore] = []

    def open(self, start: bool = True, **redis: Any) -> RedisStore:
        directory = self.tmp_path / f"instance{len(self.opened)}"
        store = RedisStore(
            redis_config(directory, self.server, **redis), NullFirewall(), clock=self.clock
        )
        self.opened.append(store)
        if start:
            store.start()
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()

    def __enter__(self) -> Instances:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shared_config(directory: Path, server: RedisServer, **sections: Any) -> dict[str, Any]:
    """A `knocker serve` configuration on `server` (tests.serverproc's base, 1 s timeouts)."""
    redis = {
        "url": server.url,
        "command_timeout_ms": 1000,
        "connect_timeout_ms": 1000,
        **sections.pop("redis", {}),
    }
    config = base_config(directory, redis=redis, **sections)
    config["whitelist"]["backend"] = "redis"
    return config


class Cluster:
    """`knocker serve` instances sharing `server`; each started one has every worker
    synchronised before start() returns."""

    def __init__(self, tmp_path: Path, server: RedisServer) -> None:
        self.tmp_path, self.server = tmp_path, server
        self.instances: list[KnockerProcess] = []

    def start(self, workers: tuple[int, ...] = (1, 3, 1), **sections: Any) -> None:
        for index, count in enumerate(workers):
            directory = self.tmp_path / f"knocker{index}"
            self.add(
                KnockerProcess(
                    directory, shared_config(directory, self.server, **sections), workers=count
                )
            )

    def add(self, process: KnockerProcess) -> KnockerProcess:
        self.instances.append(process)
        process.start()
        wait_followers(process)
        return process

    def stop(self) -> None:
        for process in self.instances:
            if process.process is not None and process.process.poll() is None:
                process.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def verified_everywhere(
    cluster: Cluster, source: str, status: int = 200, timeout: float = 5
) -> None:
    """Every worker of every instance answers `status` (each request lands on some
    worker: thirty in a row on each instance)."""

    def all_answer() -> bool:
        return all(
            process.verify(source=source) == status
            for process in cluster.instances
            for _ in range(30)
        )

    wait_until(all_answer, timeout, interval=0.02, what=f"/verify {status} for {source}")
