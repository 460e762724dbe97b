"""deploy/compose.redis.yaml (README "Several hosts"): two Knocker instances and Valkey.

The compose file itself cannot be brought up here (no container registry); these tests
check what it promises, and tests/test_redis_cluster.py runs the same topology with real
processes (two and three `knocker serve` instances, one redis-server with AOF and
appendfsync always)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from knocker.config import parse_config

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "deploy" / "compose.redis.yaml"
KNOCKERS = ("knocker-a", "knocker-b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def documented_config() -> dict[str, Any]:
    """knocker.container.yaml plus the lines the compose file's header says to add."""
    config: dict[str, Any] = yaml.safe_load(
        (REPO / "deploy" / "knocker.container.yaml").read_text()
    )
    for index, key in enumerate(config["api_keys"]):
        key["key"] = f"generated-key-{index}-0123456789abcdefghijklmnopqrstuvwxyz"
    header = COMPOSE.read_text().split("services:")[0]
    assert "backend: redis" in header and 'url: "redis://valkey:6379/0"' in header
    assert "password_env: KNOCKER_REDIS_PASSWORD" in header
    config.setdefault("whitelist", {})["backend"] = "redis"
    config["redis"] = {"url": "redis://valkey:6379/0", "password_env": "KNOCKER_REDIS_PASSWORD"}
    return config


def test_both_instances_share_one_config_and_keep_their_own_data(compose):
    """The two Knocker services mount the same knocker.yaml and different data volumes."""
    services = compose["services"]
    configs = {
        [v for v in services[n]["volumes"] if v.endswith(":/app/knocker.yaml:ro")][0]
        for n in KNOCKERS
    }
    assert configs == {"./knocker.yaml:/app/knocker.yaml:ro"}
    data = {next(v for v in services[n]["volumes"] if ":/data" in v) for n in KNOCKERS}
    assert len(data) == 2


def test_the_documented_config_reaches_the_valkey_service_with_its_password(compose):
    """The config the header describes loads, names the valkey service, and the password
    variable it reads is set on both instances from the same .env value as the server's."""
    config = parse_config(documented_config())
    assert config.whitelist.backend == "redis"
    host = config.redis.url.split("://", 1)[1].split(":", 1)[0]
    assert host in compose["services"]
    for name in KNOCKERS:
        environment = compose["services"][name]["environment"]
        assert environment[config.redis.password_env] == "${REDIS_PASSWORD}"
    assert "${REDIS_PASSWORD" in " ".join(compose["services"][host]["command"])


def test_the_server_is_durable_append_only_fsync_always(compose):
    """appendonly yes + appendfsync always: a knock's 200 is on the server's disk."""
    command = compose["services"]["valkey"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"
    assert any(v.endswith(":/data") for v in compose["services"]["valkey"]["volumes"])


def test_instances_wait_for_the_server_and_drop_privileges(compose):
    """Knocker starts after Valkey is healthy, without capabilities, read-only."""
    for name in KNOCKERS:
        service = compose["services"][name]
        assert service["depends_on"]["valkey"]["condition"] == "service_healthy"
        assert service["cap_drop"] == ["ALL"] and service["read_only"] is True
