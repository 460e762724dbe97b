"""`knocker watch`: the KnockLoop schedule on fake time with exact assertions (a fake
transport and a recording writer), the console script as a subprocess for signals and
output, and ONE end-to-end test on the real clock against a real `knocker serve`."""

from __future__ import annotations

import io
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from knocker.client.events import Event, EventLog, LineWriter
from knocker.client.knock import KnockResult
from knocker.client.loop import MAX_WAIT_SECONDS, KnockLoop
from knocker.client.settings import Settings
from tests.clientsupport import (
    GO_CLI_EVENTS,
    JSON_HEADERS,
    Responder,
    Stub,
    Watch,
    grant_body,
    is_event,
    lenient_limits,
    stubs,
)
from tests.serverproc import TEST_KEY, KnockerProcess, base_config

__all__ = ["stubs"]  # fixture

T0 = 1_700_000_000.0  # fake wall clock at start
M0 = 5_000.0  # fake monotonic clock at start
URL = "https://knocker.example.test"
IP_URL = "https://ip.example.test/ip"
KEY = "fake-key-0123456789abcdef"


# ---------------------------------------------------------------------------------------
# fakes


class FakeTime:
    """Wall and monotonic clocks that move only when the loop sleeps; the run stops once
    `stop_after` monotonic seconds have passed. `on_sleep` may move the clocks apart (a
    suspend, a wall clock set back)."""

    def __init__(self, stop_after: float) -> None:
        self.wall = T0
        self.mono = M0
        self.stop_after = stop_after
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[FakeTime], None] = lambda fake: None

    def clock(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> bool:
        assert 0 <= seconds <= MAX_WAIT_SECONDS
        assert len(self.sleeps) < 10_000, "the loop never stopped"
        self.sleeps.append(seconds)
        self.wall += seconds
        self.mono += seconds
        self.on_sleep(self)
        return self.mono - M0 >= self.stop_after


class Recorder:
    """A Writer that keeps every event, and where each burst between two sleeps ends."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]


class FakeServer:
    """A transport: answers POST /knock with `knock(now)` and GET ip_check_url with the next
    of `addresses`; records (wall time, kind) for each request."""

    def __init__(
        self,
        fake: FakeTime,
        knock: Callable[[float], tuple[int, bytes]],
        addresses: list[str] | None = None,
    ) -> None:
        self.fake = fake
        self.knock = knock
        self.addresses = iter(addresses or [])
        self.requests: list[tuple[float, float, str]] = []

    def __call__(self, request: urllib.request.Request, timeout: float) -> tuple[int, bytes]:
        if request.full_url == IP_URL:
            self.requests.append((self.fake.wall, self.fake.mono, "ip"))
            return 200, (next(self.addresses) + "\n").encode()
        assert request.full_url == URL + "/knock" and request.get_method() == "POST"
        self.requests.append((self.fake.wall, self.fake.mono, "knock"))
        return self.knock(self.fake.wall)

    def times(self, kind: str) -> list[float]:
        """Wall seconds since the start of each request of `kind`."""
        return [wall - T0 for wall, _, k in self.requests if k == kind]

    def mono_times(self, kind: str) -> list[float]:
        return [mono - M0 for _, mono, k in self.requests if k == kind]


def granting(ttl: int) -> Callable[[float], tuple[int, bytes]]:
    def answer(now: float) -> tuple[int, bytes]:
        body = {"whitelisted_entry": "192.0.2.7", "expires_at": int(now) + ttl,
                "expires_in_seconds": ttl}  # fmt: skip
        return 200, json.dumps(body).encode()

    return answer


def failing(now: float) -> tuple[int, bytes]:
    return 503, b'{"error": "Firewall unavailable"}'


def run_loop(
    fake: FakeTime,
    server: FakeServer,
    settings: Settings | None = None,
    rng: float = 0.0,
    **options: Any,
) -> Recorder:
    recorder = Recorder()
    loop = KnockLoop(
        settings or Settings(URL, KEY),
        EventLog(recorder, KEY, fake.clock),
        server,
        clock=fake.clock,
        monotonic=fake.monotonic,
        sleep=fake.sleep,
        rng=lambda: rng,
        **options,
    )
    assert loop.run() == 0
    return recorder


# ---------------------------------------------------------------------------------------
# the schedule, on fake time


def test_watch_reknocks_at_exactly_90_percent_of_the_granted_ttl() -> None:
    """A 600 s grant is renewed 540 s later, every time; the whitelist never expires."""
    fake = FakeTime(stop_after=2000)
    server = FakeServer(fake, granting(600))
    recorder = run_loop(fake, server)
    assert server.times("knock") == [0, 540, 1080, 1620]
    assert recorder.named("WhitelistExpired") == []
    nexts = recorder.named("NextKnockUpdated")
    assert [(e.fields["KNOCKER_NEXT_AT_UNIX"], e.fields.get("KNOCKER_CADENCE_SOURCE"))
            for e in nexts] == [
        (str(int(T0) + 540), "ttl_response"), (str(int(T0) + 1080), "ttl_response"),
        (str(int(T0) + 1620), "ttl_response"), (str(int(T0) + 2160), "ttl_response"),
        ("0", None),  # cleared on stop
    ]  # fmt: skip
    assert max(fake.sleeps) == MAX_WAIT_SECONDS  # long waits are cut into wake-ups


def test_watch_reports_cadence_ttl_when_the_requested_ttl_is_granted() -> None:
    """With ttl: 600 requested and granted, the cadence source is `ttl`, as in the Go CLI."""
    fake = FakeTime(stop_after=100)
    recorder = run_loop(fake, FakeServer(fake, granting(600)), Settings(URL, KEY, ttl=600))
    snapshot = recorder.named("StatusSnapshot")[1]
    assert snapshot.fields == {
        "KNOCKER_WHITELIST_IP": "192.0.2.7",
        "KNOCKER_EXPIRES_UNIX": str(int(T0) + 600),
        "KNOCKER_TTL_SEC": "600",
        "KNOCKER_NEXT_AT_UNIX": str(int(T0) + 540),
        "KNOCKER_CADENCE_SOURCE": "ttl",
    }


def test_watch_with_ip_check_url_knocks_only_when_the_address_changes() -> None:
    """Polling every check_interval, watch knocks at start and once per change of the
    reported address; a garbage answer is an Error event, not a change."""
    addresses = ["198.51.100.1", "198.51.100.1", "198.51.100.2", "<html>portal</html>",
                 "198.51.100.2", "198.51.100.3", "198.51.100.3"]  # fmt: skip
    fake = FakeTime(stop_after=330)
    server = FakeServer(fake, granting(3600), addresses)
    settings = Settings(URL, KEY, check_interval_minutes=1, ip_check_url=IP_URL)
    recorder = run_loop(fake, server, settings)
    assert server.times("ip") == [0, 60, 120, 180, 240, 300]
    assert server.times("knock") == [0, 120, 300]
    errors = recorder.named("Error")
    assert [(e.fields["KNOCKER_ERROR_CODE"], e.priority) for e in errors] == [
        ("ip_lookup_failed", 3)
    ]
    assert errors[0].fields["KNOCKER_CONTEXT"] == IP_URL
    messages = [e.message for e in recorder.events if e.name is None]
    assert messages == ["Public address changed from 198.51.100.1 to 198.51.100.2",
                        "Public address changed from 198.51.100.2 to 198.51.100.3"]  # fmt: skip
    sources = [e.fields.get("KNOCKER_CADENCE_SOURCE") for e in recorder.named("NextKnockUpdated")]
    assert sources.count("ip_change") == 2


def test_watch_backs_off_exponentially_while_knocks_fail() -> None:
    """Against a server that keeps failing, retries come after 5, 10, 20, 40, 40 s
    (backoff_min 5, backoff_max 40, jitter at its maximum)."""
    fake = FakeTime(stop_after=150)
    server = FakeServer(fake, failing)
    recorder = run_loop(fake, server, rng=1.0, backoff_min=5, backoff_max=40)
    assert server.times("knock") == [0, 5, 15, 35, 75, 115]
    errors = recorder.named("Error")
    assert len(errors) == 6
    for error in errors:
        assert error.priority == 3
        assert error.fields["KNOCKER_ERROR_CODE"] == "knock_failed"
        assert error.fields["KNOCKER_HTTP_STATUS"] == "503"
        assert error.fields["KNOCKER_CONTEXT"] == URL
        assert error.fields["KNOCKER_ERROR_MSG"].startswith("HTTP 503: ")
    triggered = recorder.named("KnockTriggered")
    assert {(e.fields["KNOCKER_RESULT"], e.priority) for e in triggered} == {("failure", 3)}


def test_backoff_grows_exponentially_within_bounds() -> None:
    """Retry delays double from backoff_min up to backoff_max, jitter within [d/2, d]."""

    def delays(r: float) -> list[float]:
        fake = FakeTime(stop_after=0)
        loop = KnockLoop(Settings(URL, KEY), EventLog(Recorder(), KEY, fake.clock),
                         FakeServer(fake, failing), fake.clock, fake.monotonic, fake.sleep,
                         lambda: r, backoff_min=5, backoff_max=300)  # fmt: skip
        return [loop.backoff(n) for n in range(1, 10)]

    assert delays(1.0) == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert delays(0.0) == [2.5, 5, 10, 20, 40, 80, 150, 150, 150]


def test_refresh_delay_follows_the_ttl_and_falls_back_to_check_interval() -> None:
    """Re-knock at 90 % of the granted TTL; every check_interval when the server gives none."""
    fake = FakeTime(stop_after=0)
    loop = KnockLoop(Settings(URL, KEY, check_interval_minutes=2), EventLog(Recorder(), KEY,
                     fake.clock), FakeServer(fake, failing), fake.clock, fake.monotonic,
                     fake.sleep, lambda: 0.5)  # fmt: skip
    assert loop.refresh_delay(KnockResult("1.2.3.4", 0, 600)) == (540.0, "ttl_response")
    assert loop.refresh_delay(KnockResult("1.2.3.4", 0, 0)) == (120.0, "check_interval")


def test_watch_reports_expiry_at_the_second_it_happens_when_the_reknock_fails() -> None:
    """A 10 s grant whose renewal (at 9 s) fails ends in WhitelistExpired at exactly 10 s,
    priority 5, followed by a snapshot without a whitelist."""
    answers = iter([granting(10)])
    fake = FakeTime(stop_after=20)
    server = FakeServer(fake, lambda now: next(answers, failing)(now))
    recorder = run_loop(fake, server, rng=0.0, backoff_min=4)
    assert server.times("knock")[:2] == [0, 9]
    (expired,) = recorder.named("WhitelistExpired")
    assert expired.at == T0 + 10 and expired.priority == 5
    assert expired.fields == {"KNOCKER_WHITELIST_IP": "192.0.2.7",
                              "KNOCKER_EXPIRED_UNIX": str(int(T0) + 10)}  # fmt: skip
    after = recorder.events[recorder.events.index(expired) + 1]
    assert after.name == "StatusSnapshot" and "KNOCKER_WHITELIST_IP" not in after.fields


def test_watch_knocks_on_time_when_the_wall_clock_is_set_back() -> None:
    """The monotonic clock keeps the schedule when the wall clock jumps back an hour."""
    fake = FakeTime(stop_after=600)

    def set_back_once(f: FakeTime) -> None:
        if f.mono - M0 == 120:
            f.wall -= 3600

    fake.on_sleep = set_back_once
    server = FakeServer(fake, granting(600))
    run_loop(fake, server)
    assert server.mono_times("knock") == [0, 540]
    assert server.times("knock") == [0, 540 - 3600]


def test_watch_knocks_at_once_after_a_suspend() -> None:
    """After a suspend (wall time moves, monotonic time does not) the overdue knock is sent
    at the first wake-up, by the wall clock."""
    fake = FakeTime(stop_after=2000)

    def suspend_once(f: FakeTime) -> None:
        if f.mono - M0 == 60:
            f.wall += 1000  # the lid was closed for 1000 s: only the wall clock moved

    fake.on_sleep = suspend_once
    server = FakeServer(fake, granting(600))
    run_loop(fake, server)
    assert server.times("knock")[:2] == [0, 1060]
    assert server.mono_times("knock")[:2] == [0, 60]


def test_every_change_is_followed_by_a_status_snapshot() -> None:
    """The GNOME extension rebuilds its panel from the newest entries: the last event before
    every wait is a StatusSnapshot, and the run ends with stopping, cleared, snapshot,
    stopped."""
    fake = FakeTime(stop_after=1300)
    boundaries: list[int] = []
    recorder = Recorder()
    original = fake.sleep

    def sleep(seconds: float) -> bool:
        boundaries.append(len(recorder.events))
        return original(seconds)

    answers = iter([granting(600), failing, granting(600)])
    server = FakeServer(fake, lambda now: next(answers, granting(600))(now))
    loop = KnockLoop(Settings(URL, KEY), EventLog(recorder, KEY, fake.clock), server,
                     fake.clock, fake.monotonic, sleep, lambda: 0.0)  # fmt: skip
    assert loop.run() == 0
    assert {recorder.events[i - 1].name for i in set(boundaries)} == {"StatusSnapshot"}
    tail = [(e.name, e.priority, e.fields.get("KNOCKER_SERVICE_STATE")) for e in
            recorder.events[-4:]]  # fmt: skip
    assert tail == [("ServiceState", 5, "stopping"), ("NextKnockUpdated", 6, None),
                    ("StatusSnapshot", 6, None), ("ServiceState", 6, "stopped")]  # fmt: skip
    final = recorder.events[-2]
    assert "KNOCKER_NEXT_AT_UNIX" not in final.fields
    assert final.fields["KNOCKER_WHITELIST_IP"] == "192.0.2.7"


def test_a_successful_knock_writes_the_go_cli_fields_exactly() -> None:
    """KnockTriggered, WhitelistApplied, NextKnockUpdated and StatusSnapshot carry the Go
    client's fields, as strings, in the journal's field order."""
    fake = FakeTime(stop_after=1)
    recorder = run_loop(fake, FakeServer(fake, granting(600)))
    expires = str(int(T0) + 600)
    burst = recorder.events[2:6]  # after ServiceState started and the first snapshot
    assert [e.journal_fields() for e in burst] == [
        [("MESSAGE", "Knock triggered via schedule: success"), ("PRIORITY", "6"),
         ("SYSLOG_IDENTIFIER", "knocker"), ("KNOCKER_SCHEMA_VERSION", "1"),
         ("KNOCKER_EVENT", "KnockTriggered"), ("KNOCKER_RESULT", "success"),
         ("KNOCKER_TRIGGER_SOURCE", "schedule"), ("KNOCKER_WHITELIST_IP", "192.0.2.7")],
        [("MESSAGE", "Whitelisted 192.0.2.7 for 600s (expires at 2023-11-14T22:23:20Z)"),
         ("PRIORITY", "6"), ("SYSLOG_IDENTIFIER", "knocker"), ("KNOCKER_SCHEMA_VERSION", "1"),
         ("KNOCKER_EVENT", "WhitelistApplied"), ("KNOCKER_EXPIRES_UNIX", expires),
         ("KNOCKER_SOURCE", "schedule"), ("KNOCKER_TTL_SEC", "600"),
         ("KNOCKER_WHITELIST_IP", "192.0.2.7")],
        [("MESSAGE", "Next knock at 2023-11-14T22:22:20Z"), ("PRIORITY", "6"),
         ("SYSLOG_IDENTIFIER", "knocker"), ("KNOCKER_SCHEMA_VERSION", "1"),
         ("KNOCKER_EVENT", "NextKnockUpdated"), ("KNOCKER_CADENCE_SOURCE", "ttl_response"),
         ("KNOCKER_NEXT_AT_UNIX", str(int(T0) + 540))],
        [("MESSAGE", "Status: whitelisted 192.0.2.7 until 2023-11-14T22:23:20Z, next knock "
          "at 2023-11-14T22:22:20Z"), ("PRIORITY", "6"), ("SYSLOG_IDENTIFIER", "knocker"),
         ("KNOCKER_SCHEMA_VERSION", "1"), ("KNOCKER_EVENT", "StatusSnapshot"),
         ("KNOCKER_CADENCE_SOURCE", "ttl_response"), ("KNOCKER_EXPIRES_UNIX", expires),
         ("KNOCKER_NEXT_AT_UNIX", str(int(T0) + 540)), ("KNOCKER_TTL_SEC", "600"),
         ("KNOCKER_WHITELIST_IP", "192.0.2.7")],
    ]  # fmt: skip
    started = recorder.events[0]
    assert started.name == "ServiceState" and started.priority == 6
    assert started.fields["KNOCKER_SERVICE_STATE"] == "started"
    assert started.fields["KNOCKER_VERSION"]


def test_event_log_redacts_the_key_even_if_a_message_held_it() -> None:
    """Whatever reaches the event log, the key is replaced before it is written."""
    out = io.StringIO()
    log = EventLog(LineWriter(out, as_json=True), "s3cret-key", time.time)
    log.emit("Error", "server said s3cret-key", 3, KNOCKER_ERROR_MSG="echo s3cret-key")
    assert "s3cret-key" not in out.getvalue()
    record = json.loads(out.getvalue())
    assert record["KNOCKER_EVENT"] == "Error" and record["KNOCKER_SCHEMA_VERSION"] == "1"
    assert record["MESSAGE"] == "server said [key hidden]"


# ---------------------------------------------------------------------------------------
# the console script


def test_watch_stops_cleanly_on_sigterm_with_one_line_per_event(
    stubs: Callable[[Responder], Stub], tmp_path: Path
) -> None:
    """SIGTERM while waiting for the next knock exits 0 at once, after 'stopping' and
    'stopped'; the human log has one line per event and never the key."""
    stub = stubs(lambda method, path, headers, body: (200, JSON_HEADERS, grant_body(ttl=3600)))
    watch = Watch(["--url", stub.url, "--key", TEST_KEY], tmp_path)
    try:
        watch.wait_for(lambda line: "Whitelisted 127.0.0.1 for 3600s" in line, 15)
        watch.wait_for(lambda line: line.split(" ", 2)[-1].startswith("Status:"), 5)
        asked = time.monotonic()
        code = watch.terminate()
        took = time.monotonic() - asked
    finally:
        watch.kill()
    assert code == 0
    assert took < 5
    assert [line.split(" ", 2)[-1] for line in watch.lines[-4:]] == [
        "Service state: stopping", "Next knock cleared",
        "Status: whitelisted 127.0.0.1 until " + watch.lines[-2].split(" until ", 1)[-1],
        "Service state: stopped",
    ]  # fmt: skip
    assert "Next knock at" in watch.output()
    assert len(stub.requests) == 1
    assert TEST_KEY not in watch.output()


def test_watch_json_events_use_the_go_cli_names_and_string_fields(
    stubs: Callable[[Responder], Stub], tmp_path: Path
) -> None:
    """--json prints one JSON object per line, named and typed like the Go CLI's journald
    entries (KNOCKER_EVENT, KNOCKER_* fields as strings)."""
    stub = stubs(lambda method, path, headers, body: (200, JSON_HEADERS, grant_body(ttl=600)))
    watch = Watch(["--url", stub.url, "--key", TEST_KEY, "--json"], tmp_path)
    try:
        watch.wait_for(is_event("StatusSnapshot", KNOCKER_WHITELIST_IP="127.0.0.1"), 15)
        code = watch.terminate()
    finally:
        watch.kill()
    assert code == 0
    events = watch.events()
    names = [e["KNOCKER_EVENT"] for e in events]
    assert names[0] == "ServiceState" and events[0]["KNOCKER_SERVICE_STATE"] == "started"
    assert [e.get("KNOCKER_SERVICE_STATE") for e in events[-4:]] == [
        "stopping", None, None, "stopped"]  # fmt: skip
    assert {"KnockTriggered", "WhitelistApplied", "NextKnockUpdated", "StatusSnapshot"} <= set(
        names
    )
    assert set(names) <= GO_CLI_EVENTS
    for event in events:
        assert all(isinstance(v, str) for v in event.values())
        assert event["SYSLOG_IDENTIFIER"] == "knocker"
    applied = next(e for e in events if e["KNOCKER_EVENT"] == "WhitelistApplied")
    assert applied["KNOCKER_TTL_SEC"] == "600" and applied["KNOCKER_SOURCE"] == "schedule"
    assert TEST_KEY not in watch.output()


# ---------------------------------------------------------------------------------------
# end to end, on the real clock


@pytest.mark.server
def test_watch_against_a_real_server_keeps_access_past_the_first_expiry(
    tmp_path: Path,
) -> None:
    """The one real-clock test: with a 6 s TTL, /verify keeps answering 200 for 8 s, past
    the first grant's expiry, because watch renews in time (the schedule's exact times are
    the fake-time tests' job)."""
    directory = tmp_path / "server"
    with KnockerProcess(directory, base_config(directory, security=lenient_limits())) as server:
        watch = Watch(["--url", server.url, "--key", TEST_KEY, "--ttl", "6", "--json"], tmp_path)
        try:
            watch.wait_for(is_event("WhitelistApplied"), 15)
            started = time.monotonic()
            verdicts = []
            while time.monotonic() - started < 8:
                verdicts.append(server.verify())
                time.sleep(0.25)
            code = watch.terminate()
        finally:
            watch.kill()
    assert code == 0, watch.dump()
    assert set(verdicts) == {200}, verdicts  # a lapse would show as 401 after ~6 s
    applied = [e for e in watch.events() if e.get("KNOCKER_EVENT") == "WhitelistApplied"]
    assert len(applied) >= 2, watch.dump()
    assert all(e["KNOCKER_TTL_SEC"] == "6" and e["KNOCKER_WHITELIST_IP"] == "127.0.0.1"
               for e in applied)  # fmt: skip
    assert TEST_KEY not in watch.output()
