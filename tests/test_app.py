"""knocker.app through WebTest: the HTTP contract of docs/api.md, its rate limiting and the
knock log line. (Header-name case is folded by the WSGI server before the app sees it:
tests/test_server.py checks it on the wire.) The clock is injected; storage lives in a tmp
directory."""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp, TestRequest, TestResponse

import knocker.app
from knocker.app import App, build_app
from knocker.config import load_config_text
from knocker.errors import FirewallError, FirewallUnavailable
from knocker.firewall import NullFirewall

NOW = 1_700_000_000.0
USER_KEY = "user-key-3f9a1c7e5b2d8046"
ADMIN_KEY = "admin-key-8d2e6b0a4c9f1735"
OPS_KEY = "ops-key-5c1e9a7d3b6f2048"  # admin: true (the grants API)
ORIGIN = "https://knock.example.com"
CLIENT = "203.0.113.7"
OTHER = "198.51.100.23"
PROXY = "10.9.9.9"
KNOCK_KEYS = {"whitelisted_entry", "expires_at", "expires_in_seconds"}


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedFirewall(NullFirewall):
    """A firewall whose grant can fail and whose readiness can be withdrawn."""

    def __init__(self) -> None:
        self.fail_with: FirewallError | None = None
        self.reason: str | None = None
        self.granted: list[tuple[str, int]] = []
        self.revoked: list[str] = []

    def grant(self, entry: str, ttl: int) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.granted.append((entry, ttl))

    def revoke(self, entries: Iterable[str]) -> None:
        self.revoked.extend(entries)

    def problem(self) -> str | None:
        return self.reason


class Service:
    """One Knocker app under WebTest, with a fake clock and a scripted firewall."""

    def __init__(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        successes: int = 20,
        failures: int = 30,
        docs: bool = False,
    ) -> None:
        self.directory = tmp_path / "state"
        self.openapi_path = tmp_path / "docs" / "openapi.json"
        self.openapi_path.parent.mkdir(exist_ok=True)
        self.clock = Clock()
        self.firewall = ScriptedFirewall()
        monkeypatch.setattr(knocker.app, "create_firewall", lambda config, state: self.firewall)
        self.config = load_config_text(f"""
api_keys:
  - name: phone
    key: {USER_KEY}
    max_ttl: 3600
  - name: admin
    key: {ADMIN_KEY}
    max_ttl: 86400
    allow_remote_whitelist: true
  - name: ops
    key: {OPS_KEY}
    max_ttl: 600
    admin: true
server:
  trusted_proxies: ["{PROXY}", "fd00::/8"]
security:
  always_allowed_ips: ["192.0.2.0/24"]
  excluded_paths: ["/public"]
  excluded_paths_by_host:
    docs.example.com: ["/"]
  knock_rate_limit:
    window_seconds: 60
    successful_requests: {successes}
    failed_requests: {failures}
whitelist:
  storage_path: {self.directory / "whitelist.json"}
cors:
  allowed_origin: {ORIGIN}
documentation:
  enabled: {"true" if docs else "false"}
  openapi_output_path: {self.openapi_path}
""")
        self.app: App = build_app(self.config, clock=self.clock)
        self.web = TestApp(self.app, extra_environ={"REMOTE_ADDR": CLIENT})

    def knock(
        self,
        key: str | None = USER_KEY,
        payload: object = None,
        *,
        raw: bytes | None = None,
        content_type: str | None = None,
        peer: str = CLIENT,
        headers: dict[str, str] | None = None,
    ) -> TestResponse:
        sent: dict[str, str] = {}
        if key is not None:
            sent["X-Api-Key"] = key
        if payload is not None:
            raw = json.dumps(payload).encode()
            content_type = content_type or "application/json"
        if content_type is not None:
            sent["Content-Type"] = content_type
        sent.update(headers or {})
        return self.web.post(
            "/knock",
            params=raw or b"",
            headers=sent,
            extra_environ={"REMOTE_ADDR": peer},
            expect_errors=True,
        )

    def verify(
        self, peer: str = CLIENT, method: str = "GET", headers: dict[str, str] | None = None
    ) -> TestResponse:
        return self.web.request(
            "/verify",
            method=method,
            headers=headers or {},
            environ={"REMOTE_ADDR": peer},
            expect_errors=True,
        )

    def send(self, request: TestRequest) -> TestResponse:
        request.environ.setdefault("REMOTE_ADDR", CLIENT)
        return self.web.do_request(request, status="*")

    def file(self) -> dict[str, int]:
        path = self.directory / "whitelist.json"
        return json.loads(path.read_text()) if path.exists() else {}


class Services:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.made: list[Service] = []

    def __call__(self, **options: Any) -> Service:
        service = Service(self.tmp_path, self.monkeypatch, **options)
        self.made.append(service)
        return service


@pytest.fixture
def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    services = Services(tmp_path, monkeypatch)
    yield services
    for service in services.made:
        service.app.close()


@pytest.fixture
def service(make: Services) -> Service:
    return make()


def error_body(response: TestResponse) -> str:
    assert response.content_type == "application/json"
    body = response.json
    assert set(body) == {"error"}
    assert isinstance(body["error"], str) and body["error"]
    return str(body["error"])


def chunked(body: bytes, key: str = USER_KEY) -> TestRequest:
    """A POST /knock whose body arrives chunked: no Content-Length, just the stream."""
    return TestRequest.blank(
        "/knock",
        method="POST",
        environ={
            "HTTP_TRANSFER_ENCODING": "chunked",
            "HTTP_X_API_KEY": key,
            "CONTENT_TYPE": "application/json",
            "wsgi.input": io.BytesIO(body),
            "REMOTE_ADDR": CLIENT,
        },
    )


# --- 200 --------------------------------------------------------------------------------


def test_knock_whitelists_the_client_with_the_documented_body(service: Service) -> None:
    """200 carries exactly whitelisted_entry, expires_at and expires_in_seconds (ints)."""
    response = service.knock()
    assert response.status_int == 200
    assert response.content_type == "application/json"
    body = response.json
    assert set(body) == KNOCK_KEYS
    assert body["whitelisted_entry"] == CLIENT
    assert type(body["expires_at"]) is int and type(body["expires_in_seconds"]) is int
    assert body == {
        "whitelisted_entry": CLIENT,
        "expires_at": int(NOW) + 3600,
        "expires_in_seconds": 3600,
    }
    assert service.verify().status_int == 200


def test_expires_in_seconds_is_the_effective_ttl(service: Service) -> None:
    """A requested ttl above max_ttl is capped, below it is honoured."""
    assert service.knock(payload={"ttl": 60}).json["expires_in_seconds"] == 60
    assert service.knock(payload={"ttl": 999_999}).json["expires_in_seconds"] == 3600


def test_expires_at_is_rounded_up_from_a_fractional_clock(service: Service) -> None:
    """A grant at a fractional second never ends before now + ttl."""
    service.clock.now = NOW + 0.4
    assert service.knock(payload={"ttl": 60}).json["expires_at"] == int(NOW) + 61


def test_re_knock_reports_the_actual_longer_expiry(service: Service) -> None:
    """A shorter re-knock keeps and reports the existing, later expiry."""
    first = service.knock(payload={"ttl": 3000}).json
    second = service.knock(payload={"ttl": 10}).json
    assert second["expires_at"] == first["expires_at"]


def test_re_knock_that_keeps_a_longer_grant_reports_the_time_actually_left(
    service: Service,
) -> None:
    """expires_in_seconds is expires_at minus now when the knock keeps a longer grant
    (the published clients show it next to expires_at)."""
    first = service.knock(payload={"ttl": 3000}).json
    service.clock.now = NOW + 100.5
    second = service.knock(payload={"ttl": 10}).json
    assert second["expires_at"] == first["expires_at"] == int(NOW) + 3000
    assert second["expires_in_seconds"] == 2899  # whole seconds left, never overstated


def test_fresh_knock_at_a_fractional_second_reports_its_ttl(service: Service) -> None:
    """A knock that sets the expiry reports its effective TTL, not the rounding second."""
    service.clock.now = NOW + 0.4
    assert service.knock(payload={"ttl": 60}).json["expires_in_seconds"] == 60


@pytest.mark.parametrize("path", ["//knock", "///knock"])
def test_repeated_leading_slashes_reach_knock(service: Service, path: str) -> None:
    """A base URL with a trailing slash (`http://host/` + `/knock`) still knocks."""
    response = service.web.post(
        path, params=b"", headers={"X-Api-Key": USER_KEY}, expect_errors=True
    )
    assert response.status_int == 200
    assert response.json["whitelisted_entry"] == CLIENT
    assert service.web.get("//verify", expect_errors=True).status_int == 200
    assert service.web.get("//health").json == {"status": "ok"}


def test_slashes_inside_a_path_are_not_folded(service: Service) -> None:
    """Only leading slashes fold: /knock/ and /kn//ock stay unknown."""
    for path in ("/knock/", "/kn//ock"):
        assert service.web.get(path, expect_errors=True).status_int == 404


def test_knock_is_on_disk_when_200_is_sent(service: Service) -> None:
    """The entry is in the fsynced journal by the time the 200 arrives (whitelist.json
    follows in the background)."""
    service.knock()
    journal = (service.directory / "whitelist.json.journal").read_bytes()
    assert f"+ {CLIENT} {int(NOW) + 3600} ".encode() in journal


def test_json_with_charset_parameter_is_accepted(service: Service) -> None:
    """Content-Type: application/json; charset=utf-8 is JSON."""
    response = service.knock(raw=b'{"ttl": 5}', content_type="application/json; charset=utf-8")
    assert response.status_int == 200


def test_ipv4_mapped_peer_is_whitelisted_as_ipv4(service: Service) -> None:
    """A dual-stack socket's ::ffff:a.b.c.d peer is whitelisted as a.b.c.d."""
    response = service.knock(peer=f"::ffff:{CLIENT}")
    assert response.json["whitelisted_entry"] == CLIENT
    assert service.verify(peer=CLIENT).status_int == 200


def test_admin_key_whitelists_a_named_network(service: Service) -> None:
    """An admin key's ip_address CIDR is whitelisted as its canonical network."""
    response = service.knock(ADMIN_KEY, {"ip_address": "10.20.30.40/24", "ttl": 120})
    assert response.json["whitelisted_entry"] == "10.20.30.0/24"
    assert response.json["expires_in_seconds"] == 120
    assert service.verify(peer="10.20.30.99").status_int == 200
    assert service.verify(peer=CLIENT).status_int == 401


def test_knock_via_trusted_proxy_whitelists_the_forwarded_client(service: Service) -> None:
    """Behind a trusted proxy, the right-most untrusted X-Forwarded-For hop is whitelisted."""
    response = service.knock(peer=PROXY, headers={"X-Forwarded-For": f"1.1.1.1, {CLIENT}"})
    assert response.json["whitelisted_entry"] == CLIENT


def test_spoofed_forwarded_for_on_knock_from_untrusted_peer_is_ignored(service: Service) -> None:
    """An untrusted peer whitelists itself, never the address its X-Forwarded-For claims."""
    response = service.knock(peer=OTHER, headers={"X-Forwarded-For": CLIENT})
    assert response.json["whitelisted_entry"] == OTHER
    assert service.verify(peer=CLIENT).status_int == 401


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [None, "", "wrong", USER_KEY[:-1], USER_KEY + "0"],
    ids=["missing", "empty", "wrong", "prefix", "extended"],
)
def test_missing_or_unknown_key_is_401(service: Service, key: str | None) -> None:
    """No key, an empty key, a wrong key, a prefix or an extension of a key: 401."""
    response = service.knock(key)
    assert response.status_int == 401
    error_body(response)
    assert service.verify().status_int == 401


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b"{", "application/json"),
        (b"[]", "application/json"),
        (b'{"ttl": 0}', "application/json"),
        (b'{"ttl": true}', "application/json"),
        (b'{"ttl": "60"}', "application/json"),
        (b'{"ttl": 1.5}', "application/json"),
        (b'{"extra": 1}', "application/json"),
        (b'{"ttl": 5, "ttl": 6}', "application/json"),
        (b'{"ttl": 5, "x": "\xff"}', "application/json"),
    ],
    ids=[
        "syntax",
        "array",
        "ttl-zero",
        "ttl-bool",
        "ttl-string",
        "ttl-float",
        "unknown",
        "duplicate",
        "bad-utf8",
    ],
)
def test_invalid_body_is_400(service: Service, raw: bytes, content_type: str) -> None:
    """Bodies that are not a valid knock object are 400 with {"error": ...}."""
    response = service.knock(raw=raw, content_type=content_type)
    assert response.status_int == 400
    error_body(response)


def test_unresolved_client_is_400(service: Service) -> None:
    """A trusted proxy that sends no X-Forwarded-For leaves the client unresolved: 400."""
    response = service.knock(peer=PROXY)
    assert response.status_int == 400
    error_body(response)
    assert service.file() == {}


def test_non_admin_key_naming_an_address_is_403(service: Service) -> None:
    """A key without allow_remote_whitelist gets 403 for ip_address, even its own."""
    for address in (OTHER, CLIENT):
        response = service.knock(payload={"ip_address": address})
        assert response.status_int == 403
        error_body(response)
    assert service.file() == {}


def test_too_wide_network_is_400(service: Service) -> None:
    """An admin knock for more than 65536 IPv4 addresses or a shorter-than-/64 IPv6 is 400."""
    assert service.knock(ADMIN_KEY, {"ip_address": "10.0.0.0/15"}).status_int == 400
    assert service.knock(ADMIN_KEY, {"ip_address": "2001:db8::/63"}).status_int == 400
    assert service.knock(ADMIN_KEY, {"ip_address": "10.0.0.0/16"}).status_int == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH"])
def test_other_methods_on_knock_are_405_with_allow(service: Service, method: str) -> None:
    """Methods other than POST, DELETE and OPTIONS on /knock are 405 with an Allow header."""
    response = service.web.request("/knock", method=method, expect_errors=True)
    assert response.status_int == 405
    assert "POST" in response.headers["Allow"]
    error_body(response)


def test_body_over_4096_bytes_by_content_length_is_413(service: Service) -> None:
    """A Content-Length above 4096 is 413 and grants nothing."""
    raw = json.dumps({"ttl": 60, "ip_address": None}).encode().ljust(4097)
    response = service.knock(raw=raw, content_type="application/json")
    assert response.status_int == 413
    error_body(response)
    assert service.verify().status_int == 401


def test_body_of_exactly_4096_bytes_is_accepted(service: Service) -> None:
    """4096 bytes is within the bound."""
    raw = b'{"ttl": 60}'.ljust(4096)
    assert service.knock(raw=raw, content_type="application/json").status_int == 200


def test_chunked_body_over_4096_bytes_is_413(service: Service) -> None:
    """A chunked body is counted as it is read: more than 4096 bytes is 413."""
    response = service.send(chunked(b'{"ttl": 60}'.ljust(5000)))
    assert response.status_int == 413
    error_body(response)
    assert service.verify().status_int == 401


def test_small_chunked_body_is_read(service: Service) -> None:
    """A chunked body within the bound is read and honoured."""
    response = service.send(chunked(b'{"ttl": 77}'))
    assert response.status_int == 200
    assert response.json["expires_in_seconds"] == 77


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonp"]
)
def test_non_json_body_is_415(service: Service, content_type: str) -> None:
    """A non-empty body whose media type is not application/json is 415."""
    response = service.knock(raw=b'{"ttl": 60}', content_type=content_type)
    assert response.status_int == 415
    error_body(response)


def test_empty_body_without_content_type_is_a_plain_knock(service: Service) -> None:
    """No body at all needs no Content-Type."""
    assert service.knock(raw=b"").status_int == 200


def test_firewall_unavailable_is_503_and_grants_nothing(service: Service) -> None:
    """A firewall that cannot be reached gives 503; nothing is whitelisted or stored."""
    service.firewall.fail_with = FirewallUnavailable("firewalld is not running")
    response = service.knock()
    assert response.status_int == 503
    error_body(response)
    assert service.verify().status_int == 401
    assert service.file() == {}


def test_firewall_failure_is_500_and_grants_nothing(service: Service) -> None:
    """A firewall that refuses the rule gives 500; nothing is whitelisted or stored."""
    service.firewall.fail_with = FirewallError("rule refused")
    response = service.knock()
    assert response.status_int == 500
    assert "rule refused" not in error_body(response)
    assert service.verify().status_int == 401


def test_storage_failure_is_500_and_grants_nothing(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the knock cannot be made durable: 500, /verify refuses, the firewall is revoked."""

    def fail(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", fail)
        response = service.knock()
    assert response.status_int == 500
    error_body(response)
    assert service.verify().status_int == 401
    assert service.file() == {}
    assert service.firewall.revoked == [CLIENT]


# --- CORS -------------------------------------------------------------------------------


def _knock_variants(service: Service) -> dict[str, TestResponse]:
    responses = {
        "200": service.knock(),
        "400": service.knock(raw=b"{", content_type="application/json"),
        "401": service.knock("wrong"),
        "403": service.knock(payload={"ip_address": OTHER}),
        "405": service.web.get("/knock", expect_errors=True),
        "413": service.knock(raw=b" " * 5000, content_type="application/json"),
        "415": service.knock(raw=b"{}", content_type="text/plain"),
        "options": service.web.options("/knock"),
    }
    service.firewall.fail_with = FirewallUnavailable("gone")
    responses["503"] = service.knock(peer="198.51.100.99")
    service.firewall.fail_with = None
    for _ in range(30):
        service.knock("wrong", peer=OTHER)
    responses["429"] = service.knock(peer=OTHER)
    return responses


def test_every_knock_response_carries_the_configured_allow_origin(service: Service) -> None:
    """Success, every error, 429 and the preflight carry Access-Control-Allow-Origin."""
    responses = _knock_variants(service)
    assert responses["429"].status_int == 429
    for name, response in responses.items():
        assert response.headers.get("Access-Control-Allow-Origin") == ORIGIN, name


def test_preflight_is_204_with_exact_cors_headers(service: Service) -> None:
    """OPTIONS /knock is 204 with the allowed origin, methods and headers, and no body."""
    response = service.web.options(
        "/knock",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, content-type",
        },
    )
    assert response.status_int == 204
    assert response.body == b""
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.headers["Access-Control-Allow-Methods"] == "POST, DELETE, OPTIONS"
    assert response.headers["Access-Control-Allow-Headers"] == "X-Api-Key, Content-Type"
    assert "Content-Length" not in response.headers  # RFC 9110 8.6


def test_preflight_has_no_side_effects(make: Services) -> None:
    """OPTIONS needs no key, whitelists nothing and spends no rate-limit budget."""
    service = make(failures=2, successes=1)
    for _ in range(5):
        response = service.web.options("/knock", headers={"X-Api-Key": USER_KEY})
        assert response.status_int == 204
    assert service.verify().status_int == 401
    assert service.file() == {}
    assert service.knock().status_int == 200


# --- rate limiting ----------------------------------------------------------------------


def test_valid_key_gets_429_when_failure_budget_is_spent(make: Services) -> None:
    """After failed_requests failures, even a valid key is refused with 429 and granted
    nothing."""
    service = make(failures=3)
    for _ in range(3):
        assert service.knock("wrong").status_int == 401
    response = service.knock()
    assert response.status_int == 429
    error_body(response)
    assert service.verify().status_int == 401
    assert service.file() == {}


def test_window_frees_a_client_locked_out_by_failures(make: Services) -> None:
    """Once the window has passed, the locked-out client may knock again."""
    service = make(failures=3)
    for _ in range(3):
        service.knock("wrong")
    service.clock.now = NOW + 59
    assert service.knock().status_int == 429
    service.clock.now = NOW + 60
    assert service.knock().status_int == 200


def test_successful_budget_is_enforced_and_freed_by_the_window(make: Services) -> None:
    """More than successful_requests successes within the window are 429."""
    service = make(successes=2)
    assert service.knock().status_int == 200
    assert service.knock().status_int == 200
    assert service.knock().status_int == 429
    service.clock.now = NOW + 60
    assert service.knock().status_int == 200


def test_every_counted_failure_kind_spends_the_failure_budget(make: Services) -> None:
    """400, 401, 403, 413 and 415 all count against failed_requests."""
    service = make(failures=5)
    assert service.knock(raw=b"{", content_type="application/json").status_int == 400
    assert service.knock("wrong").status_int == 401
    assert service.knock(payload={"ip_address": OTHER}).status_int == 403
    assert service.knock(raw=b" " * 5000, content_type="application/json").status_int == 413
    assert service.knock(raw=b"{}", content_type="text/plain").status_int == 415
    assert service.knock().status_int == 429


def test_429_does_not_count_as_a_failure(make: Services) -> None:
    """Knocks refused with 429 do not prolong the lockout."""
    service = make(successes=1, failures=2)
    assert service.knock().status_int == 200
    for second in range(1, 6):
        service.clock.now = NOW + second
        assert service.knock("wrong").status_int == 429
    service.clock.now = NOW + 60  # the success leaves the window; the 429s never counted
    assert service.knock("wrong").status_int == 401
    assert service.knock("wrong").status_int == 401
    assert service.knock("wrong").status_int == 429


def test_rate_limited_client_never_gets_its_key_checked(make: Services) -> None:
    """Over budget, a wrong or missing key is 429, not 401: keys cannot be probed."""
    service = make(failures=2)
    service.knock("wrong")
    service.knock("wrong")
    assert service.knock("also-wrong").status_int == 429
    assert service.knock(None).status_int == 429


def test_rate_limit_is_per_client(make: Services) -> None:
    """One client's lockout does not affect another client."""
    service = make(failures=2)
    service.knock("wrong", peer=OTHER)
    service.knock("wrong", peer=OTHER)
    assert service.knock(peer=OTHER).status_int == 429
    assert service.knock(peer=CLIENT).status_int == 200


def test_unresolved_knocks_are_counted_under_the_peer(make: Services) -> None:
    """Unresolved clients spend the budget of the peer that sent them, not of real clients
    behind the same proxy."""
    service = make(failures=2)
    assert service.knock(peer=PROXY).status_int == 400
    assert service.knock(peer=PROXY).status_int == 400
    assert service.knock(peer=PROXY).status_int == 429
    forwarded = service.knock(peer=PROXY, headers={"X-Forwarded-For": CLIENT})
    assert forwarded.status_int == 200


def test_forwarded_clients_are_limited_individually(make: Services) -> None:
    """Behind a trusted proxy, the budget is per forwarded client, not per proxy."""
    service = make(failures=2)
    for _ in range(2):
        service.knock("wrong", peer=PROXY, headers={"X-Forwarded-For": OTHER})
    assert service.knock(peer=PROXY, headers={"X-Forwarded-For": OTHER}).status_int == 429
    assert service.knock(peer=PROXY, headers={"X-Forwarded-For": CLIENT}).status_int == 200


# --- order of evaluation ----------------------------------------------------------------


class ExplodingInput:
    """A wsgi.input that fails the test if anyone reads it."""

    def read(self, *args: object) -> bytes:
        raise AssertionError("the body was read")

    readline = read

    def readlines(self, *args: object) -> list[bytes]:
        raise AssertionError("the body was read")

    def __iter__(self) -> Iterator[bytes]:
        raise AssertionError("the body was read")


def test_body_is_not_read_before_authentication(service: Service) -> None:
    """With a wrong key, the body is never touched: 401, whatever it holds."""
    request = TestRequest.blank(
        "/knock",
        method="POST",
        environ={
            "HTTP_X_API_KEY": "wrong",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": "100",
            "wsgi.input": ExplodingInput(),
        },
    )
    assert service.send(request).status_int == 401


def test_huge_body_with_wrong_key_is_401_not_413(service: Service) -> None:
    """Authentication (401) comes before the body bound (413)."""
    assert (
        service.knock("wrong", raw=b" " * 100_000, content_type="application/json").status_int
        == 401
    )
    response = service.send(chunked(b" " * 100_000, key="wrong"))
    assert response.status_int == 401


def test_body_problems_come_before_policy(service: Service) -> None:
    """An invalid body is 400 even for a key that would get 403 for its ip_address."""
    response = service.knock(payload={"ip_address": OTHER, "ttl": 0})
    assert response.status_int == 400
    response = service.knock(payload={"ip_address": OTHER, "bogus": 1})
    assert response.status_int == 400
    response = service.knock(raw=b" " * 5000, content_type="text/plain")
    assert response.status_int == 413


def test_rate_limit_comes_before_everything(make: Services) -> None:
    """A blocked client gets 429 even for a request that would otherwise be 413 or 415."""
    service = make(failures=1)
    service.knock("wrong")
    assert service.knock(raw=b" " * 5000, content_type="application/json").status_int == 429
    assert service.knock(raw=b"{}", content_type="text/plain").status_int == 429


# --- logging ----------------------------------------------------------------------------


def test_knock_log_line_names_key_client_entry_ttl_and_result(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """Each knock outcome logs one INFO line with key name, client, entry, ttl and result."""
    with caplog.at_level(logging.INFO, logger="knocker"):
        service.knock(payload={"ttl": 120})
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 1
    line = lines[0]
    for part in ("phone", CLIENT, "120", "200"):
        assert part in line


def test_failed_knock_log_line_names_the_result(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused knock logs its status and client, with the key's name once it is known."""
    with caplog.at_level(logging.INFO, logger="knocker"):
        service.knock("wrong")
        service.knock(payload={"ip_address": OTHER})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "401" in lines[0] and CLIENT in lines[0]
    assert "403" in lines[1] and "phone" in lines[1]


def test_client_input_cannot_forge_log_lines(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a client puts in its body, each knock outcome stays one log line."""
    forged = "x\n2026-01-01 INFO knocker: knock key=admin client=6.6.6.6 result=200"
    with caplog.at_level(logging.INFO, logger="knocker"):
        service.knock(payload={forged: 1})
        service.knock(payload={"ip_address": forged})
        service.knock(ADMIN_KEY, {"ip_address": forged})
    assert len(caplog.records) == 3
    for record in caplog.records:
        assert "\n" not in record.getMessage() and "\r" not in record.getMessage()


def test_logs_never_contain_an_api_key(service: Service, caplog: pytest.LogCaptureFixture) -> None:
    """No log line ever contains a configured key or a presented one."""
    presented = "near-miss-" + USER_KEY
    with caplog.at_level(logging.DEBUG):
        _knock_variants(service)
        service.knock(presented)
        service.knock(ADMIN_KEY, {"ip_address": "10.0.0.0/24"})
    text = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert caplog.records
    for secret in (USER_KEY, ADMIN_KEY, presented):
        assert secret not in text


# --- /verify ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_verify_answers_with_an_empty_body(service: Service, method: str) -> None:
    """/verify answers 401, then 200 after a knock, always with an empty body."""
    before = service.verify(method=method)
    assert (before.status_int, before.body) == (401, b"")
    service.knock()
    after = service.verify(method=method)
    assert (after.status_int, after.body) == (200, b"")


def test_verify_ignores_a_request_body(service: Service) -> None:
    """A body sent to /verify changes nothing."""
    response = service.web.post(
        "/verify", params=b"x" * 10_000, expect_errors=True, extra_environ={"REMOTE_ADDR": CLIENT}
    )
    assert (response.status_int, response.body) == (401, b"")


def test_verify_passes_always_allowed_ips(service: Service) -> None:
    """Addresses in always_allowed_ips pass without a knock."""
    assert service.verify(peer="192.0.2.77").status_int == 200


def test_verify_stops_passing_when_the_grant_expires(service: Service) -> None:
    """An entry passes until its expiry and not after."""
    service.knock(payload={"ttl": 60})
    service.clock.now = NOW + 59
    assert service.verify().status_int == 200
    service.clock.now = NOW + 60
    assert service.verify().status_int == 401


def test_verify_via_trusted_proxy_uses_the_rightmost_untrusted_hop(service: Service) -> None:
    """Behind a trusted proxy, X-Forwarded-For is read from the right."""
    service.knock()
    allowed = service.verify(peer=PROXY, headers={"X-Forwarded-For": f"{OTHER}, {CLIENT}"})
    assert allowed.status_int == 200
    refused = service.verify(peer=PROXY, headers={"X-Forwarded-For": f"{CLIENT}, {OTHER}"})
    assert refused.status_int == 401


def test_verify_skips_trusted_hops_on_the_right(service: Service) -> None:
    """Trusted proxies at the right end of the chain are skipped."""
    service.knock()
    response = service.verify(peer=PROXY, headers={"X-Forwarded-For": f"{CLIENT}, fd00::5"})
    assert response.status_int == 200


def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(service: Service) -> None:
    """An untrusted peer is judged by its own address, whatever X-Forwarded-For says."""
    service.knock()
    response = service.verify(peer=OTHER, headers={"X-Forwarded-For": CLIENT})
    assert response.status_int == 401


def test_trusted_proxy_without_forwarded_for_is_401(service: Service) -> None:
    """A trusted proxy's own address is never the client, even if whitelisted."""
    service.knock(ADMIN_KEY, {"ip_address": PROXY})
    assert service.verify(peer=PROXY).status_int == 401


def test_excluded_path_through_trusted_proxy_passes(service: Service) -> None:
    """X-Forwarded-Uri under an excluded prefix passes for anyone behind a trusted proxy."""
    headers = {"X-Forwarded-For": OTHER, "X-Forwarded-Uri": "/public/app.css?v=1"}
    assert service.verify(peer=PROXY, headers=headers).status_int == 200
    headers["X-Forwarded-Uri"] = "/private"
    assert service.verify(peer=PROXY, headers=headers).status_int == 401


def test_excluded_path_from_untrusted_peer_is_ignored(service: Service) -> None:
    """X-Forwarded-Uri from an untrusted peer cannot exclude a path."""
    response = service.verify(peer=OTHER, headers={"X-Forwarded-Uri": "/public/app.css"})
    assert response.status_int == 401


def test_host_scoped_exclusion_through_trusted_proxy_passes(service: Service) -> None:
    """X-Forwarded-Host selects excluded_paths_by_host, case-insensitively."""
    headers = {
        "X-Forwarded-For": OTHER,
        "X-Forwarded-Host": "DOCS.example.com",
        "X-Forwarded-Uri": "/guide",
    }
    assert service.verify(peer=PROXY, headers=headers).status_int == 200
    headers["X-Forwarded-Host"] = "app.example.com"
    assert service.verify(peer=PROXY, headers=headers).status_int == 401


def test_host_scoped_exclusion_from_untrusted_peer_is_ignored(service: Service) -> None:
    """X-Forwarded-Host from an untrusted peer cannot select a host-scoped exclusion."""
    headers = {"X-Forwarded-Host": "docs.example.com", "X-Forwarded-Uri": "/guide"}
    assert service.verify(peer=OTHER, headers=headers).status_int == 401


def test_verify_does_no_file_io(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """/verify answers from memory: with every way to open a file broken, it still works."""
    service.knock()

    def no_files(*args: object, **kwargs: object) -> None:
        raise AssertionError("/verify opened a file")

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", no_files)
        patch.setattr(builtins, "open", no_files)
        assert service.verify().status_int == 200
        assert service.verify(peer=OTHER).status_int == 401


def test_verify_never_logs_at_info(service: Service, caplog: pytest.LogCaptureFixture) -> None:
    """/verify does not log per request at INFO."""
    service.knock()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        service.verify()
        service.verify(peer=OTHER)
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


# --- probes, documentation, routing -----------------------------------------------------


def test_health_is_ok(service: Service) -> None:
    """GET /health is 200 {"status": "ok"}."""
    response = service.web.get("/health")
    assert response.json == {"status": "ok"}


def test_ready_is_200_when_storage_and_firewall_are_fine(service: Service) -> None:
    """GET /ready is 200 {"status": "ready"} when all is in place."""
    assert service.web.get("/ready").json == {"status": "ready"}


def test_ready_is_503_when_the_firewall_is_not_in_place(service: Service) -> None:
    """A firewall problem makes /ready 503 with the reason."""
    service.firewall.reason = "zone knocker is missing"
    response = service.web.get("/ready", expect_errors=True)
    assert response.status_int == 503
    assert response.json == {"status": "not ready", "error": "zone knocker is missing"}


def test_ready_is_503_when_the_storage_directory_is_gone(service: Service) -> None:
    """With the whitelist directory gone, /ready is 503 (works as root, unlike chmod)."""
    shutil.rmtree(service.directory)
    response = service.web.get("/ready", expect_errors=True)
    assert response.status_int == 503
    assert response.json["status"] == "not ready"
    assert response.json["error"]


@pytest.mark.parametrize("path", ["/", "/knock/", "/verify/x", "/nope", "/openapi.json"])
def test_unknown_paths_are_404(service: Service, path: str) -> None:
    """Unknown paths (and /openapi.json when documentation is off) are 404."""
    assert service.web.get(path, expect_errors=True).status_int == 404


def test_openapi_is_404_and_not_written_when_disabled(service: Service) -> None:
    """documentation.enabled false: /openapi.json is 404 and no file is written."""
    assert service.web.get("/openapi.json", expect_errors=True).status_int == 404
    assert not service.openapi_path.exists()


def test_openapi_disabled_leaves_an_existing_file_alone(tmp_path: Path, make: Services) -> None:
    """documentation.enabled false never deletes or rewrites an existing file."""
    existing = tmp_path / "docs" / "openapi.json"
    existing.parent.mkdir()
    existing.write_text("mine")
    make()
    assert existing.read_text() == "mine"


def test_openapi_is_served_and_written_when_enabled(make: Services) -> None:
    """documentation.enabled true: /openapi.json serves the document also written to disk."""
    service = make(docs=True)
    response = service.web.get("/openapi.json")
    assert response.content_type == "application/json"
    assert response.json["openapi"].startswith("3.")
    assert json.loads(service.openapi_path.read_text()) == response.json


def test_head_requests_get_headers_without_body(service: Service) -> None:
    """HEAD /health answers 200 with no body."""
    response = service.web.head("/health")
    assert (response.status_int, response.body) == (200, b"")


def test_probes_refuse_other_methods(service: Service) -> None:
    """POST /health is 405 with Allow."""
    response = service.web.post("/health", expect_errors=True)
    assert response.status_int == 405
    assert "GET" in response.headers["Allow"]


def test_two_apps_on_one_storage_act_as_one_service(make: Services) -> None:
    """Two apps on one storage path (two workers): a knock on one passes /verify on the
    other, and rate limits hold across both."""
    first = make(failures=2)
    second = make(failures=2)
    assert first.directory == second.directory
    first.knock()
    assert second.verify().status_int == 200
    first.knock("wrong", peer=OTHER)
    second.knock("wrong", peer=OTHER)
    assert first.knock(peer=OTHER).status_int == 429
