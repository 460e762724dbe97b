"""One exception base and one subclass per boundary.

Owns: the mapping from a failure to the HTTP status a client sees. app.py is the only
place that turns these into responses; everything else raises them.
"""

from __future__ import annotations

from http import HTTPStatus


class KnockerError(Exception):
    """Base of every error Knocker raises on purpose; carries the HTTP status to send."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, status: HTTPStatus | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class ConfigError(KnockerError):
    """knocker.yaml is unusable; `path` names the offending key (e.g. api_keys[1].max_ttl)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class RequestError(KnockerError):
    """The client sent something we refuse (400, 401, 403, 405, 413, 415, 429)."""

    status = HTTPStatus.BAD_REQUEST


class StorageError(KnockerError):
    """The whitelist could not be read or made durable."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


class StorageUnavailable(StorageError):
    """A shared store (redis) cannot be reached now; the knock granted nothing."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class FirewallError(KnockerError):
    """The firewall backend refused or failed a change."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


class FirewallUnavailable(FirewallError):
    """The firewall backend cannot be reached or is overloaded right now."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
