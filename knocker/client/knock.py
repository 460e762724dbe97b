"""One knock: POST <api_url>/knock over urllib (no redirects: the key goes only where the
user pointed it), the server's answer as a KnockResult or a KnockFailed carrying the exit
status, the ip_check_url lookup, and the words `knocker knock` prints about a result.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

from .. import __version__
from ..addresses import parse_ip
from .settings import Settings, display_url, redact

HTTP_TIMEOUT_SECONDS = 10.0
MAX_BODY_BYTES = 64 * 1024

# Exit codes of `knocker knock` (documented in --help and the README). 2 is argparse's
# own code for a bad command line, so settings errors share it.
EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_NETWORK = 3
EXIT_UNAUTHORIZED = 4
EXIT_FORBIDDEN = 5
EXIT_RATE_LIMITED = 6

EXIT_CODES_HELP = """\
exit status:
  0  whitelisted
  1  any other failure (400 invalid input, 5xx, unexpected answer)
  2  bad command line or settings (no api_url or api_key, unreadable file)
  3  network error (cannot connect, timeout, TLS failure)
  4  401: the API key was not accepted
  5  403: the key may not whitelist other addresses (--ip)
  6  429: too many knocks from this address; wait and retry
  7  404: nothing to end (knock --revoke, grants revoke)
"""


@dataclass(frozen=True)
class KnockResult:
    """A successful knock: the server's three members, validated."""

    entry: str
    expires_at: int
    expires_in_seconds: int

    def as_json(self) -> dict[str, Any]:
        return {
            "whitelisted_entry": self.entry,
            "expires_at": self.expires_at,
            "expires_in_seconds": self.expires_in_seconds,
        }


class KnockFailed(Exception):
    """A knock that did not whitelist anything; `exit_code` tells the kind."""

    def __init__(self, message: str, exit_code: int, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status


class Transport(Protocol):
    """Sends one request; returns (HTTP status, body) for every status, raises OSError or
    http.client.HTTPException when no HTTP answer arrived."""

    def __call__(self, request: urllib.request.Request, timeout: float) -> tuple[int, bytes]: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would repeat the request, X-Api-Key included, to wherever a redirect points;
    # a knock must never carry the key to an address the user did not configure.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> None:
        return None


def urllib_transport(request: urllib.request.Request, timeout: float) -> tuple[int, bytes]:
    """The real transport: urllib with TLS verification, proxies from the environment, no
    redirects."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        # S310: settings only ever hold http(s) URLs (checked in _check_url).
        with opener.open(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), response.read(MAX_BODY_BYTES)
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), error.read(MAX_BODY_BYTES)


_EXPLAIN = {
    400: "the server refused the request as invalid input",
    401: "the API key was not accepted",
    403: "this key may not whitelist other addresses (drop --ip, or use a key with "
    "allow_remote_whitelist)",
    405: "the server does not accept knocks at this URL; check api_url",
    413: "the request body was too large",
    415: "the server refused the request's media type",
    429: "too many knocks from this address; wait a minute and try again",
    500: "the server failed to grant the whitelist",
    503: "the server cannot grant right now (firewall unavailable or overloaded)",
}

_EXIT_FOR_STATUS = {401: EXIT_UNAUTHORIZED, 403: EXIT_FORBIDDEN, 429: EXIT_RATE_LIMITED}


def _server_reason(body: bytes) -> str | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        text = "".join(ch if ch.isprintable() else " " for ch in data["error"])
        return text[:200]
    return None


def _parse_result(body: bytes) -> KnockResult:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if isinstance(data, dict):
        entry = data.get("whitelisted_entry")
        expires_at = data.get("expires_at")
        expires_in = data.get("expires_in_seconds")
        if (
            isinstance(entry, str)
            and entry
            and all(
                isinstance(v, int) and not isinstance(v, bool) for v in (expires_at, expires_in)
            )
        ):
            assert isinstance(expires_at, int) and isinstance(expires_in, int)
            return KnockResult(entry[:100], expires_at, expires_in)
    raise KnockFailed(
        "the server's 200 answer is not a knock result; check api_url", EXIT_OTHER, 200
    )


def send(
    settings: Settings, transport: Transport, request: urllib.request.Request, timeout: float
) -> tuple[int, bytes]:
    """transport(request); a network failure becomes KnockFailed (EXIT_NETWORK), whose
    message never holds the key."""
    try:
        return transport(request, timeout)
    except (OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        message = f"cannot reach {display_url(settings.api_url)}: {reason}"
        raise KnockFailed(redact(message, settings.api_key), EXIT_NETWORK) from None


def knock(
    settings: Settings,
    transport: Transport,
    ttl: int | None = None,
    ip: str | None = None,
    timeout: float = HTTP_TIMEOUT_SECONDS,
) -> KnockResult:
    """POST <api_url>/knock once: the KnockResult, or KnockFailed saying why (never the key)."""
    body: dict[str, object] = {}
    if ip:
        body["ip_address"] = ip
    if ttl is not None:
        body["ttl"] = ttl
    request = urllib.request.Request(  # noqa: S310 - http(s) only, see _check_url
        settings.knock_url,
        data=json.dumps(body).encode("utf-8"),
        method="POST",
        headers={
            "X-Api-Key": settings.api_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"knocker-client/{__version__}",
        },
    )
    status, payload = send(settings, transport, request, timeout)
    if status == 200:
        return _parse_result(payload)
    explanation = _EXPLAIN.get(status)
    if explanation is None:
        if 300 <= status < 400:
            explanation = "the server answered with a redirect; set api_url to its final address"
        else:
            explanation = "unexpected answer from the server"
    reason = _server_reason(payload)
    message = f"HTTP {status}: {explanation}" + (f" ({reason})" if reason else "")
    raise KnockFailed(
        redact(message, settings.api_key), _EXIT_FOR_STATUS.get(status, EXIT_OTHER), status
    )


def fetch_public_ip(url: str, transport: Transport, timeout: float = HTTP_TIMEOUT_SECONDS) -> str:
    """The address an ip_check_url service reports (plain text body); ValueError otherwise."""
    request = urllib.request.Request(  # noqa: S310 - http(s) only, see _check_url
        url, headers={"User-Agent": f"knocker-client/{__version__}", "Accept": "text/plain"}
    )
    try:
        status, body = transport(request, timeout)
    except (OSError, http.client.HTTPException) as error:
        raise ValueError(
            f"cannot reach {display_url(url)}: {getattr(error, 'reason', error)}"
        ) from None
    if status != 200:
        raise ValueError(f"{display_url(url)} answered HTTP {status}")
    text = body[:100].decode("ascii", "replace").strip()
    # A captive portal or error page must not count as "the address changed".
    if parse_ip(text) is None:
        raise ValueError(f"{display_url(url)} did not return an IP address")
    return text


def human_duration(seconds: float) -> str:
    """1 d 2 h, 3 h 5 min, 4 min 10 s, 42 s."""
    total = max(0, int(round(seconds)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def _local_time(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix))


def describe_result(result: KnockResult, now: float) -> str:
    remaining = result.expires_at - now
    return (
        f"Whitelisted {result.entry} until {_local_time(result.expires_at)} "
        f"(in {human_duration(remaining)})."
    )


def cap_warning(requested: int | None, result: KnockResult) -> str | None:
    if requested is not None and result.expires_in_seconds < requested:
        return (
            f"warning: the server granted {human_duration(result.expires_in_seconds)}, less "
            f"than the requested {human_duration(requested)} (the key's max_ttl caps it)"
        )
    return None
