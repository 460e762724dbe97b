"""Edge: /docs, Swagger UI for /openapi.json, served by Knocker itself (no CDN).

Owns: the /docs paths. Swagger UI's JavaScript and CSS come from the swagger-ui-py package
(`pip install knocker[docs]`), which ships them as package data; the page and its start-up
script are Knocker's own (knocker/web/docs/), so the knock page's strict
Content-Security-Policy applies unchanged. Files are read once, at app start.
swagger-ui.css draws its icons from data: URLs, which that policy's `img-src 'self'`
refuses: each is served as a file of its own under /docs/img/ and the CSS points there.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
import re
import urllib.parse
from importlib import resources

from .webpage import Route, security_headers

log = logging.getLogger("knocker")

# path -> (file, media type); "ours:" files come from knocker/web/docs/, the rest from
# swagger-ui-py's static/ directory.
_FILES: dict[str, tuple[str, str]] = {
    "/docs": ("ours:index.html", "text/html; charset=utf-8"),
    "/docs/init.js": ("ours:init.js", "text/javascript; charset=utf-8"),
    "/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "/docs/swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    "/docs/index.css": ("index.css", "text/css; charset=utf-8"),
    "/docs/favicon-32x32.png": ("favicon-32x32.png", "image/png"),
}


def swagger_ui_static() -> str | None:
    """swagger-ui-py's static/ directory, found without importing the package (its
    __init__ loads framework handlers Knocker has no use for); None when not installed."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = os.path.join(list(spec.submodule_search_locations)[0], "static")
    return directory if os.path.isdir(directory) else None


# url("...") with CSS escapes inside, or a bare url(data:...)
_DATA_URL = re.compile(r'url\((?:"((?:[^"\\]|\\.)*)"|(data:[^)"\']*))\)')
_CSS_ESCAPE = re.compile(r"\\(.)")
_EXTENSIONS = {"image/svg+xml": "svg", "image/png": "png", "image/jpeg": "jpg", "image/gif": "gif"}


def inline_images_to_files(css: bytes) -> tuple[bytes, dict[str, tuple[str, bytes]]]:
    """The CSS with each data: image URL replaced by /docs/img/<hash>.<ext>, and those
    files as path -> (media type, body). Other url()s are left as they are."""
    files: dict[str, tuple[str, bytes]] = {}

    def replace(match: re.Match[str]) -> str:
        quoted, bare = match.group(1), match.group(2)
        url = _CSS_ESCAPE.sub(r"\1", quoted) if quoted is not None else bare
        header, comma, payload = url.partition(",")
        if not url.startswith("data:") or not comma:
            return match.group(0)
        params = header[len("data:") :].split(";")
        media_type = params[0]
        if media_type not in _EXTENSIONS:
            return match.group(0)
        if "base64" in params[1:]:
            body = base64.b64decode(payload)
        else:
            body = urllib.parse.unquote_to_bytes(payload)
        name = hashlib.sha256(body).hexdigest()[:16]
        path = f"/docs/img/{name}.{_EXTENSIONS[media_type]}"
        files[path] = (media_type, body)
        return f'url("{path}")'

    text = _DATA_URL.sub(replace, css.decode("utf-8"))
    return text.encode("utf-8"), files


def routes() -> dict[str, Route]:
    """path -> (content type, body, headers) for /docs; {} (logged) without swagger-ui-py."""
    static = swagger_ui_static()
    if static is None:
        log.warning(
            "documentation enabled but /docs is off: swagger-ui-py is not "
            "installed (pip install 'knocker[docs]'); /openapi.json is served"
        )
        return {}
    ours = resources.files("knocker").joinpath("web").joinpath("docs")
    table: dict[str, Route] = {}
    for path, (name, content_type) in _FILES.items():
        if name.startswith("ours:"):
            body = ours.joinpath(name.removeprefix("ours:")).read_bytes()
        else:
            with open(os.path.join(static, name), "rb") as handle:
                body = handle.read()
        table[path] = (content_type, body, security_headers(body))
    content_type, css, _ = table["/docs/swagger-ui.css"]
    css, images = inline_images_to_files(css)
    table["/docs/swagger-ui.css"] = (content_type, css, security_headers(css))
    for path, (media_type, body) in images.items():
        table[path] = (media_type, body, security_headers(body))
    return table
