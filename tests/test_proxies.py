"""Who the client is and what it asked for: every trust and normalization rule tries a spoof."""

from __future__ import annotations

import ipaddress
import random
from urllib.parse import unquote

import pytest

from knocker.proxies import (
    MAX_FORWARDED_FOR,
    Exclusions,
    Origin,
    ProxyResolver,
    normalize_host,
    normalize_host_key,
    normalize_path,
    normalize_prefix,
)
from tests.support.net import ip, nets

PROXY = "127.0.0.1"
PROXY6 = "::1"
CLIENT = "203.0.113.7"
OTHER = "198.51.100.9"


def resolver(*networks: str) -> ProxyResolver:
    return ProxyResolver(nets(*networks))


@pytest.fixture
def behind_proxy() -> ProxyResolver:
    """Knocker behind a local proxy and a CDN range, as a typical config trusts them."""
    return resolver("127.0.0.1/32", "::1/128", "10.0.0.0/8", "2001:db8:cd::/48")


def path_of(uri: str) -> str | None:
    """What /verify compares with exclusions when a trusted proxy sends this URI."""
    return resolver(PROXY).original_path(True, uri)


# -- docs/identity.md#the-client-address -------------------------------------------------


def test_untrusted_peer_is_the_client(behind_proxy: ProxyResolver) -> None:
    """A peer outside trusted_proxies is the client itself."""
    assert behind_proxy.client_ip(CLIENT, None) == ip(CLIENT)
    assert behind_proxy.is_trusted(CLIENT) is False


def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(behind_proxy: ProxyResolver) -> None:
    """X-Forwarded-For from an untrusted peer cannot name another client."""
    assert behind_proxy.client_ip(CLIENT, OTHER) == ip(CLIENT)
    assert behind_proxy.client_ip(CLIENT, f"{OTHER}, {PROXY}") == ip(CLIENT)
    assert behind_proxy.client_ip(CLIENT, "garbage") == ip(CLIENT)


def test_spoofed_forwarding_headers_from_untrusted_peer_are_all_ignored(
    behind_proxy: ProxyResolver,
) -> None:
    """resolve() reads no X-Forwarded-* header at all for an untrusted peer."""
    origin = behind_proxy.resolve(CLIENT, OTHER, "public.example.com", "/public/x")
    assert origin == Origin(False, ip(CLIENT), None, None)


def test_rightmost_untrusted_hop_is_the_client(behind_proxy: ProxyResolver) -> None:
    """Walking from the right, trusted hops are skipped and the first other one wins."""
    chain = f"{OTHER}, {CLIENT}, 10.1.2.3, 127.0.0.1"
    assert behind_proxy.client_ip(PROXY, chain) == ip(CLIENT)


def test_forged_leftmost_entries_do_not_pick_the_client(behind_proxy: ProxyResolver) -> None:
    """A client prepending addresses (or trusted ones) to its XFF still is itself."""
    assert behind_proxy.client_ip(PROXY, f"127.0.0.1, 10.0.0.1, {OTHER}, {CLIENT}") == ip(CLIENT)


def test_repeated_forwarded_for_lines_form_one_list(behind_proxy: ProxyResolver) -> None:
    """Two XFF lines arrive joined by "," (gunicorn, WebTest) and are read as one list."""
    # "X-Forwarded-For: 198.51.100.9" (from the client) + "X-Forwarded-For: 203.0.113.7"
    # (appended by the proxy) is environ["HTTP_X_FORWARDED_FOR"] == "198.51.100.9,203.0.113.7".
    joined = ",".join([OTHER, CLIENT])
    assert behind_proxy.client_ip(PROXY, joined) == ip(CLIENT)
    # The order of lines matters: the last line is the one nearest to us.
    assert behind_proxy.client_ip(PROXY, ",".join([CLIENT, OTHER])) == ip(OTHER)


def test_chain_of_only_trusted_proxies_is_unresolved(behind_proxy: ProxyResolver) -> None:
    """A chain made only of trusted proxies names no client."""
    assert behind_proxy.client_ip(PROXY, "10.0.0.1, 127.0.0.1, ::1") is None


def test_trusted_peer_is_never_the_client(behind_proxy: ProxyResolver) -> None:
    """A trusted peer without a usable XFF does not fall back to its own address."""
    assert behind_proxy.client_ip(PROXY, None) is None
    assert behind_proxy.client_ip(PROXY, PROXY) is None
    assert behind_proxy.resolve(PROXY, None, None, None) == Origin(True, None, None, None)


def test_forwarded_for_element_with_port_is_unresolved(behind_proxy: ProxyResolver) -> None:
    """An element carrying a port (or brackets) makes the client unresolved."""
    for chain in (f"{CLIENT}:4711", "[2001:db8::7]:4711", "[2001:db8::7]", f"{OTHER}:1, {CLIENT}"):
        assert behind_proxy.client_ip(PROXY, chain) is None, chain


def test_empty_element_is_unresolved(behind_proxy: ProxyResolver) -> None:
    """An empty element anywhere in the list makes the client unresolved."""
    for chain in ("", " ", f"{CLIENT},", f",{CLIENT}", f"{OTHER},,{CLIENT}", f"{CLIENT}, "):
        assert behind_proxy.client_ip(PROXY, chain) is None, repr(chain)


def test_malformed_element_anywhere_is_unresolved(behind_proxy: ProxyResolver) -> None:
    """One malformed element, even left of the client, makes the client unresolved."""
    for chain in (
        f"unknown, {CLIENT}",  # nginx's placeholder
        f"{CLIENT}/32",
        "203.0.113.007",  # leading zeros are read as octal by some parsers
        "203.0.113",
        f"{CLIENT} {OTHER}",
        f'"{CLIENT}"',
        f"for={CLIENT}",  # RFC 7239 syntax is not X-Forwarded-For
    ):
        assert behind_proxy.client_ip(PROXY, chain) is None, chain


def test_more_than_20_elements_is_unresolved(behind_proxy: ProxyResolver) -> None:
    """Twenty elements are walked; twenty-one are unresolved."""
    assert MAX_FORWARDED_FOR == 20
    twenty = ", ".join([CLIENT] + ["10.0.0.1"] * 19)
    assert behind_proxy.client_ip(PROXY, twenty) == ip(CLIENT)
    assert behind_proxy.client_ip(PROXY, f"{OTHER}, {twenty}") is None


def test_zone_index_is_unresolved(behind_proxy: ProxyResolver) -> None:
    """An IPv6 element with a zone index makes the client unresolved."""
    assert behind_proxy.client_ip(PROXY, "fe80::7%eth0") is None
    assert behind_proxy.client_ip(PROXY, "fe80::7%25eth0") is None


def test_peer_with_zone_index_is_untrusted_and_unresolved() -> None:
    """A zone-scoped REMOTE_ADDR is neither a trusted proxy nor a client."""
    link_local = resolver("fe80::/10")
    assert link_local.is_trusted("fe80::1%eth0") is False
    assert link_local.client_ip("fe80::1%eth0", CLIENT) is None


def test_unparsable_peer_is_untrusted_and_unresolved(behind_proxy: ProxyResolver) -> None:
    """A REMOTE_ADDR that is not an address (unix socket, empty) trusts nothing."""
    for peer in ("", "unix:/run/knocker.sock", "127.0.0.1:8000", "[::1]", "localhost"):
        assert behind_proxy.is_trusted(peer) is False, peer
        assert behind_proxy.client_ip(peer, CLIENT) is None, peer


def test_ipv4_mapped_peer_is_its_ipv4_address(behind_proxy: ProxyResolver) -> None:
    """::ffff:a.b.c.d from a dual-stack socket is the IPv4 address, for trust and identity."""
    assert behind_proxy.client_ip(f"::ffff:{CLIENT}", None) == ip(CLIENT)
    assert behind_proxy.is_trusted("::ffff:127.0.0.1") is True
    assert behind_proxy.client_ip("::ffff:127.0.0.1", CLIENT) == ip(CLIENT)


def test_ipv4_mapped_forwarded_element_is_its_ipv4_address(behind_proxy: ProxyResolver) -> None:
    """Mapped addresses in XFF are skipped as trusted or returned as IPv4."""
    assert behind_proxy.client_ip(PROXY, f"::ffff:{CLIENT}") == ip(CLIENT)
    assert behind_proxy.client_ip(PROXY, f"{CLIENT}, ::ffff:10.0.0.1") == ip(CLIENT)


def test_surrounding_spaces_and_tabs_are_allowed(behind_proxy: ProxyResolver) -> None:
    """Optional whitespace around elements is not an empty or malformed element."""
    assert behind_proxy.client_ip(PROXY, f"  {OTHER} ,\t{CLIENT}\t") == ip(CLIENT)


def test_ipv6_clients_and_proxy_networks(behind_proxy: ProxyResolver) -> None:
    """IPv6 hops inside a trusted IPv6 network are skipped like IPv4 ones."""
    chain = "2001:db8:1::7, 2001:db8:cd:5::1"
    assert behind_proxy.client_ip(PROXY6, chain) == ip("2001:db8:1::7")
    assert behind_proxy.client_ip(PROXY6, "2001:db8:cd::1") is None


def test_families_never_mix() -> None:
    """Trusting 127.0.0.1 does not trust ::1, nor the reverse."""
    v4_only = resolver("127.0.0.0/8")
    assert v4_only.is_trusted("::1") is False
    assert v4_only.client_ip("::1", CLIENT) == ip("::1")
    assert resolver("::/0").is_trusted("127.0.0.1") is False


def test_no_trusted_proxies_means_every_peer_is_the_client() -> None:
    """With an empty trusted_proxies even loopback peers are clients."""
    nobody = resolver()
    assert nobody.client_ip(PROXY, OTHER) == ip(PROXY)
    assert nobody.resolve(PROXY, OTHER, "h", "/public") == Origin(False, ip(PROXY), None, None)


def test_caches_stay_bounded_and_correct(behind_proxy: ProxyResolver) -> None:
    """Many distinct peers and chains neither grow memory without bound nor go stale."""
    for n in range(10_000):
        peer = str(ipaddress.IPv4Address(0xC6336400 + n))
        assert behind_proxy.client_ip(peer, None) == ip(peer)
        assert behind_proxy.client_ip(PROXY, f"{peer}, 10.0.0.1") == ip(peer)
        assert behind_proxy.original_path(True, f"/p/{n}") == f"/p/{n}"
    assert len(behind_proxy._peers) <= 4096
    assert len(behind_proxy._chains) <= 4096
    assert len(behind_proxy._paths) <= 4096
    long_chain = ", ".join(["2001:db8:ffff:ffff:ffff:ffff:ffff:1"] * 20)
    assert behind_proxy.client_ip(PROXY, long_chain) == ip("2001:db8:ffff:ffff:ffff:ffff:ffff:1")
    assert long_chain not in behind_proxy._chains  # long keys are never cached


# -- docs/identity.md#original-host ------------------------------------------------------


def test_forwarded_host_from_untrusted_peer_is_ignored(behind_proxy: ProxyResolver) -> None:
    """X-Forwarded-Host counts only when the peer is a trusted proxy."""
    assert behind_proxy.original_host(False, "public.example.com") is None
    assert behind_proxy.original_host(behind_proxy.is_trusted(CLIENT), "a.example") is None
    assert behind_proxy.original_host(behind_proxy.is_trusted(PROXY), "a.example") == "a.example"


def test_forwarded_host_is_lower_cased_without_port(behind_proxy: ProxyResolver) -> None:
    """The host is compared lower-case and without its port."""
    assert behind_proxy.original_host(True, "Example.COM:8443") == "example.com"
    assert behind_proxy.original_host(True, "example.com") == "example.com"
    assert behind_proxy.original_host(True, "192.0.2.1:80") == "192.0.2.1"


def test_bracketed_ipv6_host_loses_brackets_and_port(behind_proxy: ProxyResolver) -> None:
    """[::1]:8443 is the host ::1, written canonically."""
    assert behind_proxy.original_host(True, "[::1]:8443") == "::1"
    assert behind_proxy.original_host(True, "[2001:DB8:0::1]") == "2001:db8::1"


def test_comma_separated_forwarded_host_is_ambiguous(behind_proxy: ProxyResolver) -> None:
    """Repeated X-Forwarded-Host lines (joined by ",") give no host at all."""
    assert behind_proxy.original_host(True, "public.example.com,admin.example.com") is None
    assert behind_proxy.original_host(True, "admin.example.com, public.example.com") is None


def test_malformed_forwarded_host_is_ambiguous(behind_proxy: ProxyResolver) -> None:
    """Whitespace inside, user info, stray colons, bad ports or non-ASCII give no host."""
    for value in (
        "",
        " ",
        "a b.example",
        "user@host.example",
        "host.example:",
        "host.example:80:80",
        "host.example:http",
        "host.example:123456",
        "::1",  # unbracketed IPv6 cannot be told from host:port
        "[::1",
        "[::1]x",
        "[192.0.2.1]",
        "[fe80::1%eth0]",
        "host.example/path",
        "ex\u212aample.com",  # KELVIN SIGN lower-cases to an ASCII "k"
        "caf\u00e9.example",
    ):
        assert behind_proxy.original_host(True, value) is None, repr(value)


def test_host_keys_and_forwarded_hosts_share_one_form() -> None:
    """Config host keys normalize to what normalize_host gives for the same host."""
    assert normalize_host_key("Example.COM") == normalize_host("example.com:443") == "example.com"
    assert normalize_host_key("[2001:db8::1]") == normalize_host("[2001:DB8::1]:8443")
    assert normalize_host_key("2001:db8::1") == "2001:db8::1"
    assert normalize_host_key("*") == "*"
    assert normalize_host_key("example.com:8443") is None
    assert normalize_host_key("a b") is None


# -- docs/identity.md#original-path ------------------------------------------------------


def test_forwarded_uri_from_untrusted_peer_is_ignored(behind_proxy: ProxyResolver) -> None:
    """X-Forwarded-Uri counts only when the peer is a trusted proxy."""
    assert behind_proxy.original_path(False, "/public/x") is None
    assert behind_proxy.original_path(behind_proxy.is_trusted(CLIENT), "/public/x") is None
    assert behind_proxy.original_path(True, None) is None


def test_query_and_fragment_are_dropped() -> None:
    """Only the path before "?" or "#" is compared."""
    assert path_of("/public/x?next=/admin") == "/public/x"
    assert path_of("/public/x#/admin") == "/public/x"
    assert path_of("/admin?/public") == "/admin"
    assert path_of("/admin#?/public") == "/admin"


def test_absolute_or_odd_request_targets_are_never_excluded() -> None:
    """Anything but an origin-form path (absolute URI, "*", relative, empty) is no path."""
    for uri in ("http://example.com/public", "public/x", "*", "", "?/public", "example.com:443"):
        assert path_of(uri) is None, uri


def test_comma_in_forwarded_uri_is_unsure() -> None:
    """A raw "," may be two joined lines ("/public/?" + "/admin"), so there is no path."""
    assert path_of(",".join(["/public/?", "/admin"])) is None
    assert path_of(",".join(["/public/x", "/admin"])) is None
    assert path_of("/public/a%2Cb") == "/public/a,b"  # an encoded comma is not a join


def test_percent_2f_stays_encoded_and_cannot_reach_excluded_prefix() -> None:
    """%2F is not a separator: /app/..%2Fpublic never reaches an excluded /public."""
    exclusions = Exclusions(("/public",))
    assert path_of("/public%2Fx") == "/public%2Fx"
    assert path_of("/a%2fb") == "/a%2Fb"
    for uri in ("/app/..%2Fpublic", "/app/..%2fpublic", "/app%2F..%2Fpublic", "/public%2Fx"):
        assert not exclusions.matches(None, path_of(uri)), uri


def test_percent_5c_stays_encoded_and_cannot_reach_excluded_prefix() -> None:
    """%5C (backslash) is kept encoded and never turns into a separator or traversal."""
    exclusions = Exclusions(("/public",))
    assert path_of("/a%5cb") == "/a%5Cb"
    for uri in ("/app/..%5Cpublic", "/public/..%5C..%5Cadmin", "/public%5Cx"):
        assert not exclusions.matches(None, path_of(uri)), uri


def test_dotdot_cannot_leave_protected_prefix_into_excluded_one() -> None:
    """/app/../public, literal or encoded, is not treated as the excluded /public."""
    exclusions = Exclusions(("/public",))
    for uri in ("/app/../public", "/app/%2e%2e/public", "/app/%2E%2E/public", "/app/.%2e/public"):
        assert path_of(uri) is None, uri
        assert not exclusions.matches(None, path_of(uri)), uri


def test_dotdot_cannot_enter_excluded_prefix_from_outside() -> None:
    """Traversal from the root or above it never lands in an excluded prefix."""
    exclusions = Exclusions(("/public",))
    for uri in ("/../public", "/x/../public", "//../public", "/%2e%2e/public", "/./../public"):
        assert not exclusions.matches(None, path_of(uri)), uri


def test_dotdot_cannot_leave_excluded_prefix() -> None:
    """/public/../admin is not excluded by /public, however the dots are spelled."""
    exclusions = Exclusions(("/public",))
    for uri in (
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/..%2Fadmin",
        "/public/x/..%2F..%2Fadmin",
        "/public/..%5Cadmin",
        "/public/.../admin",
        "/public/.%20./admin",
        "/public/..",
    ):
        assert not exclusions.matches(None, path_of(uri)), uri


def test_double_encoded_dotdot_is_never_excluded() -> None:
    """%252e%252e decodes once to a literal "%2e%2e", which a second decoder reads as .."""
    exclusions = Exclusions(("/public",))
    assert path_of("/admin/%252e%252e/public") is None
    assert not exclusions.matches(None, path_of("/public/%252e%252e/admin"))
    assert not exclusions.matches(None, path_of("/public/%252e%252e%252fadmin"))
    # A double-encoded ordinary character stays a literal, unambiguous "%".
    assert path_of("/public/%2541") == "/public/%2541"


def test_semicolon_backslash_nul_are_never_excluded() -> None:
    """Semicolon, backslash and NUL, raw or encoded, make the path never excluded."""
    exclusions = Exclusions(("/public",))
    for uri in (
        "/public;x",
        "/public/..;/admin",
        "/public/%3B",
        "/public/x%3bjsessionid=1",
        "/public\\..\\admin",
        "/public/%00",
        "/public/x%00.html",
        "/public/%2500",  # NUL to a second decoder
        "/public/%253B",
    ):
        assert path_of(uri) is None, uri
        assert not exclusions.matches(None, path_of(uri)), uri


def test_control_characters_and_raw_non_ascii_are_never_excluded() -> None:
    """Encoded controls, raw spaces and raw non-ASCII bytes give no path."""
    for uri in ("/public/%0a", "/public/%09x", "/public/%7F", "/public/a b", "/public/\xe9"):
        assert path_of(uri) is None, repr(uri)


def test_invalid_percent_escapes_and_utf8_are_never_excluded() -> None:
    """Bad escapes, invalid UTF-8 and overlong forms (%C0%AE is ".") give no path."""
    for uri in ("/public/%zz", "/public/%", "/public/%2", "/public/%ff", "/public/%C0%AE%C0%AE"):
        assert path_of(uri) is None, uri


def test_decoding_happens_once_and_keeps_encoded_forms_apart() -> None:
    """Ordinary escapes decode once; %2F, %5C and %25 stay so forms never collide."""
    assert path_of("/caf%C3%A9/%7Euser") == "/café/~user"
    assert path_of("/a%2Fb") != path_of("/a%252Fb")
    assert path_of("/a%252Fb") == "/a%252Fb"


def test_dot_segments_and_repeated_slashes_are_collapsed() -> None:
    """Single-dot segments are dropped, repeated slashes collapsed; a trailing slash stays."""
    assert path_of("/public/./x") == "/public/x"
    assert path_of("//public//x//") == "/public/x/"
    assert path_of("/./public/.") == "/public/"
    assert path_of("/public") == "/public"
    assert path_of("/") == "/"


# -- exclusions --------------------------------------------------------------------------


def test_prefix_matches_whole_segments_only() -> None:
    """/api matches /api, /api/ and /api/x, not /apix."""
    exclusions = Exclusions(("/api",))
    assert exclusions.matches(None, "/api")
    assert exclusions.matches(None, "/api/")
    assert exclusions.matches(None, "/api/x/y")
    assert not exclusions.matches(None, "/apix")
    assert not exclusions.matches(None, "/ap")
    assert not exclusions.matches(None, "/x/api")


def test_prefix_matching_is_case_sensitive() -> None:
    """/api does not match /API."""
    assert not Exclusions(("/api",)).matches(None, "/API/x")


def test_trailing_slash_on_configured_prefix_is_ignored() -> None:
    """A configured /api/ excludes /api and below, as upstream configs mean it."""
    exclusions = Exclusions(("/api/",))
    assert exclusions.matches(None, "/api")
    assert exclusions.matches(None, "/api/x")
    assert not exclusions.matches(None, "/apix")


def test_nested_and_overlapping_prefixes_match_exactly_as_each_one_alone() -> None:
    """Prefixes that cover one another (dropped when built) match what any one of them
    alone would: thousands of random nested sets against a one-by-one reference."""
    rng = random.Random(11)
    names = ["a", "b", "a0", "a.b", "ab", "a-"]
    for _ in range(300):
        prefixes = [
            "/" + "/".join(rng.choice(names) for _ in range(rng.randint(1, 3)))
            for _ in range(rng.randint(1, 12))
        ]
        if rng.random() < 0.05:
            prefixes.append("/")
        exclusions = Exclusions(tuple(prefixes))
        for _ in range(20):
            path = "/" + "/".join(rng.choice(names) for _ in range(rng.randint(1, 4)))
            alone = any(Exclusions((prefix,)).matches(None, path) for prefix in prefixes)
            assert exclusions.matches(None, path) is alone, (prefixes, path)


def test_root_prefix_matches_every_path() -> None:
    """A configured "/" excludes every resolved path, but not an unresolved one."""
    exclusions = Exclusions(("/", "/api"))
    assert exclusions.matches(None, "/")
    assert exclusions.matches(None, "/anything/at/all")
    assert not exclusions.matches(None, None)


def test_no_path_matches_nothing() -> None:
    """Without a resolved path no exclusion applies, not even "/"."""
    assert not Exclusions(("/",), {"*": ("/",)}).matches("example.com", None)


def test_no_exclusions_match_nothing() -> None:
    """An empty configuration is inactive and never matches."""
    exclusions = Exclusions((), {})
    assert exclusions.active is False
    assert not exclusions.matches("example.com", "/")
    assert Exclusions((), {"example.com": ()}).active is False


def test_configured_prefixes_are_normalized_like_requests() -> None:
    """Config and request spellings of one path meet in the same form."""
    exclusions = Exclusions(("/caf%C3%A9", "/my files/", "//docs/./v1", "/pub%2Fkeys"))
    assert exclusions.matches(None, path_of("/caf%c3%a9/menu"))
    assert exclusions.matches(None, path_of("/my%20files/a"))
    assert exclusions.matches(None, path_of("/docs/v1/intro"))
    assert exclusions.matches(None, path_of("/pub%2fkeys/x"))
    assert not exclusions.matches(None, path_of("/pub/keys/x"))
    assert normalize_prefix("/café") == "/café"


def test_invalid_configured_prefix_is_refused() -> None:
    """Prefixes that could never match a normalized path are configuration errors."""
    for prefix in ("public", "", "/a/../b", "/a;b", "/100%", "/a%00", "/..", "/\ud800"):
        with pytest.raises(ValueError):
            Exclusions((prefix,))
        with pytest.raises(ValueError):
            Exclusions((), {"example.com": (prefix,)})


def test_invalid_host_key_is_refused() -> None:
    """Host keys with a port or junk are configuration errors, not silent non-matches."""
    for key in ("example.com:8443", "a b", "", "user@example.com"):
        with pytest.raises(ValueError):
            Exclusions((), {key: ("/x",)})


def test_host_scoped_exclusion_is_case_insensitive(behind_proxy: ProxyResolver) -> None:
    """A Files.Example.COM key matches a forwarded files.example.com:443, and the reverse."""
    exclusions = Exclusions((), {"Files.Example.COM": ("/share",)})
    host = behind_proxy.original_host(True, "FILES.example.com:443")
    assert exclusions.matches(host, "/share/x")
    assert exclusions.matches("FILES.EXAMPLE.COM", "/share/x")
    assert not exclusions.matches(host, "/other")


def test_host_scoped_exclusion_does_not_apply_to_other_hosts() -> None:
    """A host's exclusions do not leak to another host or to an unresolved one."""
    exclusions = Exclusions((), {"files.example.com": ("/share",)})
    assert not exclusions.matches("admin.example.com", "/share/x")
    assert not exclusions.matches("files.example.com.evil.test", "/share/x")
    assert not exclusions.matches(None, "/share/x")


def test_star_host_applies_only_to_resolved_hosts() -> None:
    """The "*" key excludes for every resolved host, never for an unresolved one."""
    exclusions = Exclusions((), {"*": ("/.well-known/acme-challenge",)})
    path = "/.well-known/acme-challenge/token"
    assert exclusions.matches("anything.example", path)
    assert exclusions.matches("::1", path)
    assert not exclusions.matches(None, path)


def test_global_and_host_exclusions_combine() -> None:
    """Global prefixes apply everywhere; host and "*" prefixes add to them."""
    exclusions = Exclusions(("/health",), {"*": ("/static",), "files.example.com": ("/share",)})
    assert exclusions.matches(None, "/health")
    assert exclusions.matches("files.example.com", "/health")
    assert exclusions.matches("files.example.com", "/static/a.css")
    assert exclusions.matches("files.example.com", "/share/a")
    assert not exclusions.matches("other.example", "/share/a")
    assert not exclusions.matches(None, "/static/a.css")


def test_ipv6_host_key_matches_bracketed_forwarded_host(behind_proxy: ProxyResolver) -> None:
    """A key "[2001:db8::1]" or "2001:db8::1" matches X-Forwarded-Host [2001:DB8::1]:443."""
    host = behind_proxy.original_host(True, "[2001:DB8::1]:443")
    assert Exclusions((), {"[2001:db8::1]": ("/x",)}).matches(host, "/x")
    assert Exclusions((), {"2001:db8::1": ("/x",)}).matches(host, "/x")


# -- properties over generated paths -----------------------------------------------------

_TOKENS = (
    "/", "//", "public", "admin", "pub", "lic", "x", ".", "..", "...", "%2e", "%2E", "%2e%2e",
    "%2F", "%2f", "%5C", "%5c", "\\", ";", "%3B", "%00", "%25", "%252e", "%252F", "%255C",
    "%c0%ae", "%6C", "%20", "?", "#", "%3F", "%23", "%ff", "%", "a%2Fb", ".%2e", "%2e.",
)  # fmt: skip
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _generated_uris(count: int) -> list[str]:
    rng = random.Random(20240611)
    uris = ["/public", "/public/", "/public/x", "/public/./x", "//public//x"]
    while len(uris) < count:
        start = rng.choice(("/", "/public/", "/public", "/admin/", "/pub", "/x/"))
        uris.append(start + "".join(rng.choice(_TOKENS) for _ in range(rng.randint(1, 6))))
    return uris


def _decode_unreserved(text: str) -> str:
    """RFC 3986 6.2.2.2: only escapes of unreserved characters are decoded."""
    parts = text.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        try:
            char = chr(int(part[:2], 16)) if len(part) >= 2 else ""
        except ValueError:
            char = ""
        out.append(char + part[2:] if char in _UNRESERVED and char else "%" + part)
    return "".join(out)


def _readings(uri: str) -> list[list[str]]:
    """The segment lists servers of various care could take this request-target to name."""
    raw = uri.partition("?")[0].partition("#")[0]
    decodings = [_decode_unreserved(raw)]
    text = raw
    for _ in range(3):
        text = unquote(text)
        decodings.append(text)
    readings = []
    for decoded in decodings:
        for backslash_separates in (False, True):
            for strip_params in (False, True):
                for resolve_dots in (False, True):
                    text = decoded.replace("\\", "/") if backslash_separates else decoded
                    segments: list[str] = []
                    for segment in text.split("/"):
                        if strip_params:
                            segment = segment.split(";")[0]
                        if segment in ("", "."):
                            continue
                        if segment == ".." and resolve_dots:
                            if segments:
                                segments.pop()
                            continue
                        segments.append(segment)
                    readings.append(segments)
    return readings


def test_excluded_paths_are_under_the_prefix_in_every_reading() -> None:
    """Whenever a generated URI is excluded, every server's reading of it is under /public."""
    exclusions = Exclusions(("/public",))
    excluded = 0
    for uri in _generated_uris(6000):
        if not exclusions.matches(None, path_of(uri)):
            continue
        excluded += 1
        for segments in _readings(uri):
            assert segments[:1] == ["public"], (uri, segments)
    assert excluded > 100  # the property was exercised, not vacuously true


def test_normalized_paths_are_fixed_points_of_prefix_normalization() -> None:
    """A normalized request path used as a configured prefix matches itself."""
    checked = 0
    for uri in _generated_uris(6000):
        path = path_of(uri)
        if path is None or path.endswith("/"):
            continue
        checked += 1
        assert normalize_prefix(path) == path, uri
        if path.isascii() and " " not in path:  # still a valid request-target as written
            assert normalize_path(path) == path, uri
        assert Exclusions((path,)).matches(None, path), uri
    assert checked > 100
