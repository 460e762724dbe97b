"""The knock page: static files from knocker/web/, served by app.py when web.enabled.

Owns: which paths the page uses, their media types and the security headers that go with
them. Files are read once (app start) from package data; nothing here touches a request.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from .config import Config

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


def security_headers(body: bytes) -> list[tuple[str, str]]:
    return [
        ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),  # frame-ancestors for browsers that predate CSP 2
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
        # The file names carry no version, so an upgrade must not be hidden behind a stale
        # cache: revalidate every time (the ETag lets a server answer 304).
        ("Cache-Control", "no-cache"),
        ("ETag", '"' + hashlib.sha256(body).hexdigest()[:32] + '"'),
    ]


def routes(config: Config) -> dict[str, Route]:
    """path -> (content type, body, extra headers) for GET/HEAD; {} when web is disabled."""
    if not config.web.enabled:
        return {}
    web = resources.files("knocker").joinpath("web")
    table: dict[str, Route] = {}
    for path, (name, content_type) in _FILES.items():
        body = web.joinpath(name).read_bytes()
        table[path] = (content_type, body, security_headers(body))
    return table
