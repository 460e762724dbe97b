"""The knock page: static files from knocker/web/, served by app.py when web.enabled.

Owns: which paths the page uses, their media types, the security and caching headers that
go with them, and the If-None-Match comparison that lets app.py answer 304 Not Modified
(docs/api.md#the-knock-page). Files are read once (app start) from package data, and the
page gets the server's MAX_TTL filled in; app.py reads the request and calls
`not_modified`.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from .config import MAX_TTL, Config

# path -> (file under knocker/web/, media type)
_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/manifest.webmanifest": ("manifest.webmanifest", "application/manifest+json"),
    "/icon.svg": ("icon.svg", "image/svg+xml"),
    "/icon-192.png": ("icon-192.png", "image/png"),
    "/icon-512.png": ("icon-512.png", "image/png"),
    "/apple-touch-icon.png": ("apple-touch-icon.png", "image/png"),
}

# Everything the page needs comes from this origin; nothing may frame it, submit it
# elsewhere or rebase its URLs. Inline script and style stay forbidden, so an injected
# string can never run: app.js and app.css are separate files for that reason.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "manifest-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    )
)

Route = tuple[str, bytes, list[tuple[str, str]]]

# index.html carries this empty attribute; the page reads the filled-in value, so the
# longest TTL it offers is the server's own MAX_TTL, written down once (config.py).
_MAX_TTL_SLOT = b'data-max-ttl=""'


def security_headers(body: bytes) -> list[tuple[str, str]]:
    return [
        ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),  # frame-ancestors for browsers that predate CSP 2
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
        # The file names carry no version, so an upgrade must not be hidden behind a stale
        # cache: revalidate every time; a matching If-None-Match gets 304 (not_modified).
        ("Cache-Control", "no-cache"),
        ("ETag", '"' + hashlib.sha256(body).hexdigest()[:32] + '"'),
    ]


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """True when an If-None-Match header value names `etag` (or is "*"): the client's copy
    is current. RFC 9110 13.1.2: a list of entity tags, compared weakly (W/ ignored)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == wanted for tag in if_none_match.split(","))


def routes(config: Config) -> dict[str, Route]:
    """path -> (content type, body, extra headers) for GET/HEAD; {} when web is disabled."""
    if not config.web.enabled:
        return {}
    web = resources.files("knocker").joinpath("web")
    table: dict[str, Route] = {}
    for path, (name, content_type) in _FILES.items():
        body = web.joinpath(name).read_bytes()
        if name == "index.html":
            assert _MAX_TTL_SLOT in body, "index.html lost its data-max-ttl attribute"
            body = body.replace(_MAX_TTL_SLOT, b'data-max-ttl="%d"' % MAX_TTL)
        table[path] = (content_type, body, security_headers(body))
    return table
