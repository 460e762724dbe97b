"""Faults a running service must survive (issue 11, items 3, 6 and 9): SIGHUP with bad
files, deep JSON, unexpected exceptions, gunicorn's forwarder headers, startup warnings.
Most run a real `knocker serve`; the exception path is exercised through WSGI directly."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp

from knocker.app import build_app
from knocker.config import load_config_text
from tests.serverproc import TEST_KEY, KnockerProcess, base_config

KEEPING = "SIGHUP: keeping the running config"
DEEP = b'{"ttl": ' + b"[" * 990 + b"]" * 990 + b"}"


def sighup_and_wait(server: KnockerProcess, marker: str, timeout: float = 15.0) -> str:
    """Send SIGHUP to the master; return the log once `marker` appears in what follows."""
    assert server.process is not None
    before = len(server.log())
    os.kill(server.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log()[before:]
        if marker in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"no {marker!r} after SIGHUP:\n{server.log()[before:]}")


# The bad files of issue 11 item 3, each as (name, text of knocker.yaml's extra section).
BAD_FILES: dict[str, Any] = {
    "timestamp-tag": "security: {excluded_paths: [!!timestamp notatime]}\n",
    "unknown-tag": "security: {excluded_paths: [!whatever /x]}\n",
    "bool-tag": "cors: {allowed_origin: !!bool maybe}\n",
    "openapi-in-missing-directory": None,  # written below: depends on tmp_path
    "not-yaml": "api_keys: [\n",
}


def bad_text(name: str, good: str, tmp_path: Path) -> str:
    extra = BAD_FILES[name]
    if extra is None:
        missing = tmp_path / "no-such-directory" / "openapi.json"
        extra = f"documentation: {{enabled: true, openapi_output_path: {missing}}}\n"
    return good + extra


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_sighup_with_a_bad_file_keeps_the_running_config_and_says_why(
    tmp_path: Path, name: str
) -> None:
    """SIGHUP with each bad file: the master lives, the log says why, and knocks and
    /verify keep working with the running config."""
    with KnockerProcess(tmp_path, workers=2) as server:
        good = server.config_path.read_text()
        server.config_path.write_text(bad_text(name, good, tmp_path))
        text = sighup_and_wait(server, KEEPING)
        assert "Traceback" not in text
        time.sleep(1)  # the workers gunicorn restarts on SIGHUP are up again by now
        assert server.process is not None and server.process.poll() is None
        assert server.knock()[0] == 200
        assert server.verify() == 200
        # and a good file afterwards is taken
        server.config_path.write_text(good)
        sighup_and_wait(server, "SIGHUP: config")


@pytest.mark.server
def test_deep_json_is_a_counted_400_with_cors(tmp_path: Path) -> None:
    """~990 nested arrays in a 4 KB body from a key holder: a JSON 400 with CORS, counted
    against the failure budget (the next one is refused with 429)."""
    config = base_config(
        tmp_path, security={"knock_rate_limit": {"failed_requests": 2, "window_seconds": 60}}
    )
    with KnockerProcess(tmp_path, config) as server:
        headers = {"X-Api-Key": TEST_KEY, "Content-Type": "application/json"}
        for _ in range(2):
            status, answer, body = server.request("POST", "/knock", headers, DEEP)
            assert status == 400
            assert "nested too deeply" in json.loads(body)["error"]
            assert "Access-Control-Allow-Origin" in answer
        assert server.request("POST", "/knock", headers, DEEP)[0] == 429
        assert "Traceback" not in server.log()


@pytest.mark.server
def test_gunicorn_forwarder_headers_from_loopback_change_nothing(tmp_path: Path) -> None:
    """SCRIPT_NAME / X-Forwarded-Prefix from 127.0.0.1 (gunicorn's default trusted
    forwarder) do not reach routing: /verify answers 401/200, never 500."""
    with KnockerProcess(tmp_path) as server:
        sneaky = {
            "SCRIPT_NAME": "/elsewhere",
            "X-Forwarded-Prefix": "/elsewhere",
            "Script-Name": "/elsewhere",
        }
        assert server.verify(headers=sneaky) == 401
        assert server.knock()[0] == 200
        assert server.verify(headers=sneaky) == 200


@pytest.mark.server
def test_wide_trusted_proxies_and_short_keys_warn_at_startup_without_the_key(
    tmp_path: Path,
) -> None:
    """trusted_proxies 10.0.0.0/8 and a 10-character key start the service with a WARNING
    naming the setting (never the key's text)."""
    short = "abc123XYZ9"
    config = base_config(tmp_path, server={"trusted_proxies": ["10.0.0.0/8", "fd00::/8"]})
    config["api_keys"].append({"name": "tiny", "key": short, "max_ttl": 60})
    with KnockerProcess(tmp_path, config) as server:
        assert server.knock(key=short)[0] == 200
        log = server.log()
    assert "10.0.0.0/8 is wider than a /16" in log
    assert "fd00::/8 is wider than a /64" in log
    assert "api_keys[2] (tiny): shorter than 16" in log
    assert short not in log


@pytest.mark.server
def test_malformed_chunked_body_is_a_400_not_a_500(tmp_path: Path) -> None:
    """A chunked knock body with a bad chunk size is the client's fault: a JSON 400."""
    with (
        KnockerProcess(tmp_path) as server,
        socket.create_connection((server.host, server.port), timeout=10) as sock,
    ):
        sock.sendall(
            b"POST /knock HTTP/1.1\r\nHost: x\r\nX-Api-Key: "
            + TEST_KEY.encode()
            + b"\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
        )
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 400"), head


# --- unexpected exceptions (WSGI, no server) ---------------------------------------------


def unit_app(tmp_path: Path) -> TestApp:
    config = load_config_text(f"""
api_keys: [{{name: phone, key: {TEST_KEY}, max_ttl: 3600}}]
whitelist: {{storage_path: {tmp_path / "whitelist.json"}}}
cors: {{allowed_origin: "https://knock.example.com"}}
""")
    return TestApp(build_app(config, clock=lambda: 1_700_000_000.0))


def test_unexpected_exception_on_knock_is_a_json_500_with_cors_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug inside a knock answers a JSON 500 carrying the CORS header, with one ERROR
    line (and its traceback) in the log."""
    client = unit_app(tmp_path)
    app = client.app

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.store, "knock", broken)
    with caplog.at_level(logging.ERROR, logger="knocker"):
        response = client.post(
            "/knock",
            headers={"X-Api-Key": TEST_KEY},
            status=500,
            extra_environ={"REMOTE_ADDR": "203.0.113.7"},
        )
    assert response.content_type == "application/json"
    assert response.json == {"error": "Internal error; nothing was granted"}
    assert response.headers["Access-Control-Allow-Origin"] == "https://knock.example.com"
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    app.close()


def test_unexpected_exception_on_verify_is_a_json_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/verify's hot path fails the same way: a JSON 500 (a proxy refuses), no HTML."""
    client = unit_app(tmp_path)
    app = client.app

    def broken(*args: object) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.store, "allows", broken)
    response = client.get("/verify", status=500, extra_environ={"REMOTE_ADDR": "203.0.113.7"})
    assert response.json["error"].startswith("Internal error")
    app.close()
