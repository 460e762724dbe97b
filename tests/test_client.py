"""`knocker knock` and `knocker watch` as a user runs them: the console script as a
subprocess, against a real `knocker serve` on loopback or against small loopback stubs
(a counting forwarder, an IP-check service, a failing server, an HTTP proxy)."""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from knocker import client
from tests.serverproc import ADMIN_KEY, KNOCKER, TEST_KEY, KnockerProcess, base_config, free_port

GO_CLI_EVENTS = {
    "ServiceState",
    "StatusSnapshot",
    "WhitelistApplied",
    "WhitelistExpired",
    "NextKnockUpdated",
    "KnockTriggered",
    "Error",
}
WRONG_KEY = "wrong-key-ZZZZ-0123456789-this-must-never-be-printed"


# ---------------------------------------------------------------------------------------
# helpers


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without Knocker settings or proxies, HOME set to `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("KNOCKER_") and "PROXY" not in k.upper()
    }
    env["HOME"] = str(home)
    env.update(extra)
    return env


def run_cli(
    args: list[str], home: Path, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KNOCKER, *args],
        env=client_env(home, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_secret_absent(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout
        assert secret not in result.stderr


def lenient_limits() -> dict[str, Any]:
    # Every test knocks from 127.0.0.1: the default budget would turn later tests into 429s.
    return {"knock_rate_limit": {"successful_requests": 0, "failed_requests": 0}}


Responder = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


class Stub:
    """A loopback HTTP server that records every request and answers via `respond`."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                with stub.lock:
                    stub.requests.append(
                        {
                            "time": time.monotonic(),
                            "method": self.command,
                            "path": self.path,
                            "headers": headers,
                            "body": body,
                        }
                    )
                status, extra, payload = stub.respond(self.command, self.path, headers, body)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def matching(self, method: str, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stubs() -> Iterator[Callable[[Responder], Stub]]:
    made: list[Stub] = []

    def make(respond: Responder) -> Stub:
        made.append(Stub(respond))
        return made[-1]

    yield make
    for stub in made:
        stub.close()


def grant_body(entry: str = "127.0.0.1", ttl: int = 3600) -> bytes:
    now = int(time.time())
    return json.dumps(
        {"whitelisted_entry": entry, "expires_at": now + ttl, "expires_in_seconds": ttl}
    ).encode()


JSON_HEADERS = {"Content-Type": "application/json"}


class Watch:
    """A `knocker watch` subprocess whose stdout lines are collected with arrival times."""

    def __init__(self, args: list[str], home: Path, **env: str) -> None:
        self.process = subprocess.Popen(
            [KNOCKER, "watch", *args],
            env=client_env(home, **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.stderr = ""
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first new line satisfying predicate (all lines are kept in self.lines)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching line within {timeout}s:\n" + self.dump())
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("watch exited early:\n" + self.dump())
            self.lines.append(line)
            if predicate(line):
                return line

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM it and collect the rest of its output; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(5)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def events(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.lines]

    def dump(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr ---\n" + self.stderr

    def output(self) -> str:
        return "\n".join(self.lines) + self.stderr


def is_event(name: str, **fields: str) -> Callable[[str], bool]:
    def match(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return record.get("KNOCKER_EVENT") == name and all(
            record.get(k) == v for k, v in fields.items()
        )

    return match


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnockerProcess]:
    directory = tmp_path_factory.mktemp("client-server")
    config = base_config(directory, security=lenient_limits())
    with KnockerProcess(directory, config) as process:
        yield process


# ---------------------------------------------------------------------------------------
# knock against a real server


@pytest.mark.server
def test_knock_prints_entry_and_expiry_in_human_form(
    server: KnockerProcess, tmp_path: Path
) -> None:
    """A knock prints the whitelisted entry and when it expires; /verify then lets us in."""
    result = run_cli(["knock", "--url", server.url, "--key", TEST_KEY], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Whitelisted 127.0.0.1 until " in result.stdout
    assert "(in 1 h)" in result.stdout  # the phone key's max_ttl is 3600
    assert server.verify() == 200
    assert_secret_absent(result, TEST_KEY)


@pytest.mark.server
def test_knock_json_prints_the_server_body(server: KnockerProcess, tmp_path: Path) -> None:
    """--json prints the server's three members, with the requested TTL honoured."""
    before = time.time()
    result = run_cli(
        ["knock", "--url", server.url, "--key", TEST_KEY, "--ttl", "60", "--json"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["whitelisted_entry"] == "127.0.0.1"
    assert body["expires_in_seconds"] == 60
    # expires_at is the entry's real expiry: an earlier test's longer grant may still hold.
    assert body["expires_at"] >= before + 59
    assert set(body) == {"whitelisted_entry", "expires_at", "expires_in_seconds"}
    assert_secret_absent(result, TEST_KEY)


@pytest.mark.server
def test_knock_warns_when_the_server_caps_the_ttl(server: KnockerProcess, tmp_path: Path) -> None:
    """Asking for more than the key's max_ttl succeeds with a warning naming both times."""
    result = run_cli(
        ["knock", "--url", server.url, "--key", TEST_KEY, "--ttl", "7200", "--json"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["expires_in_seconds"] == 3600
    assert "less than the requested 2 h" in result.stderr
    assert_secret_absent(result, TEST_KEY)


@pytest.mark.server
@pytest.mark.parametrize(
    ("key", "extra", "status", "code", "words"),
    [
        (WRONG_KEY, [], 401, client.EXIT_UNAUTHORIZED, "the API key was not accepted"),
        (TEST_KEY, ["--ip", "198.51.100.7"], 403, client.EXIT_FORBIDDEN, "may not whitelist"),
        (ADMIN_KEY, ["--ip", "10.0.0.0/8"], 400, client.EXIT_OTHER, "refused the request"),
    ],
    ids=["401", "403", "400"],
)
def test_knock_exit_status_names_the_refusal(
    server: KnockerProcess,
    tmp_path: Path,
    key: str,
    extra: list[str],
    status: int,
    code: int,
    words: str,
) -> None:
    """401, 403 and 400 each give their exit status and a message in words, never the key;
    with --json the error is also printed as JSON with the HTTP status."""
    args = ["knock", "--url", server.url, "--key", key, *extra]
    for result in (run_cli(args, tmp_path), run_cli([*args, "--json"], tmp_path)):
        assert result.returncode == code, result.stderr
        assert f"HTTP {status}: " in result.stderr and words in result.stderr
        assert_secret_absent(result, key, TEST_KEY, ADMIN_KEY)
    assert json.loads(result.stdout)["status"] == status


@pytest.mark.server
def test_knock_over_the_rate_limit_exits_6(tmp_path: Path) -> None:
    """A client over its failure budget gets 429, reported with its own exit status."""
    directory = tmp_path / "limited"
    config = base_config(
        directory, security={"knock_rate_limit": {"window_seconds": 600, "failed_requests": 1}}
    )
    with KnockerProcess(directory, config) as limited:
        first = run_cli(["knock", "--url", limited.url, "--key", WRONG_KEY], tmp_path)
        assert first.returncode == client.EXIT_UNAUTHORIZED
        second = run_cli(["knock", "--url", limited.url, "--key", TEST_KEY], tmp_path)
    assert second.returncode == client.EXIT_RATE_LIMITED, second.stderr
    assert "HTTP 429" in second.stderr and "too many knocks" in second.stderr
    assert_secret_absent(first, WRONG_KEY, TEST_KEY)
    assert_secret_absent(second, WRONG_KEY, TEST_KEY)


def test_knock_network_error_exits_3(tmp_path: Path) -> None:
    """Nothing listening on the port: exit 3 and a reason, without the key."""
    port = free_port()
    result = run_cli(["knock", "--url", f"http://127.0.0.1:{port}", "--key", TEST_KEY], tmp_path)
    assert result.returncode == client.EXIT_NETWORK
    assert f"cannot reach http://127.0.0.1:{port}" in result.stderr
    assert_secret_absent(result, TEST_KEY)


def test_knock_without_settings_is_a_usage_error(tmp_path: Path) -> None:
    """No URL or key anywhere: exit 2 with a message naming where settings come from."""
    result = run_cli(["knock"], tmp_path)
    assert result.returncode == client.EXIT_USAGE
    assert "KNOCKER_API_URL" in result.stderr and "api_url" in result.stderr
    result = run_cli(["knock", "--url", "http://127.0.0.1:9"], tmp_path)
    assert result.returncode == client.EXIT_USAGE
    assert "KNOCKER_API_KEY" in result.stderr


def test_knock_help_documents_exit_statuses(tmp_path: Path) -> None:
    """`knocker knock --help` lists every exit status."""
    result = run_cli(["knock", "--help"], tmp_path)
    assert result.returncode == 0
    for line in ("3  network error", "4  401", "5  403", "6  429"):
        assert line in result.stdout


@pytest.mark.server
def test_settings_precedence_flags_then_env_then_file(
    server: KnockerProcess, tmp_path: Path
) -> None:
    """Like the Go CLI (viper): flags beat KNOCKER_* variables, which beat ~/.knocker.yaml."""
    closed = f"http://127.0.0.1:{free_port()}"
    (tmp_path / ".knocker.yaml").write_text(
        yaml.safe_dump({"api_url": server.url, "api_key": WRONG_KEY, "ttl": 120})
    )

    def ttl_of(result: subprocess.CompletedProcess[str]) -> int:
        assert result.returncode == 0, result.stderr
        assert_secret_absent(result, TEST_KEY, WRONG_KEY)
        return int(json.loads(result.stdout)["expires_in_seconds"])

    # The file alone: its URL and (wrong) key are used.
    only_file = run_cli(["knock", "--json"], tmp_path)
    assert only_file.returncode == client.EXIT_UNAUTHORIZED
    assert_secret_absent(only_file, WRONG_KEY)
    # The environment's key and ttl beat the file's; the file still supplies the URL.
    env = {"KNOCKER_API_KEY": TEST_KEY}
    assert ttl_of(run_cli(["knock", "--json"], tmp_path, **env)) == 120
    assert ttl_of(run_cli(["knock", "--json"], tmp_path, KNOCKER_TTL="90", **env)) == 90
    # Flags beat the environment.
    flagged = run_cli(["knock", "--json", "--ttl", "60"], tmp_path, KNOCKER_TTL="90", **env)
    assert ttl_of(flagged) == 60
    wrong_flag = run_cli(["knock", "--json", "--key", WRONG_KEY], tmp_path, **env)
    assert wrong_flag.returncode == client.EXIT_UNAUTHORIZED
    key_file = tmp_path / "key"
    key_file.write_text(TEST_KEY + "\n")
    from_file = run_cli(["knock", "--json", "--key-file", str(key_file)], tmp_path)
    assert ttl_of(from_file) == 120
    # An environment URL beats the file's (here: one where nothing listens).
    env_url = run_cli(["knock"], tmp_path, KNOCKER_API_URL=closed, **env)
    assert env_url.returncode == client.EXIT_NETWORK
    assert ttl_of(run_cli(["knock", "--json", "--url", server.url], tmp_path,
                          KNOCKER_API_URL=closed, **env)) == 120  # fmt: skip


def test_plain_http_to_another_host_warns(
    stubs: Callable[[Responder], Stub], tmp_path: Path
) -> None:
    """http:// to a non-loopback name warns that the key travels unencrypted; loopback does
    not. (The request goes to a loopback HTTP proxy stub, never to that name.)"""
    proxy = stubs(lambda method, path, headers, body: (200, JSON_HEADERS, grant_body()))
    result = run_cli(
        ["knock", "--url", "http://knocker.example.test", "--key", TEST_KEY],
        tmp_path,
        http_proxy=proxy.url,
    )
    assert result.returncode == 0, result.stderr
    assert "plain http to another machine" in result.stderr
    assert [r["path"] for r in proxy.requests] == ["http://knocker.example.test/knock"]
    assert proxy.requests[0]["headers"]["x-api-key"] == TEST_KEY
    assert_secret_absent(result, TEST_KEY)

    local = stubs(lambda method, path, headers, body: (200, JSON_HEADERS, grant_body()))
    quiet = run_cli(["knock", "--url", local.url, "--key", TEST_KEY], tmp_path)
    assert quiet.returncode == 0
    assert "warning" not in quiet.stderr


def test_knock_does_not_follow_redirects(
    stubs: Callable[[Responder], Stub], tmp_path: Path
) -> None:
    """A redirect is reported, not followed: the key is never sent to another address."""
    elsewhere = stubs(lambda method, path, headers, body: (200, JSON_HEADERS, grant_body()))
    redirector = stubs(
        lambda method, path, headers, body: (307, {"Location": elsewhere.url + "/knock"}, b"")
    )
    result = run_cli(["knock", "--url", redirector.url, "--key", TEST_KEY], tmp_path)
    assert result.returncode == client.EXIT_OTHER
    assert "redirect" in result.stderr
    assert elsewhere.requests == []
    assert_secret_absent(result, TEST_KEY)


def test_settings_file_rejects_a_boolean_ttl(tmp_path: Path) -> None:
    """YAML `ttl: yes` is a bool, not a number of seconds: refused with the file named."""
    (tmp_path / ".knocker.yaml").write_text("api_url: http://127.0.0.1:9\napi_key: abc\nttl: yes\n")
    result = run_cli(["knock"], tmp_path)
    assert result.returncode == client.EXIT_USAGE
    assert ".knocker.yaml: ttl: must be an integer" in result.stderr


# ---------------------------------------------------------------------------------------
# in-process units of our own logic


def test_settings_accept_legacy_interval_and_unquoted_digit_keys(tmp_path: Path) -> None:
    """The Go CLI's old `interval` key still sets the check interval; a digit-only key
    written unquoted in YAML is its digits."""
    (tmp_path / ".knocker.yaml").write_text(
        "API_URL: https://knocker.example.test/\napi_key: 123456\ninterval: 2\n"
    )
    args = argparse.Namespace(url=None, key=None, key_file=None, ttl=None, config=None)
    settings = client.load_settings(args, {}, tmp_path)
    assert settings.api_key == "123456"
    assert settings.check_interval_minutes == 2
    assert settings.knock_url == "https://knocker.example.test/knock"
    assert "123456" not in repr(settings)


def test_backoff_grows_exponentially_within_bounds() -> None:
    """Retry delays double from backoff_min up to backoff_max, jitter within [d/2, d]."""
    settings = client.Settings("http://127.0.0.1:9", "k")
    log = client.EventLog(io.StringIO(), False, "k", time.time)

    def delays(r: float) -> list[float]:
        watcher = client.Watcher(
            settings, log, client.urllib_transport, time.time, lambda s: True, lambda: r,
            backoff_min=5, backoff_max=300,
        )  # fmt: skip
        return [watcher.backoff(n) for n in range(1, 10)]

    assert delays(1.0) == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert delays(0.0) == [2.5, 5, 10, 20, 40, 80, 150, 150, 150]


def test_watch_schedule_follows_ttl_and_defaults() -> None:
    """Re-knock at 90 % of the granted TTL; every 5 minutes when the server reports none."""
    settings = client.Settings("http://127.0.0.1:9", "k")
    log = client.EventLog(io.StringIO(), False, "k", time.time)
    watcher = client.Watcher(
        settings, log, client.urllib_transport, time.time, lambda s: True, lambda: 0.5
    )
    assert watcher.refresh_delay(client.Grant("1.2.3.4", 0, 600)) == (540.0, "ttl")
    assert watcher.refresh_delay(client.Grant("1.2.3.4", 0, 0)) == (300.0, "default")


def test_event_log_redacts_the_key_even_if_a_message_held_it() -> None:
    """Whatever reaches the event log, the key is replaced before it is written."""
    out = io.StringIO()
    log = client.EventLog(out, True, "s3cret-key", time.time)
    log.emit("Error", "server said s3cret-key", 3, KNOCKER_ERROR_MSG="echo s3cret-key")
    assert "s3cret-key" not in out.getvalue()
    record = json.loads(out.getvalue())
    assert record["KNOCKER_EVENT"] == "Error" and record["KNOCKER_SCHEMA_VERSION"] == "1"


# ---------------------------------------------------------------------------------------
# watch


@pytest.mark.server
def test_watch_reknocks_at_90_percent_of_the_ttl_so_access_never_lapses(
    tmp_path: Path,
) -> None:
    """With a 6 s TTL, watch knocks again about 5.4 s after each grant, and /verify keeps
    answering 200 well past the first grant's expiry."""
    directory = tmp_path / "server"
    with KnockerProcess(directory, base_config(directory, security=lenient_limits())) as server:
        watch = Watch(["--url", server.url, "--key", TEST_KEY, "--ttl", "6", "--json"], tmp_path)
        try:
            watch.wait_for(is_event("WhitelistApplied"), 15)
            started = time.monotonic()
            verdicts = []
            while time.monotonic() - started < 13:
                verdicts.append(server.verify())
                time.sleep(0.25)
            code = watch.terminate()
        finally:
            watch.kill()
    assert code == 0, watch.dump()
    assert set(verdicts) == {200}, verdicts  # a lapse would show as 401 after ~6 s
    knocks = [
        float(e["KNOCKER_TIME_UNIX"])
        for e in watch.events()
        if e.get("KNOCKER_EVENT") == "KnockTriggered" and e["KNOCKER_RESULT"] == "success"
    ]
    assert len(knocks) >= 3, watch.dump()
    gaps = [b - a for a, b in zip(knocks, knocks[1:], strict=False)]
    assert all(4.8 <= gap <= 7.0 for gap in gaps), gaps
    applied = [e for e in watch.events() if e.get("KNOCKER_EVENT") == "WhitelistApplied"]
    assert all(
        e["KNOCKER_TTL_SEC"] == "6" and e["KNOCKER_WHITELIST_IP"] == "127.0.0.1" for e in applied
    )
    assert TEST_KEY not in watch.output()


@pytest.mark.server
def test_watch_with_ip_check_url_knocks_only_when_the_address_changes(
    stubs: Callable[[Responder], Stub], tmp_path: Path
) -> None:
    """Polling a (stub) IP service every check_interval, watch knocks at start and once per
    change of the reported address; a garbage answer is an Error event, not a change."""
    answers = ["198.51.100.1"] * 3 + ["198.51.100.2"] * 3 + ["<html>portal</html>"]
    answers += ["198.51.100.2"] + ["198.51.100.3"] * 100
    polls = iter(answers)

    def ip_service(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        return 200, {"Content-Type": "text/plain"}, (next(polls) + "\n").encode()

    ip_stub = stubs(ip_service)
    directory = tmp_path / "server"
    with KnockerProcess(directory, base_config(directory, security=lenient_limits())) as server:
        forwarded: list[int] = []

        def forward(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
            status, reply_headers, reply = server.request(
                method, path, {"X-Api-Key": headers.get("x-api-key", ""),
                               "Content-Type": headers.get("content-type", "")}, body
            )  # fmt: skip
            forwarded.append(status)
            return status, {"Content-Type": reply_headers.get("Content-Type", "")}, reply

        knock_counter = stubs(forward)
        watch = Watch(
            ["--url", knock_counter.url, "--key", TEST_KEY, "--json",
             "--ip-check-url", ip_stub.url + "/ip", "--check-interval", "0.004"],
            tmp_path,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while len(ip_stub.requests) < 13 and time.monotonic() < deadline:
                time.sleep(0.05)
            code = watch.terminate()
        finally:
            watch.kill()
        assert server.verify() == 200  # the forwarded knocks reached the real server
    assert code == 0, watch.dump()
    assert len(ip_stub.requests) >= 13
    assert forwarded == [200, 200, 200], watch.dump()
    knocks = knock_counter.matching("POST", "/knock")
    # The server sees our own address; the IP service only tells us when to knock.
    assert all(json.loads(r["body"]) == {} for r in knocks)
    events = watch.events()
    assert {e["KNOCKER_EVENT"] for e in events if "KNOCKER_EVENT" in e} <= GO_CLI_EVENTS
    errors = [e for e in events if e.get("KNOCKER_EVENT") == "Error"]
    assert [e["KNOCKER_ERROR_CODE"] for e in errors] == ["ip_lookup_failed"]
    assert any("changed from 198.51.100.1 to 198.51.100.2" in e["MESSAGE"] for e in events)
    assert any("changed from 198.51.100.2 to 198.51.100.3" in e["MESSAGE"] for e in events)
    assert TEST_KEY not in watch.output()


def test_watch_backs_off_exponentially_while_knocks_fail(
    stubs: Callable[[Responder], Stub], tmp_path: Path
) -> None:
    """Against a server that keeps failing, retries come after growing, bounded delays."""
    failing = stubs(
        lambda method, path, headers, body: (
            503, JSON_HEADERS, b'{"error": "Firewall unavailable"}'
        )
    )  # fmt: skip
    watch = Watch(
        ["--url", failing.url, "--key", TEST_KEY, "--json",
         "--backoff-min", "0.2", "--backoff-max", "1.6"],
        tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(failing.requests) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        code = watch.terminate()
    finally:
        watch.kill()
    assert code == 0
    times = [r["time"] for r in failing.requests]
    assert len(times) >= 7, watch.dump()
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)][:6]
    # Equal jitter: the n-th delay lies in [d/2, d] with d = min(0.2 * 2**(n-1), 1.6).
    ceilings = [0.2, 0.4, 0.8, 1.6, 1.6, 1.6]
    for gap, ceiling in zip(gaps, ceilings, strict=True):
        assert ceiling / 2 - 0.02 <= gap <= ceiling + 0.5, (gaps, watch.dump())
    assert gaps[3] > 2 * gaps[0]
    events = watch.events()
    failures = [e for e in events if e.get("KNOCKER_EVENT") == "Error"]
    assert failures and all(e["KNOCKER_ERROR_CODE"] == "knock_failed" for e in failures)
    assert all(e["KNOCKER_HTTP_STATUS"] == "503" for e in failures)
    assert any(e.get("KNOCKER_CADENCE_SOURCE") == "backoff" for e in events)
    assert TEST_KEY not in watch.output()


def test_watch_reports_expiry_when_the_reknock_fails(
    stubs: Callable[[Responder], Stub], tmp_path: Path
) -> None:
    """A 2 s grant that cannot be renewed ends in a WhitelistExpired event."""
    replies = iter([(200, JSON_HEADERS, grant_body(ttl=2))])

    def respond(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        return next(replies, (500, JSON_HEADERS, b'{"error": "boom"}'))

    stub = stubs(respond)
    watch = Watch(
        ["--url", stub.url, "--key", TEST_KEY, "--json", "--backoff-min", "0.5"], tmp_path
    )
    try:
        expired = json.loads(watch.wait_for(is_event("WhitelistExpired"), 15))
        code = watch.terminate()
    finally:
        watch.kill()
    assert code == 0
    assert expired["KNOCKER_WHITELIST_IP"] == "127.0.0.1"
    assert int(expired["KNOCKER_EXPIRED_UNIX"]) <= time.time()


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
    assert watch.lines[-2].endswith("Service state: stopping")
    assert watch.lines[-1].endswith("Service state: stopped")
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
    assert names[-2:] == ["ServiceState", "ServiceState"]
    assert [e["KNOCKER_SERVICE_STATE"] for e in events[-2:]] == ["stopping", "stopped"]
    assert {"KnockTriggered", "WhitelistApplied", "NextKnockUpdated", "StatusSnapshot"} <= set(
        names
    )
    assert set(names) <= GO_CLI_EVENTS
    for event in events:
        assert all(isinstance(v, str) for v in event.values())
        assert event["SYSLOG_IDENTIFIER"] == "knocker"
    applied = next(e for e in events if e["KNOCKER_EVENT"] == "WhitelistApplied")
    assert applied["KNOCKER_TTL_SEC"] == "600" and applied["KNOCKER_SOURCE"] == "schedule"
    next_knock = next(e for e in events if e["KNOCKER_EVENT"] == "NextKnockUpdated")
    delay = int(next_knock["KNOCKER_NEXT_AT_UNIX"]) - float(next_knock["KNOCKER_TIME_UNIX"])
    assert 530 <= delay <= 541  # 90 % of 600 s
    assert TEST_KEY not in watch.output()


def test_watch_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """deploy/systemd/knocker-watch.service is a valid user unit running `knocker watch`,
    reading the Go CLI's environment file, stopped by SIGTERM."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze (Debian package systemd) is needed")
        pytest.skip("systemd-analyze not installed")
    unit = Path(__file__).resolve().parent.parent / "deploy/systemd/knocker-watch.service"
    text = unit.read_text()
    assert "ExecStart=%h/.local/bin/knocker watch\n" in text
    assert "EnvironmentFile=-%h/.config/knocker/env\n" in text
    assert "KillSignal=SIGTERM\n" in text and "WantedBy=default.target\n" in text
    # %h is the user's home: give the unit one where ~/.local/bin/knocker exists.
    (tmp_path / ".local/bin").mkdir(parents=True)
    (tmp_path / ".local/bin/knocker").symlink_to(KNOCKER)
    (tmp_path / "run").mkdir(mode=0o700)
    result = subprocess.run(
        [analyze, "--user", "verify", str(unit)],
        env={**client_env(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "knocker-watch.service" not in result.stdout + result.stderr  # no warnings
