"""What `knocker watch` reports, and where it goes.

An event carries the Go knocker-cli's journald fields (docs/logging.md of knocker-cli, read
by the GNOME extension knocker-gnome): KNOCKER_EVENT, MESSAGE, PRIORITY and KNOCKER_* values,
every value a string. EventLog redacts the API key and hands each event to one writer:
native journal entries (JournalWriter), or one line per event on a stream (LineWriter:
human text, or JSON objects with the same fields).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from .journal_format import encode_entry
from .settings import redact

SCHEMA_VERSION = "1"
SYSLOG_IDENTIFIER = "knocker"

# syslog priorities (RFC 5424), as the Go client uses them.
PRIORITY_ERROR = 3
PRIORITY_WARNING = 4
PRIORITY_NOTICE = 5
PRIORITY_INFO = 6


@dataclass(frozen=True)
class Event:
    """One report: `name` is KNOCKER_EVENT (None for a plain message), `at` the wall time."""

    name: str | None
    message: str
    priority: int
    at: float
    fields: dict[str, str] = field(default_factory=dict)

    def journal_fields(self) -> list[tuple[str, str]]:
        """The entry as the journal stores it, in a fixed order."""
        head = [
            ("MESSAGE", self.message),
            ("PRIORITY", str(self.priority)),
            ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
            ("KNOCKER_SCHEMA_VERSION", SCHEMA_VERSION),
        ]
        if self.name:
            head.append(("KNOCKER_EVENT", self.name))
        return head + sorted(self.fields.items())


class Writer(Protocol):
    def write(self, event: Event) -> None: ...


class LineWriter:
    """One line per event: "<local time> <message>", or (as_json) a JSON object holding the
    journal fields plus KNOCKER_TIME_UNIX."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self._out = out
        self._json = as_json

    def write(self, event: Event) -> None:
        if self._json:
            record = dict(event.journal_fields())
            record["KNOCKER_TIME_UNIX"] = f"{event.at:.3f}"
            line = json.dumps(record)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
            line = f"{stamp} {event.message}"
        try:
            print(line, file=self._out, flush=True)
        except BrokenPipeError:
            pass  # a closed log reader must not kill the watcher


class JournalWriter:
    """Native journal entries through `send` (JournalSocket.send). When the journal refuses
    one, that event goes to `fallback` instead and the next one tries the journal again."""

    def __init__(self, send: Callable[[bytes], None], fallback: Writer) -> None:
        self._send = send
        self._fallback = fallback

    def write(self, event: Event) -> None:
        try:
            self._send(encode_entry(event.journal_fields()))
        except OSError:
            self._fallback.write(event)


class EventLog:
    """Builds events (values as strings, empty ones left out, the key redacted everywhere)
    and hands them to a writer."""

    def __init__(self, writer: Writer, secret: str, clock: Callable[[], float]) -> None:
        self._writer = writer
        self._secret = secret
        self._clock = clock

    def emit(
        self, name: str | None, message: str, priority: int = PRIORITY_INFO, **fields: object
    ) -> None:
        values = {
            key: redact(str(value), self._secret)
            for key, value in fields.items()
            if value is not None and value != ""
        }
        self._writer.write(
            Event(name, redact(message, self._secret), priority, self._clock(), values)
        )
