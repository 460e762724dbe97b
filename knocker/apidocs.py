"""Edge: /docs, Swagger UI for /openapi.json, served by Knocker itself (no CDN).

Owns: the /docs paths. Swagger UI's JavaScript and CSS come from the swagger-ui-py package
(`pip install knocker[docs]`), which ships them as package data; the page and its start-up
script are Knocker's own (knocker/web/docs/), so the knock page's strict
Content-Security-Policy applies unchanged. Files are read once, at app start.
"""

from __future__ import annotations

import importlib.util
import logging
import os
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


def routes() -> dict[str, Route]:
    """path -> (content type, body, headers) for /docs; {} (logged) without swagger-ui-py."""
    static = swagger_ui_static()
    if static is None:
        log.warning("documentation enabled but /docs is off: swagger-ui-py is not "
                    "installed (pip install 'knocker[docs]'); /openapi.json is served")
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
    return table
