"""knocker.audit and knocker.events: one structured line per event, the JSON-lines file
and its reopening after logrotate renamed it, under WebTest and a real `knocker serve`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from webtest import TestApp

from knocker.app import App, build_app
from knocker.audit import AuditFile, AuditLog, Event, Record, format_line
from knocker.config import load_config_text
from knocker.events import Observer
from tests.serverproc import TEST_KEY, KnockerProcess, base_config

NOW = 1_700_000_000.0
KEY = "audit-test-key-5c1e9a7b3d"
CLIENT = "203.0.113.7"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(tmp_path: Path, clock: Clock) -> Iterator[App]:
    config = load_config_text(f"""
api_keys:
  - name: phone
    key: {KEY}
    max_ttl: 3600
    allow_remote_whitelist: true
security:
  max_whitelist_entries: 2
whitelist:
  storage_path: {tmp_path / "whitelist.json"}
audit:
  path: {tmp_path / "audit.jsonl"}
""")
    built = build_app(config, clock=clock)
    yield built
    built.close()


@pytest.fixture
def web(app: App) -> TestApp:
    return TestApp(app, extra_environ={"REMOTE_ADDR": CLIENT})


def knock(web: TestApp, key: str = KEY, ip: str | None = None, peer: str = CLIENT) -> int:
    body = json.dumps({"ip_address": ip}).encode() if ip else b""
    headers = {"X-Api-Key": key, **({"Content-Type": "application/json"} if ip else {})}
    response = web.post(
        "/knock",
        params=body,
        headers=headers,
        extra_environ={"REMOTE_ADDR": peer},
        expect_errors=True,
    )
    return int(response.status_int)


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "knocker.audit"]


def file_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_line_starts_with_event_and_client_and_quotes_anything_not_a_token() -> None:
    """event and client lead; a value with spaces, quotes or a line break is JSON-quoted."""
    line = format_line(
        Record(
            Event.KNOCK_FAILED,
            "192.0.2.1",
            'a "b"\nclient=6.6.6.6',
            result=401,
            reason="Invalid or missing API key",
        )
    )
    assert line.startswith("event=knock_failed client=192.0.2.1 key=")
    assert "\n" not in line
    assert 'key="a \\"b\\"\\nclient=6.6.6.6"' in line
    assert line.endswith('result=401 reason="Invalid or missing API key"')


def test_grant_then_extend_are_audited_with_key_client_entry_and_ttl(
    web: TestApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A first knock is a grant, the next one for the same live entry an extension."""
    with caplog.at_level(logging.INFO, logger="knocker"):
        assert knock(web) == 200
        assert knock(web) == 200
    lines = audit_lines(caplog)
    assert [line.split()[0] for line in lines] == ["event=grant", "event=extend"]
    assert f"client={CLIENT} key=phone entry={CLIENT} ttl=3600 result=200" in lines[0]
    events = file_events(tmp_path / "audit.jsonl")
    assert [e["event"] for e in events] == ["grant", "extend"]
    assert events[0]["time"] == NOW and events[0]["expires_at"] == NOW + 3600
    assert events[1]["key"] == "phone" and events[1]["entry"] == CLIENT


def test_a_knock_after_expiry_is_a_grant_again(web: TestApp, clock: Clock, tmp_path: Path) -> None:
    """An entry whose TTL ran out is granted anew, not extended."""
    knock(web)
    clock.now += 3601
    knock(web)
    assert [e["event"] for e in file_events(tmp_path / "audit.jsonl")] == ["grant", "grant"]


def test_eviction_is_audited_per_entry(web: TestApp, tmp_path: Path) -> None:
    """A full whitelist's evicted entry gets its own evict event after the grant."""
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert knock(web, ip=ip) == 200
    events = file_events(tmp_path / "audit.jsonl")
    assert [e["event"] for e in events] == ["grant", "grant", "grant", "evict"]
    assert events[-1]["entry"] == "10.0.0.1"


def test_refused_knock_is_one_line_with_the_client_and_never_the_key(
    web: TestApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong key gives one knock_failed line naming the client; no key appears."""
    wrong = "wrong-" + KEY
    with caplog.at_level(logging.DEBUG):
        assert knock(web, key=wrong) == 401
    lines = audit_lines(caplog)
    assert len(lines) == 1
    assert lines[0].startswith(f"event=knock_failed client={CLIENT} key=- entry=- result=401")
    text = caplog.text + (tmp_path / "audit.jsonl").read_text()
    assert wrong not in text and KEY not in text


def test_unresolved_client_is_logged_as_dash_with_its_peer(
    web: TestApp, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind an untrusted proxy chain the client is "-" (fail2ban must not ban the peer)."""
    with caplog.at_level(logging.INFO, logger="knocker"):
        web.post(
            "/knock",
            headers={"X-Api-Key": "x"},
            expect_errors=True,
            extra_environ={"REMOTE_ADDR": "not-an-ip"},
        )
    assert audit_lines(caplog)[0].startswith("event=knock_failed client=- key=-")
    assert "peer=not-an-ip" in audit_lines(caplog)[0]


def test_audit_file_is_reopened_after_rename(tmp_path: Path) -> None:
    """logrotate renames the file away: the next line goes to a new file at the path."""
    path = tmp_path / "audit.jsonl"
    audit = AuditFile(str(path))
    audit.write({"event": "grant"}, NOW)
    path.rename(tmp_path / "audit.jsonl.1")
    audit.write({"event": "extend"}, NOW)
    path.unlink()
    audit.write({"event": "evict"}, NOW)
    audit.close()
    assert [e["event"] for e in file_events(tmp_path / "audit.jsonl.1")] == ["grant"]
    assert [e["event"] for e in file_events(path)] == ["evict"]


def test_unwritable_audit_file_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing directory costs a logged error; the event still reaches the log."""
    audit = AuditLog(str(tmp_path / "missing" / "audit.jsonl"))
    with caplog.at_level(logging.INFO, logger="knocker"):
        audit.emit(Record(Event.GRANT, "192.0.2.1"), NOW)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("event=grant")
    assert "cannot write audit file" in messages[1]


def test_observer_audits_expired_entries_reported_by_the_store(tmp_path: Path) -> None:
    """The Events hook: expired entries reported later by the store become expire events."""
    observer = Observer(AuditLog(str(tmp_path / "a.jsonl")))
    observer.expired(["192.0.2.1", "10.0.0.0/24"], NOW)
    observer.close()
    events = file_events(tmp_path / "a.jsonl")
    assert [(e["event"], e["entry"]) for e in events] == [
        ("expire", "192.0.2.1"),
        ("expire", "10.0.0.0/24"),
    ]


@pytest.mark.server
def test_audit_file_rotated_under_a_running_service(tmp_path: Path) -> None:
    """Renamed away while `knocker serve` runs (2 workers): later events land in a new
    file at the path, earlier ones stay in the renamed one, none is lost."""
    path = tmp_path / "audit.jsonl"
    config = base_config(tmp_path, audit={"path": str(path)})
    with KnockerProcess(tmp_path, config, workers=2) as server:
        for _ in range(4):
            assert server.knock()[0] == 200
        path.rename(tmp_path / "audit.jsonl.1")
        for _ in range(4):
            assert server.knock("wrong")[0] == 401
    before = file_events(tmp_path / "audit.jsonl.1")
    after = file_events(path)
    assert [e["event"] for e in before] == ["grant"] + ["extend"] * 3
    assert [e["event"] for e in after] == ["knock_failed"] * 4
    assert TEST_KEY not in path.read_text() + server.log()


def test_sign_out_and_admin_revoke_are_audited_and_a_miss_is_recorded_too(
    tmp_path: Path, clock: Clock
) -> None:
    """DELETE /knock is a sign_out event, DELETE /grants/{entry} a revoke event, each
    naming the key and the entry; ending nothing is recorded with result 404."""
    config = load_config_text(f"""
api_keys:
  - name: phone
    key: {KEY}
    max_ttl: 3600
  - name: ops
    key: {KEY}-admin
    max_ttl: 3600
    admin: true
whitelist:
  storage_path: {tmp_path / "whitelist.json"}
audit:
  path: {tmp_path / "audit.jsonl"}
""")
    app = build_app(config, clock=clock)
    try:
        web = TestApp(app, extra_environ={"REMOTE_ADDR": CLIENT})
        assert knock(web) == 200
        assert web.delete("/knock", headers={"X-Api-Key": KEY}).status_int == 200
        assert (
            web.delete("/knock", headers={"X-Api-Key": KEY}, expect_errors=True).status_int == 404
        )
        assert knock(web) == 200
        assert (
            web.delete(f"/grants/{CLIENT}", headers={"X-Api-Key": f"{KEY}-admin"}).status_int == 200
        )
    finally:
        app.close()
    events = file_events(tmp_path / "audit.jsonl")
    ended = [
        (e["event"], e["key"], e["entry"], e["result"])
        for e in events
        if e["event"] in ("sign_out", "revoke")
    ]
    assert ended == [
        ("sign_out", "phone", CLIENT, 200),
        ("sign_out", "phone", CLIENT, 404),
        ("revoke", "ops", CLIENT, 200),
    ]
    assert all(KEY not in json.dumps(e) for e in events)
