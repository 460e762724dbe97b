"""The bare-WSGI floor of `make bench`: the cheapest possible 200 under gunicorn.

Served with the same worker class, worker and thread counts as `knocker serve`, so the
difference between the two is Knocker's own work per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

_HEADERS = [("Content-Length", "0")]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", _HEADERS)
    return ()
