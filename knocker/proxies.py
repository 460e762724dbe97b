"""Who the client is, and which host and path it asked for (docs/identity.md).

Owns: trusting X-Forwarded-For/-Host/-Uri only from configured peers, reading the
client from the right, the fail-closed path normalization and the exclusion prefixes.
Pure: no I/O, no clock, no environment. Runs on every /verify, so work is precomputed
at construction and repeated header values hit small bounded caches.

What arrives from gunicorn 27 (read in gunicorn/http/message.py and http/wsgi.py of
27.0.1, and checked against a running 27.0.1 with raw requests):
- Repeated header lines are joined into ONE environ value with "," and no space
  (wsgi.create collects repeats, then `",".join(values)`); each value was already
  stripped of spaces and tabs, and control characters other than TAB were refused.
  So two X-Forwarded-For lines arrive as "a,b", one list as docs/identity.md wants anyway,
  two X-Forwarded-Host lines as "a.example,b.example", which we refuse as ambiguous,
  and two X-Forwarded-Uri lines as "/public/?,/admin" (see _path_from_uri).
  wsgiref joins the same way; under WebTest a test passes the joined string itself.
- Header names containing "_" (X_Forwarded_For) would map to the same environ key as
  X-Forwarded-For; gunicorn's default header_map="drop" silently drops them (unless the
  peer is in its own forwarded_allow_ips AND the name is in forwarder_headers, which by
  default lists only SCRIPT_NAME and PATH_INFO), "refuse" answers 400, and only the
  opt-in "dangerous" merges them. So with the defaults `knocker serve` uses, an
  underscore spelling cannot be smuggled into HTTP_X_FORWARDED_FOR (wsgiref, unlike
  gunicorn, would merge it: never serve Knocker with wsgiref).
- Header bytes are decoded as latin-1, so raw non-ASCII bytes arrive as U+0080..U+00FF.
- REMOTE_ADDR is the socket peer's address text (no brackets, no port); gunicorn never
  rewrites it from forwarding headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple, TypeVar
from urllib.parse import quote, unquote

from knocker.addresses import IPAddress, IPNetwork, parse_ip

_V = TypeVar("_V")

# A longer X-Forwarded-For chain is unresolved rather than walked
# (docs/identity.md#the-client-address).
MAX_FORWARDED_FOR = 20

# Caches are keyed by header text an attacker may vary, so both their entry count and
# the key length are capped: at most _CACHE_ENTRIES * _CACHE_KEY_MAX characters each.
_CACHE_ENTRIES = 4096
_CACHE_KEY_MAX = 256

# RFC 9110 5.6.3: optional whitespace is space and horizontal tab.
_OWS = " \t"

# Characters normalize_prefix leaves alone; it quotes everything else (space, non-ASCII).
_VISIBLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7F))
_HEX = frozenset("0123456789abcdefABCDEF")
# Escapes kept encoded by normalization: %2F and %5C because decoding them would
# create path separators the proxy did not see (docs/exclusions.md#path-normalisation),
# %25 so that a literal "%" in the result cannot be confused with one of the other two.
_KEPT_ESCAPES = {"2F": b"%2F", "5C": b"%5C", "25": b"%25"}
# Deliberately narrower than RFC 3986 reg-name: anything else is "ambiguous"
# (docs/identity.md#original-host).
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


class Origin(NamedTuple):
    """What one request resolved to; None fields are unresolved (docs/identity.md)."""

    peer_trusted: bool
    client: IPAddress | None
    host: str | None
    path: str | None


def _remember(cache: dict[str, _V], key: str, value: _V) -> _V:
    """Store value under key unless that could grow memory without bound; return it."""
    if len(key) <= _CACHE_KEY_MAX:
        if len(cache) >= _CACHE_ENTRIES:
            # Clearing beats LRU bookkeeping on the hot path; the next misses refill it.
            cache.clear()
        cache[key] = value
    return value


class ProxyResolver:
    """Resolves client, host and path from REMOTE_ADDR and X-Forwarded-* values.

    Pass the WSGI environ values as they are (None when the header is absent).
    """

    __slots__ = (
        "trusted_proxies",
        "_v4_hosts",
        "_v4_nets",
        "_v6_hosts",
        "_v6_nets",
        "_peers",
        "_chains",
        "_hosts",
        "_paths",
    )

    def __init__(self, trusted_proxies: tuple[IPNetwork, ...]) -> None:
        self.trusted_proxies = trusted_proxies
        # Integer tables: a set lookup for single addresses (the usual "127.0.0.1") and
        # a mask-and-compare per real network, instead of ipaddress's `in` per network.
        self._v4_hosts = frozenset(
            int(n.network_address) for n in trusted_proxies if n.version == 4 and n.prefixlen == 32
        )
        self._v4_nets = tuple(
            (int(n.network_address), int(n.netmask))
            for n in trusted_proxies
            if n.version == 4 and n.prefixlen < 32
        )
        self._v6_hosts = frozenset(
            int(n.network_address) for n in trusted_proxies if n.version == 6 and n.prefixlen == 128
        )
        self._v6_nets = tuple(
            (int(n.network_address), int(n.netmask))
            for n in trusted_proxies
            if n.version == 6 and n.prefixlen < 128
        )
        # peer text -> Origin: the full answer for an untrusted peer, a marker for a
        # trusted one, so the common direct-client case is a single dict lookup.
        self._peers: dict[str, Origin] = {}
        self._chains: dict[str, IPAddress | None] = {}
        self._hosts: dict[str, str | None] = {}
        self._paths: dict[str, str | None] = {}

    # -- the whole request at once ---------------------------------------------------

    def resolve(
        self,
        peer: str,
        forwarded_for: str | None,
        forwarded_host: str | None,
        forwarded_uri: str | None,
    ) -> Origin:
        """Client, original host and path of one request (docs/identity.md)."""
        origin = self._peer(peer)
        if not origin.peer_trusted:
            return origin
        return Origin(
            True,
            self._client_from_chain(forwarded_for),
            self.original_host(True, forwarded_host),
            self.original_path(True, forwarded_uri),
        )

    # -- one question at a time ------------------------------------------------------

    def is_trusted(self, peer: str) -> bool:
        """True when REMOTE_ADDR text is inside server.trusted_proxies (unparsable: False)."""
        return self._peer(peer).peer_trusted

    def client_ip(self, peer: str, forwarded_for: str | None) -> IPAddress | None:
        """The client (docs/identity.md#the-client-address), or None when unresolved."""
        origin = self._peer(peer)
        if not origin.peer_trusted:
            return origin.client
        return self._client_from_chain(forwarded_for)

    def original_host(self, peer_trusted: bool, forwarded_host: str | None) -> str | None:
        """X-Forwarded-Host lower-cased without port; None if untrusted, absent or ambiguous."""
        if not peer_trusted or forwarded_host is None:
            return None
        try:
            return self._hosts[forwarded_host]
        except KeyError:
            return _remember(self._hosts, forwarded_host, normalize_host(forwarded_host))

    def original_path(self, peer_trusted: bool, forwarded_uri: str | None) -> str | None:
        """X-Forwarded-Uri's path, normalized (docs/identity.md#original-path); None if
        untrusted, absent or unsure."""
        if not peer_trusted or forwarded_uri is None:
            return None
        try:
            return self._paths[forwarded_uri]
        except KeyError:
            return _remember(self._paths, forwarded_uri, _path_from_uri(forwarded_uri))

    # -- internals -------------------------------------------------------------------

    def _peer(self, peer: str) -> Origin:
        origin = self._peers.get(peer)
        if origin is None:
            # parse_ip unwraps ::ffff:a.b.c.d (a dual-stack socket's IPv4 peer) and refuses
            # zone indices, so fe80::1%eth0 is neither trusted nor a client.
            address = parse_ip(peer)
            if address is not None and self._is_proxy(address):
                origin = Origin(True, None, None, None)
            else:
                origin = Origin(False, address, None, None)
            _remember(self._peers, peer, origin)
        return origin

    def _is_proxy(self, address: IPAddress) -> bool:
        value = int(address)
        if address.version == 4:
            hosts, nets = self._v4_hosts, self._v4_nets
        else:
            hosts, nets = self._v6_hosts, self._v6_nets
        if value in hosts:
            return True
        return any(value & mask == network for network, mask in nets)

    def _client_from_chain(self, forwarded_for: str | None) -> IPAddress | None:
        if forwarded_for is None:
            return None
        try:
            return self._chains[forwarded_for]
        except KeyError:
            return _remember(self._chains, forwarded_for, self._walk_chain(forwarded_for))

    def _walk_chain(self, forwarded_for: str) -> IPAddress | None:
        # Count before splitting so a hostile 8 KiB header costs one C-level scan.
        if forwarded_for.count(",") >= MAX_FORWARDED_FOR:
            return None
        chain: list[IPAddress] = []
        for element in forwarded_for.split(","):
            # Every element must be valid, even left of the client: a list we cannot
            # fully read is one we cannot be sure we are reading correctly.
            address = parse_ip(element.strip(_OWS))
            if address is None:
                return None
            chain.append(address)
        # Only the right end is written by proxies we trust; everything left of the
        # first untrusted hop may be forged by the client (werkzeug ProxyFix, waitress).
        for address in reversed(chain):
            if not self._is_proxy(address):
                return address
        return None


# -- host ----------------------------------------------------------------------------


def normalize_host(value: str) -> str | None:
    """An X-Forwarded-Host value as a lower-case host without port, or None if ambiguous.

    "Example.COM:8443" -> "example.com", "[::1]:8443" -> "::1" (IPv6 in canonical form).
    Comma-joined repeats, whitespace, user info, unbracketed IPv6, empty or non-numeric
    ports and non-ASCII all give None.
    """
    host = value.strip(_OWS)
    if not host or not host.isascii():
        # isascii first: str.lower() maps some non-ASCII letters onto ASCII ones
        # (KELVIN SIGN -> "k"), which would let a look-alike host match a config key.
        return None
    host = host.lower()
    if host[0] == "[":
        end = host.find("]")
        rest = host[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        literal = host[1:end]
        address = parse_ip(literal) if ":" in literal else None
        return None if address is None else str(address)
    name, colon, port = host.partition(":")
    if colon and not _is_port(port):
        return None
    if not name or not _HOST_CHARS.issuperset(name):
        return None
    return name


def normalize_host_key(key: str) -> str | None:
    """An excluded_paths_by_host key in the form normalize_host gives, or None if invalid.

    "*" stays "*"; bare or bracketed IPv6 is accepted; a key with a port is refused
    because the port is gone from what it would be compared with.
    """
    text = key.strip(_OWS).lower()
    if text == "*":
        return text
    if len(text) > 2 and text[0] == "[" and text[-1] == "]":
        text = text[1:-1]
    if ":" in text:
        address = parse_ip(text)
        return None if address is None else str(address)
    return normalize_host(text)


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


# -- path ----------------------------------------------------------------------------


def _path_from_uri(uri: str) -> str | None:
    uri = uri.strip(_OWS)
    if "," in uri:
        # gunicorn joins repeated lines with ",": from "/public/?" sent by the client and
        # "/admin" appended by a proxy that adds instead of overwriting, the joined
        # "/public/?,/admin" would read as /public. A raw comma therefore means "unsure",
        # at the price of never excluding URIs that carry one (an encoded %2C is fine).
        return None
    # The path ends at the first "?" or "#" (RFC 3986 3.3).
    path = uri.partition("?")[0].partition("#")[0]
    return normalize_path(path)


def normalize_path(path: str) -> str | None:
    """A request path normalized, or None when it must never be excluded
    (docs/exclusions.md#path-normalisation).

    Percent-decodes once, keeping %2F, %5C and %25 encoded (upper-case); refuses invalid
    escapes, invalid UTF-8, NUL and other control characters, backslash and ";"; drops
    "." segments; collapses repeated slashes. A path not starting with "/" (absolute
    URI, "*", authority form) is None.

    ".." is refused rather than resolved, literal or encoded. Browsers and curl remove
    dot segments before sending (RFC 3986 5.2.4, WHATWG URL), so only a crafted request
    carries one, and whether the server behind the proxy resolves it before routing,
    after, or never, decides what it names: "/app/../public" is /public to one server
    and a file below /app to another. Refusing it means traversal can neither reach an
    excluded prefix from outside nor leave a protected one into it, whatever the
    backend does. For the same reason anything some server might still read as a dot
    segment is None: an encoded dot segment ("%2e"), names made only of dots and spaces
    ("...", ".%20."), and segments that hold one once their kept escapes are decoded
    again ("..%2F", "%252e%252e"). A literal "." is simply dropped: every reading of
    it, resolved or taken as a directory name, is the same directory.
    """
    if not path.startswith("/"):
        return None
    if (
        "%" not in path
        and "/." not in path
        and "//" not in path
        and ";" not in path
        and "\\" not in path
        and " " not in path
        and path.isascii()
        and path.isprintable()
    ):
        # Fast path: nothing to decode, drop or collapse, nothing forbidden.
        return path
    return _normalize_slow(path)


def _normalize_slow(path: str) -> str | None:
    # The raw text must be a plausible request-target: visible ASCII only (gunicorn
    # hands raw non-ASCII bytes over as latin-1 characters).
    if not path.isascii() or not path.isprintable() or " " in path or "\\" in path:
        return None
    kept: list[str] = []
    trailing_slash = False
    # Only a raw "/" separates segments, so each one is decoded on its own.
    for raw in path.split("/")[1:]:
        # "/a/" and "/a/." both name a directory: keep that trailing slash.
        trailing_slash = True
        if raw == "" or raw == ".":
            continue
        segment = _percent_decode(raw)
        if segment is None or _refused_segment(segment):
            return None
        kept.append(segment)
        trailing_slash = False
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing_slash else "")


def _percent_decode(segment: str) -> str | None:
    if "%" not in segment:
        return segment
    parts = segment.split("%")
    decoded = bytearray(parts[0], "ascii")
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            return None
        kept = _KEPT_ESCAPES.get(part[:2].upper())
        if kept is None:
            decoded.append(int(part[:2], 16))
        else:
            decoded += kept
        decoded += part[2:].encode("ascii")
    try:
        # Strict UTF-8 also refuses overlong forms such as %C0%AE for ".".
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _is_dots(text: str) -> bool:
    """True for ".", "..", "...", ". ." and the like."""
    return "." in text and not text.strip(". \t")


def _refused_segment(segment: str) -> bool:
    # A raw "." or ".." never gets here: "." was dropped, ".." arrives as itself.
    if not segment.isprintable() or ";" in segment or "\\" in segment or _is_dots(segment):
        return True
    if "%" in segment:
        # Only kept escapes remain. A server (or app) that decodes again would see their
        # separators and dots, so read the segment as it would, a few times over.
        text = segment
        for _ in range(3):
            text = unquote(text)
        if not text.isprintable() or ";" in text:
            return True
        return any(_is_dots(piece) for piece in text.replace("\\", "/").split("/"))
    return False


def normalize_prefix(prefix: str) -> str | None:
    """A configured exclusion prefix in the form matched against normalize_path's output.

    Raw non-ASCII letters and spaces in knocker.yaml are meant literally, so they are
    percent-encoded first ("/café" matches a request for "/caf%C3%A9"); a trailing slash
    is dropped ("/api/" is "/api", as upstream Knocker configs have always meant).
    None when the prefix could never match anything (relative, "..", ";", bad escape).
    """
    try:
        quoted = quote(prefix, safe=_VISIBLE_ASCII)
    except UnicodeEncodeError:  # a lone surrogate (YAML "\ud800") has no UTF-8 form
        return None
    path = normalize_path(quoted)
    if path is None or path == "/":
        return path
    return path.rstrip("/")


# -- exclusions ----------------------------------------------------------------------


class _Prefixes(NamedTuple):
    exact: frozenset[str]  # "/api" itself
    under: tuple[str, ...]  # "/api/": everything below; str.startswith takes a tuple


def _prefixes(normalized: Iterable[str]) -> _Prefixes:
    exact: set[str] = set()
    under: set[str] = set()
    for prefix in normalized:
        if prefix == "/":
            under.add(prefix)
        else:
            exact.add(prefix)
            under.add(prefix + "/")
    # Drop entries a shorter one already covers, so matches() scans fewer strings. In
    # sorted order every string between a prefix and its extensions extends it too, so
    # one pass comparing with the last kept entry finds them all: O(n log n), not O(n^2).
    kept: list[str] = []
    for candidate in sorted(under):
        if not (kept and candidate.startswith(kept[-1])):
            kept.append(candidate)
    covering = set(kept)
    return _Prefixes(frozenset(e for e in exact if not _covered(e, covering)), tuple(kept))


def _covered(path: str, under: set[str]) -> bool:
    """Whether one of the `under` prefixes ("/a/", "/a/b/") is an ancestor of `path`."""
    end = path.find("/")
    while end != -1:
        if path[: end + 1] in under:
            return True
        end = path.find("/", end + 1)
    return False


class Exclusions:
    """security.excluded_paths and excluded_paths_by_host, matched against resolved values.

    matches() takes host and path as ProxyResolver resolved them. A prefix matches whole
    segments, case-sensitively: "/api" matches "/api", "/api/" and "/api/x", not "/apix";
    "/" matches every path. Prefixes go through normalize_prefix ("/api/" is "/api"),
    host keys through normalize_host_key; either refusing one raises ValueError (config
    validation should refuse it first, naming the key path). Hosts match
    case-insensitively; "*" applies to every resolved host, never to an unresolved one.
    """

    __slots__ = ("active", "_anywhere", "_any_host", "_by_host")

    def __init__(
        self,
        excluded_paths: tuple[str, ...] = (),
        excluded_paths_by_host: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        global_paths = _normalize_prefixes(excluded_paths)
        host_paths: dict[str, list[str]] = {}
        for key, prefixes in (excluded_paths_by_host or {}).items():
            host = normalize_host_key(key)
            if host is None:
                raise ValueError(f"invalid host {key!r} in excluded_paths_by_host")
            host_paths.setdefault(host, []).extend(_normalize_prefixes(prefixes))
        star = host_paths.pop("*", [])
        # One precomputed prefix set per case, so matches() is a dict lookup, a set
        # lookup and one startswith, however many hosts and prefixes are configured.
        self._anywhere = _prefixes(global_paths)
        self._any_host = _prefixes(global_paths + star)
        self._by_host = {
            host: _prefixes(global_paths + star + paths) for host, paths in host_paths.items()
        }
        self.active = bool(global_paths or star or any(host_paths.values()))

    def matches(self, host: str | None, path: str | None) -> bool:
        """True when the resolved path is excluded for the resolved host (docs/exclusions.md)."""
        if not self.active or path is None:
            return False
        if host is None:
            prefixes = self._anywhere
        elif not self._by_host:
            prefixes = self._any_host
        else:
            # original_host() already lower-cases; lower() again only for other callers.
            found = self._by_host.get(host)
            prefixes = (
                found if found is not None else self._by_host.get(host.lower(), self._any_host)
            )
        # A handful of prefixes: one C-level startswith over a tuple beats walking the
        # path's ancestors through a set (measured up to ~50 prefixes).
        return path in prefixes.exact or path.startswith(prefixes.under)


def _normalize_prefixes(prefixes: Iterable[str]) -> list[str]:
    normalized: list[str] = []
    for prefix in prefixes:
        path = normalize_prefix(prefix)
        if path is None:
            raise ValueError(f"excluded path {prefix!r} can never match a normalized path")
        normalized.append(path)
    return normalized
