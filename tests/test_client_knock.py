"""`knocker knock` as a user runs it: the console script as a subprocess against a real
`knocker serve` on loopback or small loopback stubs; and the settings it resolves."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from knocker.client import knock as client
from knocker.client.grants import grants_table
from knocker.client.settings import load_settings
from tests.clientsupport import (
    JSON_HEADERS,
    WRONG_KEY,
    Responder,
    Stub,
    assert_secret_absent,
    grant_body,
    lenient_limits,
    run_cli,
    server,
    stubs,
)
from tests.serverproc import ADMIN_KEY, TEST_KEY, KnockerProcess, base_config, free_port

__all__ = ["server", "stubs"]  # fixtures

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


def signed_out(server: KnockerProcess) -> None:
    """End every key's grant of 127.0.0.1 (earlier tests' longer grants would otherwise
    be what expires_in_seconds reports: the time actually left)."""
    for key in (TEST_KEY, ADMIN_KEY):
        assert server.request("DELETE", "/knock", {"X-Api-Key": key})[0] in (200, 404)
    assert server.verify() == 401


@pytest.mark.server
def test_knock_json_prints_the_server_body(server: KnockerProcess, tmp_path: Path) -> None:
    """--json prints the server's three members, with the requested TTL honoured."""
    signed_out(server)
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
        signed_out(server)  # the next knock's answer is its own TTL
        assert_secret_absent(result, TEST_KEY, WRONG_KEY)
        return int(json.loads(result.stdout)["expires_in_seconds"])

    # The file alone: its URL and (wrong) key are used.
    only_file = run_cli(["knock", "--json"], tmp_path)
    assert only_file.returncode == client.EXIT_UNAUTHORIZED
    assert_secret_absent(only_file, WRONG_KEY)
    # The environment's key and ttl beat the file's; the file still supplies the URL.
    env = {"KNOCKER_API_KEY": TEST_KEY}
    signed_out(server)
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
    settings = load_settings(args, {}, tmp_path)
    assert settings.api_key == "123456"
    assert settings.check_interval_minutes == 2
    assert settings.knock_url == "https://knocker.example.test/knock"
    assert "123456" not in repr(settings)


# ---------------------------------------------------------------------------------------
# sign-out and the grants API (knocker/client/grants.py) against a real server

OPS_KEY = "ops-key-client-0123456789abcdefghijklmnopqrstuv"


@pytest.fixture(scope="module")
def grants_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnockerProcess]:
    directory = tmp_path_factory.mktemp("grants-server")
    config = base_config(directory, security=lenient_limits())
    config["api_keys"].append({"name": "ops", "key": OPS_KEY, "max_ttl": 600, "admin": True})
    with KnockerProcess(directory, config) as process:
        yield process


@pytest.mark.server
def test_knock_revoke_signs_this_machine_out(grants_server: KnockerProcess, tmp_path: Path) -> None:
    """`knocker knock --revoke` ends this key's grant of this machine; /verify refuses."""
    key_file = tmp_path / "key"
    key_file.write_text(TEST_KEY + "\n")
    common = ["--url", grants_server.url + "/", "--key-file", str(key_file)]
    assert run_cli(["knock", *common], tmp_path).returncode == 0
    assert grants_server.verify() == 200
    result = run_cli(["knock", "--revoke", *common], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1 (by phone)" in result.stdout
    assert grants_server.verify() == 401
    again = run_cli(["knock", "--revoke", "--json", *common], tmp_path)
    assert again.returncode == 7 and json.loads(again.stdout)["status"] == 404
    assert_secret_absent(result, TEST_KEY)
    assert_secret_absent(again, TEST_KEY)


@pytest.mark.server
def test_grants_list_and_revoke(grants_server: KnockerProcess, tmp_path: Path) -> None:
    """`knocker grants list` shows a table (or --json) and `grants revoke` ends a grant,
    with the key from the environment; a non-admin key exits 5 (403)."""
    url = ["--url", grants_server.url]
    assert (
        run_cli(["knock", *url, "--key", ADMIN_KEY, "--ip", "10.7.0.0/24"], tmp_path).returncode
        == 0
    )
    table = run_cli(["grants", "list", *url], tmp_path, KNOCKER_API_KEY=OPS_KEY)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ENTRY", "KEY", "HOW", "EXPIRES", "LEFT", "SCOPE"]
    assert any(row.split()[:3] == ["10.7.0.0/24", "admin", "remote"] for row in rows)
    listed = run_cli(["grants", "list", "--json", *url], tmp_path, KNOCKER_API_KEY=OPS_KEY)
    assert {"entry": "10.7.0.0/24", "key_name": "admin"}.items() <= next(
        g for g in json.loads(listed.stdout)["grants"] if g["entry"] == "10.7.0.0/24"
    ).items()
    revoked = run_cli(["grants", "revoke", "10.7.0.0/24", *url], tmp_path, KNOCKER_API_KEY=OPS_KEY)
    assert revoked.returncode == 0, revoked.stderr
    assert "Ended 10.7.0.0/24 (by admin)." in revoked.stdout
    gone = run_cli(["grants", "revoke", "10.7.0.0/24", *url], tmp_path, KNOCKER_API_KEY=OPS_KEY)
    assert gone.returncode == 7
    refused = run_cli(["grants", "list", *url], tmp_path, KNOCKER_API_KEY=TEST_KEY)
    assert refused.returncode == 5 and "admin: true" in refused.stderr
    for result in (table, listed, revoked, gone, refused):
        assert_secret_absent(result, OPS_KEY, TEST_KEY)


def test_grants_table_shows_host_and_port_scopes() -> None:
    """The SCOPE column: hosts ("all hosts" when not host-scoped), then the ports of a
    port-scoped grant."""
    grants = [
        {
            "entry": f"192.0.2.{n}",
            "key_name": "k",
            "how": "knock",
            "expires_at": 2_000_000_000,
            "scope": scope,
        }
        for n, scope in enumerate(
            [
                None,
                {"hosts": ["app.example.com"], "ports": None},
                {"hosts": None, "ports": ["22/tcp"]},
                {"hosts": ["a.example.com"], "ports": ["22/tcp"]},
            ]
        )
    ]
    lines = grants_table(grants, 1_999_999_000).splitlines()[1:]
    expected = [
        "all hosts",
        "app.example.com",
        "all hosts ports 22/tcp",
        "a.example.com ports 22/tcp",
    ]
    assert [line.rstrip().endswith("  " + text) for line, text in zip(lines, expected)] == [
        True
    ] * 4
