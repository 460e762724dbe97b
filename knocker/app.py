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
import stat
import sys
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from . import __version__
from .addresses import IPAddress, canonical, parse_ip, parse_network
from .audit import AuditLog, Event, Record
from .config import DEFAULT_CONFIG_NAME, ENV_CONFIG_PATH, Config, load_config_text
from .errors import (
    ConfigError,
    FirewallError,
    KnockerError,
    RequestError,
    StorageError,
    StorageUnavailable,
)
from .events import Observer
from .firewall import Firewall, create_firewall
from .openapi import OPENAPI_TITLE, openapi_document
from .policy import MAX_BODY, KnockBody, Verifier, authenticate, authorize, parse_body
from .proxies import ProxyResolver
from .ratelimit import Outcome, client_key
from .scopes import HostScopes
from .store import WhitelistBackend, atomic_write, open_backend
from .store.grant_format import Grant
from .whitelist import key_of

log = logging.getLogger("knocker")

Headers = list[tuple[str, str]]
Response = tuple[HTTPStatus, Headers, bytes]
StartResponse = Callable[..., Any]

_JSON = ("Content-Type", "application/json")
# Failed knocks that count against the failure budget (docs/api.md#rate-limiting); 429
# itself does not.
_COUNTED_FAILURES = frozenset(
    {
        HTTPStatus.BAD_REQUEST,
        HTTPStatus.UNAUTHORIZED,
        HTTPStatus.FORBIDDEN,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    }
)
_MAX_SCHEMA = 1 << 20  # a schema Knocker writes is a few kB
_STATUS_LINES = {status: f"{status.value} {status.phrase}" for status in HTTPStatus}


def _json(status: HTTPStatus, payload: object, headers: Headers | None = None) -> Response:
    body = json.dumps(payload).encode("utf-8")
    return status, [_JSON, *(headers or [])], body


class App:
    def __init__(
        self,
        config: Config,
        store: WhitelistBackend,
        firewall: Firewall,
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.firewall = firewall
        self._clock = clock
        self.observer = observer or create_observer(config, lambda: _live_entries(store))
        metrics = self.observer.metrics
        # /verify counts with one bound call (an mmap write, ~1 us): nothing when off.
        self._verify_counts = (
            {True: metrics.verify_allowed, False: metrics.verify_denied}
            if metrics is not None
            else None
        )
        self._resolver = ProxyResolver(config.server.trusted_proxies)
        self._verifier = Verifier(config, self._resolver)
        self._scopes = HostScopes(config.api_keys)
        self._keys_by_name = {key.name: key for key in config.api_keys}
        # Without host-scoped keys /verify asks exactly what it always did.
        self._scoped = self._scoped_allows if self._scopes.active else None
        self._cors: Headers = [("Access-Control-Allow-Origin", config.cors.allowed_origin)]
        self._openapi = (
            json.dumps(openapi_document(__version__)).encode()
            if config.documentation.enabled
            else None
        )
        self._pages = _web_routes(config)
        if self._openapi is not None:
            from .apidocs import routes as docs_routes  # edge module for /docs

            self._pages.update(docs_routes())
        self._started = False
        # /verify answers are constants: build their status lines and headers once.
        empty: Headers = [("Content-Length", "0")]
        self._verify_answers = {
            True: (_STATUS_LINES[HTTPStatus.OK], empty),
            False: (_STATUS_LINES[HTTPStatus.UNAUTHORIZED], empty),
        }

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
        self.observer.close()

    # ------------------------------------------------------------------ WSGI
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self._answer(environ, start_response)
        except Exception:
            # A bug or a fault nobody foresaw: one log line with the traceback, and a JSON
            # 500 (CORS on /knock, so a browser can read it), never the server's HTML page.
            path = environ.get("PATH_INFO", "")
            log.exception("unexpected error answering %s", ascii(path)[:100])
            status, headers, body = _json(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "Internal error; nothing was granted"}
            )
            if path == "/knock":
                headers += self._cors
            headers.append(("Content-Length", str(len(body))))
            start_response(_STATUS_LINES[status], headers, sys.exc_info())
            return (body,)

    def _answer(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path[:2] == "//":
            # A base URL with a trailing slash makes the Go and Android clients ask for
            # `//knock`: repeated leading slashes name the same route as one.
            path = "/" + path.lstrip("/")
        if path == "/verify":  # the hot path: every request to every protected service
            allowed = self._verifier.decide(
                environ.get("REMOTE_ADDR", ""),
                environ.get("HTTP_X_FORWARDED_FOR"),
                environ.get("HTTP_X_FORWARDED_HOST"),
                environ.get("HTTP_X_FORWARDED_URI"),
                self.store.allows,
                self._clock(),
                self._scoped,
            )
            if self._verify_counts is not None:
                self._verify_counts[allowed]()
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
                status, headers, body = self._knock(environ, self._reserved_knock)
            elif method == "DELETE":
                status, headers, body = self._knock(environ, self._sign_out)
            elif method == "OPTIONS":
                status, headers, body = (
                    HTTPStatus.NO_CONTENT,
                    [
                        ("Access-Control-Allow-Methods", "POST, DELETE, OPTIONS"),
                        ("Access-Control-Allow-Headers", "X-Api-Key, Content-Type"),
                        ("Access-Control-Max-Age", "600"),
                    ],
                    b"",
                )
            else:
                status, headers, body = _json(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    {"error": "Method not allowed"},
                    [("Allow", "POST, DELETE, OPTIONS")],
                )
            return status, headers + self._cors, body
        if path == "/grants" or path.startswith("/grants/"):
            return self._grants_route(path, method, environ)
        if method not in ("GET", "HEAD"):
            known = (
                path in ("/health", "/ready")
                or path in self._pages
                or (path == "/openapi.json" and self._openapi is not None)
                or (path == "/metrics" and self.observer.metrics is not None)
            )
            if known:
                return _json(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    {"detail": "Method Not Allowed"},
                    [("Allow", "GET, HEAD")],
                )
            return _json(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})
        if path == "/health":
            return _json(HTTPStatus.OK, {"status": "ok"})
        if path == "/ready":
            return self._ready()
        if path == "/openapi.json" and self._openapi is not None:
            return HTTPStatus.OK, [_JSON], self._openapi
        if path == "/metrics" and self.observer.metrics is not None:
            return self._metrics(environ)
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

    def _metrics(self, environ: dict[str, Any]) -> Response:
        """The scrape: only for addresses in metrics.allow or an admin key's holder."""
        metrics = self.observer.metrics
        assert metrics is not None
        client = self._resolver.client_ip(
            environ.get("REMOTE_ADDR", ""), environ.get("HTTP_X_FORWARDED_FOR")
        )
        allowed = client is not None and any(
            client in network for network in self.config.metrics.allow
        )
        if not allowed and environ.get("HTTP_X_API_KEY"):
            try:
                key = authenticate(self.config.api_keys, environ.get("HTTP_X_API_KEY"))
            except RequestError:
                pass
            else:
                allowed = key.admin
        if not allowed:
            return _json(HTTPStatus.FORBIDDEN, {"detail": "Forbidden"})
        from .metrics import CONTENT_TYPE

        return (
            HTTPStatus.OK,
            [("Content-Type", CONTENT_TYPE), ("Cache-Control", "no-store")],
            metrics.exposition(),
        )

    # ------------------------------------------------------------------ /knock
    def _knock(self, environ: dict[str, Any], handler: _Counted) -> Response:
        """Run `handler` (a knock, a sign-out, an admin request) within the caller's
        rate-limit budgets (docs/api.md#rate-limiting)."""
        now = self._clock()
        peer = environ.get("REMOTE_ADDR", "")
        client = self._resolver.client_ip(peer, environ.get("HTTP_X_FORWARDED_FOR"))
        # Unresolved clients are counted under the peer that sent them
        # (docs/api.md#rate-limiting).
        counted: IPAddress | None = client or parse_ip(peer)
        budget_key = client_key(counted) if counted is not None else bytes(16)
        # An unresolved client is "-" with its peer named: fail2ban must never ban a proxy.
        who = str(client) if client is not None else "-"
        via = None if client is not None else (peer or "?")
        # Check and hold this knock's place in the budgets in one step, so concurrent
        # knocks of one client can never get past a budget together.
        if not self.store.rate_reserve(budget_key, now):
            self.observer.knock(
                Record(Event.KNOCK_RATE_LIMITED, who, peer=via, result=429, reason="rate limited"),
                now,
            )
            window = self.config.security.knock_rate_limit.window_seconds
            return _json(
                HTTPStatus.TOO_MANY_REQUESTS,
                {"error": "Too many knocks; try again later"},
                [("Retry-After", str(window))],
            )
        outcome = Outcome.UNCOUNTED
        try:
            response, outcome = handler(environ, client, who, via, now)
        finally:
            self.store.rate_settle(budget_key, outcome, now)
        return response

    def _reserved_knock(
        self,
        environ: dict[str, Any],
        client: IPAddress | None,
        who: str,
        via: str | None,
        now: float,
    ) -> tuple[Response, Outcome]:
        key_name = "-"
        try:
            key = authenticate(self.config.api_keys, environ.get("HTTP_X_API_KEY"))
            key_name = key.name
            body = _parse_body(_read_body(environ), environ.get("CONTENT_TYPE"))
            grant = authorize(key, client, body)
        except RequestError as error:
            self._failed(error, who, key_name, via, now)
            counted = Outcome.FAILURE if error.status in _COUNTED_FAILURES else Outcome.UNCOUNTED
            return _error(error), counted
        try:
            how = "knock" if body.ip_address is None else "remote"
            result = self.store.knock(
                grant.key,
                grant.ttl,
                now,
                key_name=key.name,
                how=how,
                scoped=key.scoped,
                ports=tuple(map(str, key.ports)),
            )
        except (StorageError, FirewallError) as error:
            self.observer.knock(
                Record(
                    Event.KNOCK_ERROR,
                    who,
                    key_name,
                    grant.entry,
                    grant.ttl,
                    error.status.value,
                    error.message,
                    peer=via,
                ),
                now,
            )
            return _error(error), Outcome.UNCOUNTED
        self.observer.knock(
            Record(
                Event.EXTEND if result.extended else Event.GRANT,
                who,
                key_name,
                result.entry,
                grant.ttl,
                200,
                expires_at=result.expires_at,
                peer=via,
            ),
            now,
        )
        if result.evicted:
            self.observer.evicted(result.evicted, now)
        # The time actually left: a knock that keeps a longer grant reports that grant's
        # remaining seconds, which every client shows next to expires_at.
        left = max(grant.ttl, int(result.expires_at - now))
        return _json(
            HTTPStatus.OK,
            {
                "whitelisted_entry": result.entry,
                "expires_at": result.expires_at,
                "expires_in_seconds": left,
            },
        ), Outcome.SUCCESS

    # ------------------------------------------------------------------ grants
    def _grants_route(self, path: str, method: str, environ: dict[str, Any]) -> Response:
        """GET /grants and DELETE /grants/{entry} (docs/api.md#grants)."""
        allowed = "GET, HEAD" if path == "/grants" else "DELETE"
        if path == "/grants/" or method not in allowed.split(", "):
            return _json(
                HTTPStatus.METHOD_NOT_ALLOWED, {"error": "Method not allowed"}, [("Allow", allowed)]
            )
        return self._knock(environ, self._admin)

    def _admin(
        self,
        environ: dict[str, Any],
        client: IPAddress | None,
        who: str,
        via: str | None,
        now: float,
    ) -> tuple[Response, Outcome]:
        path = "/" + environ.get("PATH_INFO", "").lstrip("/")
        key_name = "-"
        try:
            key = authenticate(self.config.api_keys, environ.get("HTTP_X_API_KEY"))
            key_name = key.name
            if not key.admin:
                raise RequestError("This key may not manage grants", HTTPStatus.FORBIDDEN)
            if path == "/grants":
                listed = [self._grant_json(grant, now) for grant in self.store.grants(now)]
                log.info("grants key=%s client=%s result=200 listed=%d", key_name, who, len(listed))
                return _json(HTTPStatus.OK, {"grants": listed}), Outcome.SUCCESS
            # PATH_INFO arrives percent-decoded: 10.0.0.0%2F24 is 10.0.0.0/24 here.
            network = parse_network(path[len("/grants/") :])
            if network is None:
                raise RequestError("Not an IPv4/IPv6 address or CIDR network")
            ended = self.store.revoke(key_of(network), None, now)
        except KnockerError as error:
            self._failed(error, who, key_name, via, now)
            return _grant_error(error), _outcome(error)
        return self._ended(Event.REVOKE, key_name, who, via, canonical(network), ended, now)

    def _sign_out(
        self,
        environ: dict[str, Any],
        client: IPAddress | None,
        who: str,
        via: str | None,
        now: float,
    ) -> tuple[Response, Outcome]:
        """DELETE /knock: end this key's grants of the caller (or of ip_address)."""
        key_name = "-"
        try:
            key = authenticate(self.config.api_keys, environ.get("HTTP_X_API_KEY"))
            key_name = key.name
            body = parse_body(_read_body(environ), environ.get("CONTENT_TYPE"))
            if body.ttl is not None:
                raise RequestError("ttl has no meaning when signing out")
            grant = authorize(key, client, body)
            ended = self.store.revoke(grant.key, key.name, now)
        except KnockerError as error:
            self._failed(error, who, key_name, via, now)
            return _grant_error(error), _outcome(error)
        return self._ended(Event.SIGN_OUT, key_name, who, via, grant.entry, ended, now)

    def _failed(
        self, error: KnockerError, who: str, key_name: str, via: str | None, now: float
    ) -> None:
        """Count and audit a refused knock, revoke or sign-out."""
        self.observer.knock(
            Record(
                Event.KNOCK_FAILED,
                who,
                key_name,
                peer=via,
                result=error.status.value,
                reason=error.message,
            ),
            now,
        )

    def _ended(
        self,
        event: Event,
        key_name: str,
        who: str,
        via: str | None,
        entry: str,
        ended: list[Grant],
        now: float,
    ) -> tuple[Response, Outcome]:
        if not ended:
            self.observer.ended(
                Record(event, who, key_name, entry, result=404, peer=via, reason="no such grant"),
                now,
            )
            # Probing for grants counts like a failed knock.
            return _json(
                HTTPStatus.NOT_FOUND, {"error": f"No grant of {entry} to end"}
            ), Outcome.FAILURE
        self.observer.ended(
            Record(
                event,
                who,
                key_name,
                entry,
                result=200,
                peer=via,
                reason="ended " + ",".join(grant.key_name or "restored" for grant in ended),
            ),
            now,
        )
        return (
            _json(HTTPStatus.OK, {"removed": [self._grant_json(g, now) for g in ended]}),
            Outcome.SUCCESS,
        )

    def _grant_json(self, grant: Grant, now: float) -> dict[str, object]:
        """A grant as the API shows it; `scope` is its key's hosts and the grant's ports
        (null: every host, every monitored port; docs/api.md#scoped-keys)."""
        shown = grant.as_json(now)
        key = self._keys_by_name.get(grant.key_name or "")
        # A scoped grant whose key is gone (or lost its scopes) passes for no host; a
        # key scoped to ports alone passes for every host.
        hosts = list(key.hosts) if key and key.scoped else []
        shown["scope"] = (
            {
                "hosts": hosts if hosts or not (key and key.ports) else None,
                "ports": list(grant.ports) or None,
            }
            if grant.scoped
            else None
        )
        return shown

    def _scoped_allows(self, client: IPAddress, host: str | None, now: float) -> bool:
        names = self._scopes.keys_for(host)
        return bool(names) and self.store.scoped_allows(client, names, now)


def _grant_error(error: KnockerError) -> Response:
    if error.status < 500:
        return _error(error)
    return _json(error.status, {"error": "The grant could not be ended durably; try again"})


def _outcome(error: KnockerError) -> Outcome:
    return Outcome.FAILURE if error.status in _COUNTED_FAILURES else Outcome.UNCOUNTED


# (environ, client, who, via, now) -> (response, what it counts as)
_Counted = Callable[
    [dict[str, Any], IPAddress | None, str, str | None, float], tuple[Response, Outcome]
]


def _error(error: KnockerError) -> Response:
    """The one place a KnockerError becomes a response. A client's mistake (4xx) is
    explained in its own words; a server-side failure (5xx) never leaks internals."""
    if error.status < 500:
        return _json(error.status, {"error": error.message})
    message = {HTTPStatus.SERVICE_UNAVAILABLE: "Firewall unavailable; nothing was granted"}.get(
        error.status, "Knock could not be completed; nothing was granted"
    )
    if isinstance(error, StorageUnavailable):
        message = "Whitelist storage unavailable; nothing was granted"
    return _json(error.status, {"error": message})


def _parse_body(data: bytes, content_type: str | None) -> KnockBody:
    try:
        return parse_body(data, content_type)
    except RecursionError:  # `{"ttl": [[[...]]]}`: ~1,000 levels fit in MAX_BODY
        raise RequestError("Body is not valid JSON: nested too deeply") from None


def _read_body(environ: dict[str, Any]) -> bytes:
    """At most MAX_BODY bytes of the request body; 413 beyond, by header or by count
    (a chunked body has no Content-Length); 408 when the body does not arrive in time."""
    try:
        return _read_bounded(environ)
    except OSError:
        # The worker's body deadline (TimeoutError) or a client that went away mid-body.
        raise RequestError(
            "Request body not received in time", HTTPStatus.REQUEST_TIMEOUT
        ) from None
    except RequestError:
        raise
    except Exception:
        # The server's parser refused the body's framing (a bad chunk size, say):
        # the client's fault, whatever exception class that server uses.
        raise RequestError("Malformed request body") from None


def _read_bounded(environ: dict[str, Any]) -> bytes:
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


def _live_entries(store: WhitelistBackend) -> int:
    """Addresses with a live grant: entries() names a port-scoped one once per port
    (docs/firewalld.md#port-scoped-keys)."""
    return len({target.partition(" ")[0] for target in store.entries()})


def create_observer(config: Config, active_grants: Callable[[], int]) -> Observer:
    """The audit trail, plus metrics when metrics.enabled (`active_grants` is read at
    scrape time)."""
    metrics = None
    if config.metrics.enabled:
        # Imported only now: prometheus_client reads PROMETHEUS_MULTIPROC_DIR at import.
        from .metrics import Metrics

        metrics = Metrics(tuple(key.name for key in config.api_keys), active_grants)
    return Observer(AuditLog(config.audit.path), metrics)


def _web_routes(config: Config) -> dict[str, tuple[str, bytes, Headers]]:
    if not config.web.enabled:
        return {}
    from .webpage import routes  # edge module for the optional knock page

    return routes(config)


def configure_logging(level: str) -> None:
    """Knocker's lines on stderr, in the shape of gunicorn's own (one log to read)."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S %z",
    )
    logging.getLogger("knocker").setLevel(level)


def build_app(config: Config, clock: Callable[[], float] = time.time) -> App:
    """Open the storage and prepare the firewall for `config`; nothing started yet.
    Raises KnockerError when the service cannot run (it must not start half-working)."""
    # The hook for what the store and the firewall see (evictions, expiries, re-applies,
    # D-Bus and sync latency): knocker.events.Events, to be passed to them as it is wired.
    observer = create_observer(config, lambda: _live_entries(store))
    store_dir = os.path.dirname(os.path.abspath(config.whitelist.storage_path))
    firewall = create_firewall(config.firewalld, store_dir)
    store = open_backend(config, firewall, clock)
    problem = store.ready()
    if problem is None:
        log.info("whitelist %s loaded: %d entries", store.location, len(store))
    else:  # e.g. the redis backend, started before its server is reachable
        log.warning("whitelist %s: %d entries, not ready: %s", store.location, len(store), problem)
    try:
        # Restoring grants needs the entries as text: only worth building for a real
        # firewall.
        firewall.prepare(store.entries() if config.firewalld.enabled else {}, clock())
        if config.documentation.enabled:
            _write_openapi(config.documentation.openapi_output_path)
        else:
            remove_stale_openapi(config.documentation.openapi_output_path)
    except BaseException:
        store.close()  # a failed (re)load must not leave the files and the map open
        raise
    return App(config, store, firewall, clock, observer)


def _write_openapi(path: str) -> None:
    data = json.dumps(openapi_document(__version__), indent=2).encode()
    try:
        atomic_write(path, [data], mode=0o644)  # readable by whoever serves the docs
    except OSError as error:
        raise ConfigError(
            "documentation.openapi_output_path", f"cannot write {path}: {error.strerror}"
        ) from None
    log.info("OpenAPI description written to %s", path)


def _check_paths(config: Config) -> None:
    """What `serve` would refuse about the filesystem, found before it starts (so that
    check-config and SIGHUP refuse it too)."""
    if config.documentation.enabled:
        path = config.documentation.openapi_output_path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ConfigError(
                "documentation.openapi_output_path", f"directory {directory} does not exist"
            )
        if not os.access(directory, os.W_OK):
            raise ConfigError(
                "documentation.openapi_output_path",
                f"directory {directory} is not writable by this user",
            )


def remove_stale_openapi(path: str) -> bool:
    """With documentation off, delete the schema file a previous run wrote, so nothing
    else serves a stale one. Only a regular file (never through a symlink: O_NOFOLLOW)
    that parses as OpenAPI titled Knocker; anything else is left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # absent, a symlink (ELOOP), unreadable: not ours to judge
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size > _MAX_SCHEMA:
            return False
        with os.fdopen(os.dup(fd), "rb") as handle:
            document = json.loads(handle.read())
        ours = (
            isinstance(document, dict)
            and "openapi" in document
            and isinstance(document.get("info"), dict)
            and document["info"].get("title") == OPENAPI_TITLE
        )
        # The name must still lead to the file read (not swapped meanwhile).
        current = os.lstat(path)
        if not ours or (current.st_dev, current.st_ino) != (status.st_dev, status.st_ino):
            return False
        os.unlink(path)
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)
    log.info("documentation disabled: removed the stale OpenAPI file %s", path)
    return True


def load_config_file(path: str) -> Config:
    """Read and validate knocker.yaml; ConfigError names the file when it is unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not valid UTF-8"
        raise ConfigError("", f"cannot read config file {path}: {reason}") from error
    config = load_config_text(text)
    _check_paths(config)
    return config


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
