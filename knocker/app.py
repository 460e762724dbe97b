"""Edge: the WSGI callable. The only module that reads environ and wsgi.input.

Owns: routing (docs/api.md), reading the knock body within its bounds, turning every
KnockerError a request meets into its HTTP response (in one place: `_error`), the knock
log line, finding and reading knocker.yaml (docs/configuration.md#finding-the-file), and
the lifecycle of the store and the firewall. A request's time comes from here: the
injected `clock` is read once per knock or /verify and handed down as `now` to the pure
core. (The store and the firewalld driver also keep time for their own background work.)
Handlers return Response values; `App.__call__` alone speaks WSGI.
`gunicorn 'knocker.app:create_app()'` serves it as is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from . import __version__
from .addresses import IPAddress, parse_ip
from .config import DEFAULT_CONFIG_NAME, ENV_CONFIG_PATH, Config, load_config_text
from .errors import (
    ConfigError,
    FirewallError,
    KnockerError,
    RequestError,
    StorageError,
    StorageUnavailable,
)
from .firewall import Firewall, create_firewall
from .openapi import openapi_document
from .policy import MAX_BODY, Verifier, authenticate, authorize, parse_body
from .proxies import ProxyResolver
from .ratelimit import Outcome, client_key
from .store import WhitelistBackend, atomic_write, open_backend

log = logging.getLogger("knocker")

Headers = list[tuple[str, str]]
Response = tuple[HTTPStatus, Headers, bytes]
StartResponse = Callable[..., Any]

_JSON = ("Content-Type", "application/json")
# Failed knocks that count against the failure budget (docs/api.md#rate-limiting); 429
# itself does not.
_COUNTED_FAILURES = frozenset({HTTPStatus.BAD_REQUEST, HTTPStatus.UNAUTHORIZED,
                               HTTPStatus.FORBIDDEN, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               HTTPStatus.UNSUPPORTED_MEDIA_TYPE})
_STATUS_LINES = {status: f"{status.value} {status.phrase}" for status in HTTPStatus}


def _json(status: HTTPStatus, payload: object, headers: Headers | None = None) -> Response:
    body = json.dumps(payload).encode("utf-8")
    return status, [_JSON, *(headers or [])], body


class App:
    def __init__(self, config: Config, store: WhitelistBackend, firewall: Firewall,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.firewall = firewall
        self._clock = clock
        self._resolver = ProxyResolver(config.server.trusted_proxies)
        self._verifier = Verifier(config, self._resolver)
        self._cors: Headers = [("Access-Control-Allow-Origin", config.cors.allowed_origin)]
        self._openapi = (json.dumps(openapi_document(__version__)).encode()
                         if config.documentation.enabled else None)
        self._pages = _web_routes(config)
        self._started = False
        # /verify answers are constants: build their status lines and headers once.
        empty: Headers = [("Content-Length", "0")]
        self._verify_answers = {True: (_STATUS_LINES[HTTPStatus.OK], empty),
                                False: (_STATUS_LINES[HTTPStatus.UNAUTHORIZED], empty)}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start this serving process's background work (after any fork)."""
        if not self._started:
            self._started = True
            self.store.start()
            self.firewall.start_worker(self.store.entries)

    def close(self) -> None:
        self.firewall.close()
        self.store.close()

    # ------------------------------------------------------------------ WSGI
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/verify":  # the hot path: every request to every protected service
            allowed = self._verifier.decide(
                environ.get("REMOTE_ADDR", ""), environ.get("HTTP_X_FORWARDED_FOR"),
                environ.get("HTTP_X_FORWARDED_HOST"), environ.get("HTTP_X_FORWARDED_URI"),
                self.store.allows, self._clock())
            status_line, headers = self._verify_answers[allowed]
            start_response(status_line, headers)
            return ()
        status, headers, body = self._route(path, environ)
        # RFC 9110 8.6: no Content-Length on a 204; on a 304 it could only repeat the 200's.
        if status not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            headers.append(("Content-Length", str(len(body))))  # HEAD: GET's length
        if environ.get("REQUEST_METHOD") == "HEAD":
            body = b""
        start_response(_STATUS_LINES[status], headers)
        return (body,)

    def _route(self, path: str, environ: dict[str, Any]) -> Response:
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/knock":
            if method == "POST":
                status, headers, body = self._knock(environ)
            elif method == "OPTIONS":
                status, headers, body = HTTPStatus.NO_CONTENT, [
                    ("Access-Control-Allow-Methods", "POST, OPTIONS"),
                    ("Access-Control-Allow-Headers", "X-Api-Key, Content-Type"),
                    ("Access-Control-Max-Age", "600")], b""
            else:
                status, headers, body = _json(HTTPStatus.METHOD_NOT_ALLOWED,
                                              {"error": "Method not allowed"},
                                              [("Allow", "POST, OPTIONS")])
            return status, headers + self._cors, body
        if method not in ("GET", "HEAD"):
            known = path in ("/health", "/ready") or path in self._pages or (
                path == "/openapi.json" and self._openapi is not None)
            if known:
                return _json(HTTPStatus.METHOD_NOT_ALLOWED, {"detail": "Method Not Allowed"},
                             [("Allow", "GET, HEAD")])
            return _json(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})
        if path == "/health":
            return _json(HTTPStatus.OK, {"status": "ok"})
        if path == "/ready":
            return self._ready()
        if path == "/openapi.json" and self._openapi is not None:
            return HTTPStatus.OK, [_JSON], self._openapi
        page = self._pages.get(path)
        if page is not None:
            content_type, body, extra = page
            if _not_modified(environ.get("HTTP_IF_NONE_MATCH"), extra):
                # RFC 9110 15.4.5: the validators and caching headers of the 200, no body.
                return HTTPStatus.NOT_MODIFIED, [h for h in extra if h[0] in _REVALIDATE], b""
            return HTTPStatus.OK, [("Content-Type", content_type), *extra], body
        return _json(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})

    def _ready(self) -> Response:
        problem = self.store.ready() or self.firewall.problem()
        if problem:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "not ready", "error": problem})
        return _json(HTTPStatus.OK, {"status": "ready"})

    # ------------------------------------------------------------------ /knock
    def _knock(self, environ: dict[str, Any]) -> Response:
        now = self._clock()
        peer = environ.get("REMOTE_ADDR", "")
        client = self._resolver.client_ip(peer, environ.get("HTTP_X_FORWARDED_FOR"))
        # Unresolved clients are counted under the peer that sent them
        # (docs/api.md#rate-limiting).
        counted: IPAddress | None = client or parse_ip(peer)
        budget_key = client_key(counted) if counted is not None else bytes(16)
        who = str(client) if client is not None else f"unresolved via {peer or '?'}"
        # Check and hold this knock's place in the budgets in one step, so concurrent
        # knocks of one client can never get past a budget together.
        if not self.store.rate_reserve(budget_key, now):
            log.info("knock key=- client=%s entry=- ttl=- result=429 rate limited", who)
            window = self.config.security.knock_rate_limit.window_seconds
            return _json(HTTPStatus.TOO_MANY_REQUESTS,
                         {"error": "Too many knocks; try again later"},
                         [("Retry-After", str(window))])
        outcome = Outcome.UNCOUNTED
        try:
            response, outcome = self._reserved_knock(environ, client, who, now)
        finally:
            self.store.rate_settle(budget_key, outcome, now)
        return response

    def _reserved_knock(self, environ: dict[str, Any], client: IPAddress | None, who: str,
                        now: float) -> tuple[Response, Outcome]:
        key_name = "-"
        try:
            key = authenticate(self.config.api_keys, environ.get("HTTP_X_API_KEY"))
            key_name = key.name
            body = parse_body(_read_body(environ), environ.get("CONTENT_TYPE"))
            grant = authorize(key, client, body)
        except RequestError as error:
            log.info("knock key=%s client=%s entry=- ttl=- result=%d %s", key_name, who,
                     error.status.value, error.message)
            counted = Outcome.FAILURE if error.status in _COUNTED_FAILURES else Outcome.UNCOUNTED
            return _error(error), counted
        try:
            result = self.store.knock(grant.key, grant.ttl, now)
        except (StorageError, FirewallError) as error:
            log.error("knock key=%s client=%s entry=%s ttl=%d result=%d %s", key_name, who,
                      grant.entry, grant.ttl, error.status.value, error.message)
            return _error(error), Outcome.UNCOUNTED
        log.info("knock key=%s client=%s entry=%s ttl=%d result=200 expires_at=%d", key_name,
                 who, result.entry, grant.ttl, result.expires_at)
        return _json(HTTPStatus.OK, {"whitelisted_entry": result.entry,
                                     "expires_at": result.expires_at,
                                     "expires_in_seconds": grant.ttl}), Outcome.SUCCESS


def _error(error: KnockerError) -> Response:
    """The one place a KnockerError becomes a response. A client's mistake (4xx) is
    explained in its own words; a server-side failure (5xx) never leaks internals."""
    if error.status < 500:
        return _json(error.status, {"error": error.message})
    message = {HTTPStatus.SERVICE_UNAVAILABLE: "Firewall unavailable; nothing was granted"}.get(
        error.status, "Knock could not be completed; nothing was granted")
    if isinstance(error, StorageUnavailable):
        message = "Whitelist storage unavailable; nothing was granted"
    return _json(error.status, {"error": message})


def _read_body(environ: dict[str, Any]) -> bytes:
    """At most MAX_BODY bytes of the request body; 413 beyond, by header or by count
    (a chunked body has no Content-Length)."""
    length_text = environ.get("CONTENT_LENGTH") or ""
    stream = environ.get("wsgi.input")
    if length_text:
        if not length_text.isdigit():
            raise RequestError("Invalid Content-Length")
        length = int(length_text)
        if length > MAX_BODY:
            raise RequestError("Body too large", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return stream.read(length) if stream is not None and length else b""
    if stream is None or "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    data = b""
    while len(data) <= MAX_BODY:
        chunk = stream.read(MAX_BODY + 1 - len(data))
        if not chunk:
            return data
        data += chunk
    raise RequestError("Body too large", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


_REVALIDATE = frozenset({"ETag", "Cache-Control"})


def _not_modified(if_none_match: str | None, headers: Headers) -> bool:
    if not if_none_match:
        return False
    from .webpage import not_modified  # only pages carry an ETag

    return not_modified(if_none_match, dict(headers)["ETag"])


def _web_routes(config: Config) -> dict[str, tuple[str, bytes, Headers]]:
    if not config.web.enabled:
        return {}
    from .webpage import routes  # edge module for the optional knock page

    return routes(config)


def configure_logging(level: str) -> None:
    """Knocker's lines on stderr, in the shape of gunicorn's own (one log to read)."""
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S %z")
    logging.getLogger("knocker").setLevel(level)


def build_app(config: Config, clock: Callable[[], float] = time.time) -> App:
    """Open the storage and prepare the firewall for `config`; nothing started yet.
    Raises KnockerError when the service cannot run (it must not start half-working)."""
    store_dir = os.path.dirname(os.path.abspath(config.whitelist.storage_path))
    firewall = create_firewall(config.firewalld, store_dir)
    store = open_backend(config, firewall, clock)
    log.info("whitelist %s loaded: %d entries", store.location, len(store))
    try:
        # Restoring grants needs the entries as text: only worth building for a real
        # firewall.
        firewall.prepare(store.entries() if config.firewalld.enabled else {}, clock())
        if config.documentation.enabled:
            _write_openapi(config.documentation.openapi_output_path)
    except BaseException:
        store.close()  # a failed (re)load must not leave the files and the map open
        raise
    return App(config, store, firewall, clock)


def _write_openapi(path: str) -> None:
    data = json.dumps(openapi_document(__version__), indent=2).encode()
    atomic_write(path, [data], mode=0o644)  # readable by whoever serves the docs
    log.info("OpenAPI description written to %s", path)


def load_config_file(path: str) -> Config:
    """Read and validate knocker.yaml; ConfigError names the file when it is unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not valid UTF-8"
        raise ConfigError("", f"cannot read config file {path}: {reason}") from error
    return load_config_text(text)


def config_path(explicit: str | None = None) -> str:
    """--config, else $KNOCKER_CONFIG_PATH, else ./knocker.yaml
    (docs/configuration.md#finding-the-file)."""
    return explicit or os.environ.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_NAME


def create_app(config: Config | None = None) -> App:
    """WSGI factory for `gunicorn 'knocker.app:create_app()'` (one call per worker):
    config from KNOCKER_CONFIG_PATH or ./knocker.yaml, storage opened, threads started."""
    if config is None:
        config = load_config_file(config_path())
    configure_logging(config.logging.level)
    app = build_app(config)
    app.start()
    return app
