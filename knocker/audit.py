"""Edge: the audit trail. One structured line per event, in the log and optionally a file.

Owns: the event types, the line shape fail2ban matches (deploy/fail2ban/filter.d/knocker.conf)
and the JSON-lines file at `audit.path`, reopened when logrotate renamed it away. Never
given a key: records carry the key's configured name only.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("knocker.audit")


class Event(enum.StrEnum):
    """What happened."""

    GRANT = "grant"  # a knock whitelisted an entry that was not live
    EXTEND = "extend"  # a knock for an entry that was live (a re-knock)
    EVICT = "evict"  # a full whitelist dropped this entry for a newer knock
    EXPIRE = "expire"  # the entry's TTL ran out and it was purged
    KNOCK_FAILED = "knock_failed"  # a refused knock the client is to blame for (fail2ban)
    KNOCK_RATE_LIMITED = "knock_rate_limited"  # 429: the client's budget is spent
    KNOCK_ERROR = "knock_error"  # nothing granted because storage or firewall failed
    REVOKE = "revoke"  # an admin key ended grants of an entry (DELETE /grants/{entry})
    SIGN_OUT = "sign_out"  # a key ended its own grants of a device (DELETE /knock)


@dataclass(frozen=True)
class Record:
    """One audit event. `client` is an IP address or "-" (unresolved, see `peer`)."""

    event: Event
    client: str = "-"
    key: str = "-"
    entry: str = "-"
    ttl: int | None = None
    result: int | None = None  # the HTTP status answered, for knocks
    reason: str | None = None
    expires_at: int | None = None
    peer: str | None = None  # the TCP peer, when it is not the client

    def fields(self) -> dict[str, object]:
        """The record as ordered fields, unset optional ones left out."""
        out: dict[str, object] = {
            "event": self.event.value,
            "client": self.client,
            "key": self.key,
            "entry": self.entry,
        }
        optional = {
            "ttl": self.ttl,
            "result": self.result,
            "expires_at": self.expires_at,
            "peer": self.peer,
            "reason": self.reason,
        }
        out.update((name, value) for name, value in optional.items() if value is not None)
        return out


_BARE = re.compile(r"[^\s\"=\\\x00-\x1f\x7f]+")


def format_line(record: Record) -> str:
    """`event=... client=... key=... entry=...` (logfmt): a value that is not one plain
    token is JSON-quoted, so no field can contain a line break or fake another field.
    `event` and `client` always come first: fail2ban's filter anchors on them."""
    parts = []
    for name, value in record.fields().items():
        text = str(value)
        parts.append(f"{name}={text if _BARE.fullmatch(text) else json.dumps(text)}")
    return " ".join(parts)


class AuditFile:
    """Appends JSON lines to `path`; reopens it when it was renamed or deleted (logrotate's
    default `create` mode), found by comparing the path's inode with the open file's, as
    logging.handlers.WatchedFileHandler does. Each line is one O_APPEND write(2), so the
    workers of one service can share the file without interleaving."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._identity: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def write(self, fields: Mapping[str, object], now: float) -> None:
        data = json.dumps({"time": round(now, 3), **fields}, separators=(",", ":"))
        line = (data + "\n").encode("utf-8")
        with self._lock:
            self._reopen_if_moved()
            os.write(self._fd, line)

    def _reopen_if_moved(self) -> None:
        try:
            status = os.stat(self.path)
            identity: tuple[int, int] | None = (status.st_dev, status.st_ino)
        except FileNotFoundError:
            identity = None
        if self._fd >= 0 and identity == self._identity:
            return
        self.close_file()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        opened = os.fstat(self._fd)
        self._identity = (opened.st_dev, opened.st_ino)

    def close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        with self._lock:
            self.close_file()


class AuditLog:
    """Writes each record as one INFO line on `knocker.audit` (ERROR for knock_error) and,
    when configured, as one JSON line in the audit file. A file that cannot be written is
    logged, never raised: the audit trail must not turn a knock into an error."""

    def __init__(self, path: str | None) -> None:
        self.file = AuditFile(path) if path else None

    def emit(self, record: Record, now: float) -> None:
        level = logging.ERROR if record.event is Event.KNOCK_ERROR else logging.INFO
        log.log(level, "%s", format_line(record))
        if self.file is not None:
            try:
                self.file.write(record.fields(), now)
            except OSError as error:
                log.error("cannot write audit file %s: %s", self.file.path, error.strerror)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
