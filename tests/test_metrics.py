"""knocker.metrics and GET /metrics: who may scrape, what is counted, and the sums of a
real `knocker serve` with 3 workers, one of them SIGKILLed and restarted in between."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from webtest import TestApp

from knocker.app import App, build_app
from knocker.config import load_config_text
from knocker.metrics import Metrics
from tests.serverproc import ADMIN_KEY, KnockerProcess, base_config

NOW = 1_700_000_000.0
KEY = "metrics-test-key-8e2f4a6c1b"
ADMIN = "metrics-admin-key-3d7b9f1e5a"
SCRAPER = "192.0.2.10"
CLIENT = "203.0.113.7"


def make_app(tmp_path: Path, enabled: bool = True) -> App:
    config = load_config_text(f"""
api_keys:
  - {{name: phone, key: {KEY}, max_ttl: 3600}}
  - {{name: admin, key: {ADMIN}, max_ttl: 3600, admin: true}}
whitelist:
  storage_path: {tmp_path / "whitelist.json"}
metrics:
  enabled: {"true" if enabled else "false"}
  allow: ["{SCRAPER}/32"]
""")
    return build_app(config, clock=lambda: NOW)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    built = make_app(tmp_path)
    yield built
    built.close()


@pytest.fixture
def web(app: App) -> TestApp:
    return TestApp(app, extra_environ={"REMOTE_ADDR": CLIENT})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(web: TestApp) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = web.get("/metrics", extra_environ={"REMOTE_ADDR": SCRAPER})
    assert response.content_type == "text/plain"
    return samples(response.text)


def knocks(result: str, key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("knocker_knocks_total", (("key", key), ("result", result)))


def verifies(decision: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("knocker_verify_total", (("decision", decision),))


def test_metrics_endpoint_is_absent_when_disabled(tmp_path: Path) -> None:
    """Off by default: /metrics is an unknown path, even for an allowed address."""
    app = make_app(tmp_path, enabled=False)
    try:
        response = TestApp(app).get(
            "/metrics", extra_environ={"REMOTE_ADDR": SCRAPER}, expect_errors=True
        )
        assert response.status_int == 404
    finally:
        app.close()


def test_only_allowed_addresses_and_admin_keys_may_scrape(web: TestApp) -> None:
    """metrics.allow and admin keys get 200; others, a user key and a wrong key get 403."""
    assert web.get("/metrics", extra_environ={"REMOTE_ADDR": SCRAPER}).status_int == 200
    assert web.get("/metrics", headers={"X-Api-Key": ADMIN}).status_int == 200
    for headers in ({}, {"X-Api-Key": KEY}, {"X-Api-Key": "wrong"}):
        assert web.get("/metrics", headers=headers, expect_errors=True).status_int == 403
    assert (
        web.post("/metrics", extra_environ={"REMOTE_ADDR": SCRAPER}, expect_errors=True).status_int
        == 405
    )


def test_knocks_verifies_and_active_grants_are_counted(web: TestApp) -> None:
    """Each knock counts under its result and key name, each /verify under its decision."""
    headers = {"X-Api-Key": KEY}
    web.post("/knock", headers=headers)
    web.post("/knock", headers=headers)
    web.post("/knock", headers={"X-Api-Key": "wrong"}, expect_errors=True)
    web.get("/verify")
    web.get("/verify", extra_environ={"REMOTE_ADDR": "198.51.100.1"}, expect_errors=True)
    web.get("/verify", extra_environ={"REMOTE_ADDR": "198.51.100.1"}, expect_errors=True)
    found = scrape(web)
    assert found[knocks("granted", "phone")] == 1
    assert found[knocks("extended", "phone")] == 1
    assert found[knocks("refused", "-")] == 1
    assert found[knocks("granted", "admin")] == 0  # every series exists from the start
    assert found[verifies("allow")] == 1 and found[verifies("deny")] == 2
    assert found[("knocker_active_grants", ())] == 1
    assert found[("knocker_evictions_total", ())] == 0


def test_metrics_reported_later_appear_only_once_they_have_values() -> None:
    """Expirations, firewall re-applies, D-Bus and sync latency: absent until reported."""
    metrics = Metrics(("phone",), lambda: 0)
    names = {name for name, _ in samples(metrics.exposition().decode())}
    assert not names & {"knocker_expirations_total", "knocker_dbus_call_seconds_count"}
    metrics.expired(2)
    metrics.firewall_reapplied()
    metrics.dbus_call(0.004)
    metrics.storage_synced(0.02)
    found = samples(metrics.exposition().decode())
    assert found[("knocker_expirations_total", ())] == 2
    assert found[("knocker_firewall_reapplies_total", ())] == 1
    assert found[("knocker_dbus_call_seconds_count", ())] == 1
    assert found[("knocker_storage_sync_seconds_sum", ())] == pytest.approx(0.02)


# --- a real `knocker serve` ------------------------------------------------------------


def workers_of(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def wait_for_workers(master: int, count: int, excluded: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = workers_of(master)
        if len(current) == count and excluded not in current:
            return
        time.sleep(0.05)
    raise AssertionError(f"gunicorn did not restart a worker: {workers_of(master)}")


def served_scrape(server: KnockerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = server.request("GET", "/metrics", {"X-Api-Key": ADMIN_KEY})
    assert status == 200, body
    return samples(body.decode())


@pytest.mark.server
def test_three_workers_sum_exactly_across_a_killed_and_restarted_worker(tmp_path: Path) -> None:
    """Counts of all 3 workers add up to the requests sent, before and after one worker
    is SIGKILLed (gunicorn starts another): nothing lost, nothing counted twice."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    config = base_config(
        tmp_path,
        metrics={"enabled": True},
        security={"knock_rate_limit": {"successful_requests": 0, "failed_requests": 0}},
    )
    # TMPDIR: the private metrics directory `knocker serve` makes lands where we can look.
    server = KnockerProcess(tmp_path, config, workers=3, threads=2, env={"TMPDIR": str(temp)})
    with server:
        assert server.process is not None
        master = server.process.pid
        wait_for_workers(master, 3, excluded=-1)

        def traffic(rounds: int) -> None:
            for _ in range(rounds):  # fresh connections: spread over the workers
                assert server.knock()[0] == 200
                assert server.knock("wrong")[0] == 401
                assert server.verify() == 200
                assert server.verify(source="127.0.0.2") == 401
                assert server.verify(source="127.0.0.2") == 401

        traffic(30)
        first = served_scrape(server)
        assert first[knocks("granted", "phone")] == 1
        assert first[knocks("extended", "phone")] == 29
        assert first[knocks("refused", "-")] == 30
        assert first[verifies("allow")] == 30 and first[verifies("deny")] == 60

        # The victim is a worker that has counted something (its own counter file).
        metrics_dir = next(temp.glob("knocker-metrics-*"))
        victim = next(
            pid for pid in workers_of(master) if (metrics_dir / f"counter_{pid}.db").exists()
        )
        os.kill(victim, signal.SIGKILL)
        wait_for_workers(master, 3, excluded=victim)

        assert served_scrape(server) == first  # the dead worker's counts stay, once
        traffic(20)
        second = served_scrape(server)
        assert second[knocks("extended", "phone")] == 49
        assert second[knocks("refused", "-")] == 50
        assert second[verifies("allow")] == 50 and second[verifies("deny")] == 100
        assert second[("knocker_active_grants", ())] == 1
    assert not list(temp.glob("knocker-metrics-*"))  # removed when the service stops


def test_serve_gives_the_workers_a_fresh_private_directory_and_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """knocker serve: PROMETHEUS_MULTIPROC_DIR is an empty new directory while gunicorn
    runs, child_exit is hooked, and afterwards the directory and the variable are gone."""
    import argparse

    from knocker import cli

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # $TMPDIR, read once
    config = tmp_path / "knocker.yaml"
    config.write_text(
        f"api_keys: [{{key: {KEY}, max_ttl: 60}}]\n"
        f"whitelist: {{storage_path: {tmp_path / 'whitelist.json'}}}\n"
    )
    seen: dict[str, object] = {}

    def fake_run(server: object) -> None:
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        seen["dir"] = directory
        seen["empty"] = os.listdir(directory) == []
        seen["hook"] = server._options["child_exit"]  # type: ignore[attr-defined]
        server._app.close()  # type: ignore[attr-defined]

    args = argparse.Namespace(
        config=str(config),
        bind=["127.0.0.1:0"],
        workers=1,
        threads=1,
        out=None,
        err=None,
        worker_class="gthread",  # in-process: no gevent monkeypatching of the test run
    )
    assert cli._serve(args, run=fake_run) == 0
    assert str(seen["dir"]).startswith(str(tmp_path / "knocker-metrics-"))
    assert seen["empty"] is True and seen["hook"] is cli._child_exit
    assert not os.path.exists(str(seen["dir"]))
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_a_forwarded_for_from_an_untrusted_peer_does_not_open_metrics(web: TestApp) -> None:
    """X-Forwarded-For naming an allowed address counts only from a trusted proxy."""
    response = web.get("/metrics", headers={"X-Forwarded-For": SCRAPER}, expect_errors=True)
    assert response.status_int == 403


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("metrics: {enabled: 1}", "metrics.enabled"),
        ("metrics: {allow: [not-a-network]}", "metrics.allow[0]"),
        ("metrics: {allow: 10.0.0.0/8}", "metrics.allow"),
        ("metrics: {alow: []}", "metrics.alow"),
        ("audit: {path: 3}", "audit.path"),
        ("audit: {file: x}", "audit.file"),
    ],
)
def test_invalid_metrics_and_audit_settings_name_their_key(text: str, path: str) -> None:
    """Each new setting is validated, and the error names its key path."""
    from knocker.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config_text(f"api_keys: [{{key: {KEY}, max_ttl: 60}}]\n{text}\n")
    assert path in str(caught.value)


def test_metrics_and_audit_default_to_off() -> None:
    """No metrics endpoint, no audit file unless configured."""
    config = load_config_text(f"api_keys: [{{key: {KEY}, max_ttl: 60}}]\n")
    assert config.metrics.enabled is False and config.metrics.allow == ()
    assert config.audit.path is None


@pytest.mark.server
def test_counts_survive_a_sighup_reload(tmp_path: Path) -> None:
    """SIGHUP replaces the workers: the old workers' counts stay in the sums."""
    config = base_config(tmp_path, metrics={"enabled": True})
    with KnockerProcess(tmp_path, config, workers=2) as server:
        assert server.process is not None
        for _ in range(5):
            assert server.verify() == 401
        before = workers_of(server.process.pid)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while set(workers_of(server.process.pid)) & set(before):
            assert time.monotonic() < deadline, "the workers were not replaced"
            time.sleep(0.05)
        server.wait_healthy()
        for _ in range(3):
            assert server.verify() == 401
        assert served_scrape(server)[verifies("deny")] == 8
