"""knocker.policy: key check, knock body grammar, knock grants and the /verify decision."""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus

import pytest

from knocker.addresses import IPAddress
from knocker.config import MAX_TTL, ApiKey, Config, load_config_text
from knocker.errors import RequestError
from knocker.policy import (
    Grant,
    KnockBody,
    Verifier,
    authenticate,
    authorize,
    parse_body,
)
from knocker.proxies import ProxyResolver
from knocker.whitelist import entry_text
from tests.support.net import ip

USER = ApiKey("phone", "user-key-5b8f0c2e9d1a7f3b6c4e", 3600, False)
ADMIN = ApiKey("admin", "admin-key-e1d2c3b4a5f6e7d8c9b0", 86400, True)
KEYS = (USER, ADMIN)
CLIENT = ip("203.0.113.7")
NOW = 1_700_000_000.0


def status_of(call: Callable[[], object]) -> HTTPStatus:
    with pytest.raises(RequestError) as caught:
        call()
    return caught.value.status


def body(payload: object) -> KnockBody:
    return parse_body(json.dumps(payload).encode(), "application/json")


# --- authenticate -----------------------------------------------------------------------


def test_right_key_authenticates_as_its_entry() -> None:
    """The presented key selects the configured key it equals."""
    assert authenticate(KEYS, USER.key) is USER
    assert authenticate(KEYS, ADMIN.key) is ADMIN


@pytest.mark.parametrize(
    "presented",
    [
        None,
        "",
        "wrong-key",
        USER.key[:-1],  # a prefix of a configured key
        USER.key[:1],
        USER.key + "x",  # a configured key is a prefix of it
        USER.key.upper(),
        " " + USER.key,
        "kéy-ünïcode",
        "\u20ac" + USER.key,  # outside latin-1: must not crash
    ],
    ids=[
        "missing",
        "empty",
        "wrong",
        "prefix",
        "first-char",
        "extension",
        "case",
        "space",
        "latin1",
        "non-latin1",
    ],
)
def test_anything_but_an_exact_key_is_401(presented: str | None) -> None:
    """Missing, empty, wrong, prefix, extended and non-ASCII keys are all 401."""
    assert status_of(lambda: authenticate(KEYS, presented)) == HTTPStatus.UNAUTHORIZED


def test_no_configured_keys_authenticates_nothing() -> None:
    """With no keys at all, even an empty presented key is refused."""
    assert status_of(lambda: authenticate((), "")) == HTTPStatus.UNAUTHORIZED


def test_non_ascii_key_matches_its_utf8_bytes_as_wsgi_passes_them() -> None:
    """A UTF-8 key arrives in WSGI as latin-1-decoded bytes and still matches."""
    key = ApiKey("unicode", "clé-secrète-2f6a9b", 60, False)
    on_the_wire = key.key.encode("utf-8").decode("latin-1")
    assert authenticate((key,), on_the_wire) is key
    assert status_of(lambda: authenticate((key,), key.key)) == HTTPStatus.UNAUTHORIZED


def test_authentication_failure_message_never_contains_the_key() -> None:
    """The 401 message quotes neither the configured nor the presented key."""
    with pytest.raises(RequestError) as caught:
        authenticate(KEYS, USER.key[:-1])
    assert USER.key[:-1] not in caught.value.message
    assert USER.key not in str(caught.value)


# --- parse_body -------------------------------------------------------------------------


def test_empty_body_means_no_members() -> None:
    """No body is a knock without ip_address or ttl, whatever the Content-Type."""
    assert parse_body(b"", None) == KnockBody()
    assert parse_body(b"", "text/plain") == KnockBody()


def test_whitespace_body_is_not_empty() -> None:
    """A body of only whitespace is non-empty: 415 without JSON type, 400 with it."""
    with pytest.raises(RequestError) as error:
        parse_body(b"  \n", None)
    assert error.value.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    with pytest.raises(RequestError) as error:
        parse_body(b"  \n", "application/json")
    assert error.value.status == HTTPStatus.BAD_REQUEST


def test_members_are_read() -> None:
    """ip_address and ttl are taken from the JSON object."""
    assert body({"ip_address": "192.0.2.1", "ttl": 60}) == KnockBody("192.0.2.1", 60)


def test_null_members_mean_absent() -> None:
    """`null` for a member is the same as leaving it out."""
    assert body({"ip_address": None, "ttl": None}) == KnockBody()


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/json ;charset=UTF-8",
    ],
)
def test_json_media_type_with_parameters_is_accepted(content_type: str) -> None:
    """application/json is accepted in any case and with parameters such as charset."""
    assert parse_body(b'{"ttl": 5}', content_type) == KnockBody(ttl=5)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
        "application/json-patch+json",
        "multipart/form-data; boundary=x",
    ],
)
def test_non_json_media_type_is_415(content_type: str | None) -> None:
    """A non-empty body that is not application/json is 415."""
    status = status_of(lambda: parse_body(b'{"ttl": 5}', content_type))
    assert status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE


@pytest.mark.parametrize(
    "raw",
    [
        b'{"ttl": 5, "ip_address": "\xff"}',  # invalid UTF-8
        b"\xef\xbb\xbf{}",  # a BOM is not JSON
        b"{",
        b"ttl=5",
        b'{"ttl": NaN}',
        b'{"ttl": Infinity}',
        b"[]",
        b'"text"',
        b"5",
        b"null",
        b'{"ttl": 5, "extra": 1}',
        b'{"TTL": 5}',
        b'{"ttl": 5, "ttl": 6}',
        b'{"ip_address": "1.2.3.4", "ip_address": "1.2.3.4"}',
    ],
    ids=[
        "bad-utf8",
        "bom",
        "truncated",
        "form",
        "nan",
        "infinity",
        "array",
        "string",
        "number",
        "null",
        "unknown-member",
        "member-case",
        "duplicate-ttl",
        "duplicate-ip",
    ],
)
def test_malformed_body_is_400(raw: bytes) -> None:
    """Invalid UTF-8, non-JSON, non-objects, unknown or duplicate members are 400."""
    assert status_of(lambda: parse_body(raw, "application/json")) == HTTPStatus.BAD_REQUEST


@pytest.mark.parametrize(
    "ttl",
    [True, False, 1.0, 60.5, "60", 0, -1, MAX_TTL + 1, 10**30, [60], {"s": 60}],
    ids=[
        "true",
        "false",
        "float-int",
        "float",
        "string",
        "zero",
        "negative",
        "too-big",
        "huge",
        "list",
        "object",
    ],
)
def test_ttl_must_be_an_integer_in_range(ttl: object) -> None:
    """ttl must be a JSON integer, not bool/float/string, with 1 <= ttl <= 315360000."""
    assert status_of(lambda: body({"ttl": ttl})) == HTTPStatus.BAD_REQUEST


@pytest.mark.parametrize("ttl", [1, MAX_TTL])
def test_ttl_bounds_are_inclusive(ttl: int) -> None:
    """1 and 315360000 are both valid ttls."""
    assert body({"ttl": ttl}).ttl == ttl


@pytest.mark.parametrize("ip_address", [5, ["1.2.3.4"], {"ip": "1.2.3.4"}, True, "1" * 101])
def test_ip_address_must_be_a_short_string(ip_address: object) -> None:
    """ip_address must be a string of at most 100 characters."""
    assert status_of(lambda: body({"ip_address": ip_address})) == HTTPStatus.BAD_REQUEST


# --- authorize --------------------------------------------------------------------------


def grant(
    key: ApiKey, payload: dict[str, object] | None = None, client: IPAddress | None = CLIENT
) -> Grant:
    return authorize(key, client, body(payload) if payload is not None else KnockBody())


def test_knock_without_ip_address_whitelists_the_client() -> None:
    """The entry is the resolved client address with the key's max_ttl."""
    result = grant(USER)
    assert result == Grant("phone", "203.0.113.7", result.key, 3600)
    assert entry_text(result.key) == "203.0.113.7"


def test_ipv6_client_is_whitelisted_canonically() -> None:
    """An IPv6 client's entry is its canonical spelling."""
    result = grant(USER, client=ip("2001:DB8:0::7"))
    assert result.entry == "2001:db8::7"


def test_unresolved_client_without_ip_address_is_400() -> None:
    """With no client IP and no ip_address, the knock is 400."""
    assert status_of(lambda: grant(USER, client=None)) == HTTPStatus.BAD_REQUEST


@pytest.mark.parametrize(
    ("requested", "effective"), [(None, 3600), (60, 60), (3600, 3600), (999_999, 3600)]
)
def test_effective_ttl_is_min_of_requested_and_max_ttl(
    requested: int | None, effective: int
) -> None:
    """Effective ttl = min(requested, max_ttl); absent means max_ttl."""
    assert grant(USER, {"ttl": requested}).ttl == effective


def test_non_admin_key_naming_an_address_is_403() -> None:
    """A key without allow_remote_whitelist may not name an ip_address."""
    status = status_of(lambda: grant(USER, {"ip_address": "198.51.100.1"}))
    assert status == HTTPStatus.FORBIDDEN


def test_non_admin_key_naming_its_own_address_is_still_403() -> None:
    """Even the caller's own address is refused to a non-admin key."""
    status = status_of(lambda: grant(USER, {"ip_address": str(CLIENT)}))
    assert status == HTTPStatus.FORBIDDEN


@pytest.mark.parametrize("ip_address", ["not-an-ip", "fe80::1%eth0", "1.2.3.4/33", " 1.2.3.4"])
def test_invalid_ip_address_is_400_before_the_403(ip_address: str) -> None:
    """An invalid ip_address is 400 even for a key that would get 403."""
    assert status_of(lambda: grant(USER, {"ip_address": ip_address})) == HTTPStatus.BAD_REQUEST
    assert status_of(lambda: grant(ADMIN, {"ip_address": ip_address})) == HTTPStatus.BAD_REQUEST


def test_invalid_ttl_is_400_before_the_403() -> None:
    """Body validation (400) comes before the remote-whitelist policy (403)."""
    status = status_of(lambda: grant(USER, {"ip_address": "198.51.100.1", "ttl": 0}))
    assert status == HTTPStatus.BAD_REQUEST


@pytest.mark.parametrize(
    ("ip_address", "entry"),
    [
        ("198.51.100.1", "198.51.100.1"),
        ("198.51.100.1/32", "198.51.100.1"),
        ("10.1.2.3/24", "10.1.2.0/24"),
        ("10.1.0.0/16", "10.1.0.0/16"),
        ("2001:db8:1:2::9/64", "2001:db8:1:2::/64"),
        ("2001:DB8::1", "2001:db8::1"),
        ("::ffff:198.51.100.1", "198.51.100.1"),
        ("::ffff:10.1.0.0/112", "10.1.0.0/16"),
    ],
)
def test_admin_key_whitelists_the_canonical_network(ip_address: str, entry: str) -> None:
    """Host bits are cleared, mapped IPv6 becomes IPv4, single addresses lose their /32."""
    assert grant(ADMIN, {"ip_address": ip_address}).entry == entry


@pytest.mark.parametrize(
    "ip_address", ["10.0.0.0/15", "0.0.0.0/0", "2001:db8::/63", "::/0", "::ffff:10.0.0.0/111"]
)
def test_too_wide_network_is_400(ip_address: str) -> None:
    """Wider than 65536 IPv4 addresses or shorter than an IPv6 /64 is 400."""
    assert status_of(lambda: grant(ADMIN, {"ip_address": ip_address})) == HTTPStatus.BAD_REQUEST


def test_admin_ttl_is_capped_by_its_max_ttl() -> None:
    """An admin grant for another address is capped like any other."""
    assert grant(ADMIN, {"ip_address": "198.51.100.1", "ttl": MAX_TTL}).ttl == 86400


def test_admin_grant_does_not_need_a_resolved_client() -> None:
    """An explicit ip_address works even when the caller's address is unresolved."""
    assert grant(ADMIN, {"ip_address": "198.51.100.1"}, client=None).entry == "198.51.100.1"


# --- Verifier.decide --------------------------------------------------------------------

PROXY = "10.9.9.9"
VERIFY_YAML = f"""
api_keys:
  - key: verify-test-key-6e5d4c3b
    max_ttl: 60
server:
  trusted_proxies: ["{PROXY}"]
security:
  always_allowed_ips: ["192.0.2.0/24", "2001:db8:a::/48"]
  excluded_paths: ["/public"]
  excluded_paths_by_host:
    docs.example.com: ["/"]
"""


@pytest.fixture
def config() -> Config:
    return load_config_text(VERIFY_YAML)


class Allows:
    """A whitelist stand-in that records what it was asked."""

    def __init__(self, *allowed: str) -> None:
        self.allowed = {ip(a) for a in allowed}
        self.asked: list[tuple[IPAddress, float]] = []

    def __call__(self, address: IPAddress, now: float) -> bool:
        self.asked.append((address, now))
        return address in self.allowed


def decide(
    config: Config,
    peer: str,
    allows: Allows,
    xff: str | None = None,
    host: str | None = None,
    uri: str | None = None,
) -> bool:
    verifier = Verifier(config, ProxyResolver(config.server.trusted_proxies))
    return verifier.decide(peer, xff, host, uri, allows, NOW)


def test_whitelisted_client_passes_and_now_is_passed_on(config: Config) -> None:
    """A direct client the whitelist allows passes; the whitelist is asked with `now`."""
    allows = Allows("203.0.113.7")
    assert decide(config, "203.0.113.7", allows)
    assert allows.asked == [(CLIENT, NOW)]


def test_unknown_client_is_refused(config: Config) -> None:
    """A client that no rule allows is refused."""
    assert not decide(config, "203.0.113.8", Allows("203.0.113.7"))


def test_always_allowed_ip_passes_without_asking_the_whitelist(config: Config) -> None:
    """always_allowed_ips pass and are checked before the whitelist."""
    allows = Allows()
    assert decide(config, "192.0.2.200", allows)
    assert decide(config, "2001:db8:a:ffff::1", allows)
    assert allows.asked == []


def test_excluded_path_via_trusted_proxy_passes_an_unresolved_client(config: Config) -> None:
    """An excluded path passes first, before the client is even resolved."""
    assert decide(config, PROXY, Allows(), xff=None, uri="/public/app.js?x=1")


def test_excluded_path_from_untrusted_peer_is_ignored(config: Config) -> None:
    """X-Forwarded-Uri from an untrusted peer cannot exclude a path."""
    assert not decide(config, "203.0.113.8", Allows(), uri="/public/app.js")


def test_excluded_path_matches_whole_segments_only(config: Config) -> None:
    """/public excludes /public/x, not /publicity."""
    assert not decide(config, PROXY, Allows(), xff="203.0.113.8", uri="/publicity")


def test_traversal_out_of_an_excluded_prefix_is_not_excluded(config: Config) -> None:
    """/public/../private (also percent-encoded) is /private: not excluded."""
    assert not decide(config, PROXY, Allows(), xff="203.0.113.8", uri="/public/../private")
    assert not decide(config, PROXY, Allows(), xff="203.0.113.8", uri="/public/%2e%2e/private")


def test_host_scoped_exclusion_via_trusted_proxy_passes(config: Config) -> None:
    """excluded_paths_by_host applies to X-Forwarded-Host from a trusted proxy."""
    allows = Allows()
    assert decide(
        config, PROXY, allows, xff="203.0.113.8", host="Docs.Example.com:443", uri="/anything"
    )
    assert not decide(
        config, PROXY, allows, xff="203.0.113.8", host="www.example.com", uri="/anything"
    )


def test_host_scoped_exclusion_from_untrusted_peer_is_ignored(config: Config) -> None:
    """X-Forwarded-Host from an untrusted peer cannot select a host-scoped exclusion."""
    assert not decide(config, "203.0.113.8", Allows(), host="docs.example.com", uri="/x")


def test_unresolved_client_is_refused_even_if_whitelist_would_allow(config: Config) -> None:
    """A trusted proxy without X-Forwarded-For leaves the client unresolved: refused."""
    allows = Allows(PROXY)
    assert not decide(config, PROXY, allows, xff=None, uri="/private")
    assert allows.asked == []


def test_trusted_proxy_forwarded_client_is_looked_up(config: Config) -> None:
    """Behind a trusted proxy, the right-most untrusted X-Forwarded-For hop is the client."""
    allows = Allows("203.0.113.7")
    assert decide(config, PROXY, allows, xff="198.51.100.1, 203.0.113.7")
    assert not decide(config, PROXY, allows, xff="203.0.113.7, 198.51.100.1")


def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(config: Config) -> None:
    """An untrusted peer is the client whatever X-Forwarded-For claims."""
    allows = Allows("203.0.113.7")
    assert not decide(config, "198.51.100.1", allows, xff="203.0.113.7")
