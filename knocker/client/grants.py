"""Sign-out and the grants API from the command line: `knocker knock --revoke`,
`knocker grants list [--json]` and `knocker grants revoke ENTRY` (docs/api.md#grants).

Same settings and transport as a knock (settings.py, knock.py): the key goes only in
X-Api-Key to the configured URL, never into output or errors.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Any

from .. import __version__
from .knock import (
    EXIT_FORBIDDEN,
    EXIT_OTHER,
    EXIT_RATE_LIMITED,
    EXIT_UNAUTHORIZED,
    HTTP_TIMEOUT_SECONDS,
    KnockFailed,
    Transport,
    human_duration,
    send,
)
from .settings import Settings, redact

EXIT_NOT_FOUND = 7  # 404: no such grant

_EXPLAIN = {
    400: "the server refused the request as invalid input",
    401: "the API key was not accepted",
    403: "this key may not do this (the grants API needs a key with admin: true; --ip "
    "needs allow_remote_whitelist)",
    404: "no such grant",
    405: "the server does not offer this at this URL (an older Knocker?); check api_url",
    429: "too many requests from this address; wait a minute and try again",
    500: "the server could not end the grant",
    503: "the server cannot do this right now",
}
_EXIT_FOR_STATUS = {
    401: EXIT_UNAUTHORIZED,
    403: EXIT_FORBIDDEN,
    404: EXIT_NOT_FOUND,
    429: EXIT_RATE_LIMITED,
}


def _call(
    settings: Settings,
    transport: Transport,
    method: str,
    path: str,
    body: dict[str, object] | None = None,
    timeout: float = HTTP_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """One request to <api_url><path>; the JSON object of a 200, else KnockFailed."""
    headers = {
        "X-Api-Key": settings.api_key,
        "Accept": "application/json",
        "User-Agent": f"knocker-client/{__version__}",
    }
    data = None
    if body:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(  # noqa: S310 - http(s) only, see settings._check_url
        settings.api_url.rstrip("/") + path, data=data, method=method, headers=headers
    )
    status, payload = send(settings, transport, request, timeout)
    try:
        answer = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        answer = None
    if status == 200 and isinstance(answer, dict):
        return answer
    explanation = _EXPLAIN.get(status, "unexpected answer from the server")
    reason = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(reason, str):
        explanation += " (" + "".join(c if c.isprintable() else " " for c in reason)[:200] + ")"
    raise KnockFailed(
        redact(f"HTTP {status}: {explanation}", settings.api_key),
        _EXIT_FOR_STATUS.get(status, EXIT_OTHER),
        status,
    )


def _grant_list(answer: dict[str, Any], member: str) -> list[dict[str, Any]]:
    grants = answer.get(member)
    if not isinstance(grants, list) or not all(isinstance(g, dict) for g in grants):
        raise KnockFailed(
            f"the server's answer has no {member} list; check api_url", EXIT_OTHER, 200
        )
    return grants


def sign_out(
    settings: Settings, transport: Transport, ip: str | None = None
) -> list[dict[str, Any]]:
    """DELETE <api_url>/knock: end this key's grants of this machine (or `ip`)."""
    body: dict[str, object] = {"ip_address": ip} if ip else {}
    return _grant_list(_call(settings, transport, "DELETE", "/knock", body), "removed")


def list_grants(settings: Settings, transport: Transport) -> list[dict[str, Any]]:
    """GET <api_url>/grants (admin keys)."""
    return _grant_list(_call(settings, transport, "GET", "/grants"), "grants")


def revoke_grant(settings: Settings, transport: Transport, entry: str) -> list[dict[str, Any]]:
    """DELETE <api_url>/grants/{entry} (admin keys); the entry URL-encoded."""
    path = "/grants/" + urllib.parse.quote(entry, safe="")
    return _grant_list(_call(settings, transport, "DELETE", path), "removed")


def _text(value: object) -> str:
    return "-" if value is None else "".join(c if c.isprintable() else " " for c in str(value))


def _scope_text(scope: object) -> str:
    """A grant's scope for the table: its hosts ("all hosts" when not host-scoped), then
    its ports when port-scoped."""
    hosts = scope.get("hosts") if isinstance(scope, dict) else None
    ports = scope.get("ports") if isinstance(scope, dict) else None
    text = (
        "all hosts"
        if not isinstance(hosts, list)
        else ",".join(str(host) for host in hosts) or "none"
    )
    if isinstance(ports, list):
        text += " ports " + ",".join(str(port) for port in ports)
    return _text(text)[:60]


def grants_table(grants: list[dict[str, Any]], now: float) -> str:
    """The grants as an aligned table: entry, key, how, expiry, time left, scope."""
    rows = [("ENTRY", "KEY", "HOW", "EXPIRES", "LEFT", "SCOPE")]
    for grant in grants:
        expires_at = grant.get("expires_at")
        when = left = "-"
        if isinstance(expires_at, int):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires_at))
            left = human_duration(expires_at - now)
        rows.append(
            (
                _text(grant.get("entry"))[:50],
                _text(grant.get("key_name"))[:40],
                _text(grant.get("how"))[:10],
                when,
                left,
                _scope_text(grant.get("scope")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def describe_removed(removed: list[dict[str, Any]]) -> str:
    ended = ", ".join(f"{_text(g.get('entry'))} (by {_text(g.get('key_name'))})" for g in removed)
    return f"Signed out: ended {ended}." if removed else "Nothing to end."
