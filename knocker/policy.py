"""Pure decisions: may this request pass /verify, and what does this knock grant?

Owns: the order of the checks of a knock (docs/api.md#order-of-checks, steps 2-7) and of
/verify (docs/api.md#verify), the API-key comparison, and the knock body's grammar.
Inputs are plain values (headers as strings, the body as bytes, `now` as a float);
nothing here reads the environment, the clock or a socket.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from .addresses import WIDEST_PREFIX, IPAddress, IPNetwork, canonical, parse_network
from .config import MAX_TTL, ApiKey, Config
from .errors import RequestError
from .proxies import Exclusions, ProxyResolver
from .whitelist import Key, Whitelist, key_of

MAX_BODY = 4096  # bytes of a knock body (docs/api.md#request-body)
_MEMBERS = frozenset({"ip_address", "ttl"})
_NEVER = 1 << 62  # expiry of always-allowed networks


@dataclass(frozen=True)
class KnockBody:
    ip_address: str | None = None
    ttl: int | None = None


@dataclass(frozen=True)
class Grant:
    key_name: str
    entry: str  # canonical IP or CIDR
    key: Key
    ttl: int  # effective TTL: min(requested, key's max_ttl)


def authenticate(keys: tuple[ApiKey, ...], presented: str | None) -> ApiKey:
    """The key matching `presented`, compared in constant time against every configured
    key (no early exit, so timing tells nothing about which key or prefix matched)."""
    # WSGI hands header values over as latin-1 decoded text: that is their raw bytes.
    offered = (presented or "").encode("latin-1", "replace")
    match = None
    for key in keys:
        if hmac.compare_digest(key.key.encode("utf-8"), offered) and match is None:
            match = key
    if match is None or not presented:
        raise RequestError("Invalid or missing API key", HTTPStatus.UNAUTHORIZED)
    return match


def parse_body(body: bytes, content_type: str | None) -> KnockBody:
    """The optional JSON body of a knock (the caller has already bounded its size)."""
    if not body:
        return KnockBody()
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise RequestError("Body must be application/json", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    try:
        members = json.loads(
            body.decode("utf-8"), object_pairs_hook=_unique_members, parse_constant=_refuse_constant
        )
    except UnicodeDecodeError:
        raise RequestError("Body is not valid UTF-8") from None
    except ValueError as error:  # JSONDecodeError and our own refusals
        raise RequestError(f"Body is not valid JSON: {error}") from None
    if not isinstance(members, dict):
        raise RequestError("Body must be a JSON object")
    unknown = sorted(set(members) - _MEMBERS)
    if unknown:
        # Names are the client's text: quote them (no line breaks reach a log) and cut.
        shown = ", ".join(ascii(name)[:40] for name in unknown[:5])
        raise RequestError(f"Unknown member(s) in body: {shown}")
    ip_address, ttl = members.get("ip_address"), members.get("ttl")
    if ttl is not None and (type(ttl) is not int or not 1 <= ttl <= MAX_TTL):
        raise RequestError(f"ttl must be an integer between 1 and {MAX_TTL}")
    if ip_address is not None and not (isinstance(ip_address, str) and len(ip_address) <= 100):
        raise RequestError("ip_address must be a string of at most 100 characters")
    return KnockBody(ip_address=ip_address, ttl=ttl)


def authorize(key: ApiKey, client: IPAddress | None, body: KnockBody) -> Grant:
    """What a knock with a valid key grants (docs/api.md#order-of-checks, steps 4-7)."""
    network: IPNetwork | None
    if body.ip_address is not None:
        network = parse_network(body.ip_address)
        if network is None:
            raise RequestError("ip_address must be an IPv4/IPv6 address or CIDR network")
        if not key.allow_remote_whitelist:
            raise RequestError("This key may not whitelist other addresses", HTTPStatus.FORBIDDEN)
        if network.prefixlen < WIDEST_PREFIX[network.version]:
            raise RequestError(
                f"Network too wide: at most an IPv4 /{WIDEST_PREFIX[4]} or an "
                f"IPv6 /{WIDEST_PREFIX[6]}"
            )
    elif client is None:
        raise RequestError("Could not determine the client address")
    else:
        network = ipaddress.ip_network(client)  # the address itself, as a /32 or /128
    ttl = key.max_ttl if body.ttl is None else min(body.ttl, key.max_ttl)
    return Grant(key_name=key.name, entry=canonical(network), key=key_of(network), ttl=ttl)


def _unique_members(pairs: list[tuple[str, object]]) -> dict[str, object]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("duplicate member")
    return members


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


class Verifier:
    """The /verify decision (docs/api.md#verify). Built once; `decide` is the hot path."""

    def __init__(self, config: Config, resolver: ProxyResolver) -> None:
        security = config.security
        self._resolver = resolver
        self._exclusions = Exclusions(security.excluded_paths, security.excluded_paths_by_host)
        self._always = Whitelist()
        for network in security.always_allowed_ips:
            self._always.set(key_of(network), _NEVER)

    def decide(
        self,
        peer: str,
        forwarded_for: str | None,
        forwarded_host: str | None,
        forwarded_uri: str | None,
        allows: Callable[[IPAddress, float], bool],
        now: float,
        scoped: Callable[[IPAddress, str | None, float], bool] | None = None,
    ) -> bool:
        resolver = self._resolver
        trusted = resolver.is_trusted(peer)
        if trusted and self._exclusions.active:
            host = resolver.original_host(trusted, forwarded_host)
            path = resolver.original_path(trusted, forwarded_uri)
            if self._exclusions.matches(host, path):
                return True
        client = resolver.client_ip(peer, forwarded_for)
        if client is None:
            return False
        if self._always.allows(client, now) or allows(client, now):
            return True
        if scoped is None:  # no key is scoped: the upstream decision, unchanged
            return False
        # A scoped grant needs the original host, and only a trusted proxy tells it.
        return scoped(client, resolver.original_host(trusted, forwarded_host), now)
