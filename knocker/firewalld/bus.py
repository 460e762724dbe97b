"""The only code that talks to the D-Bus system bus.

Owns: BusConnection, a blocking jeepney connection that sends a call and waits for its
reply, or receives the signals its owner subscribed to. Both the backend's calls and the
watcher's signals go through it; everything else in this package builds messages
(messages.py) or works over the Connection protocol (a fake firewalld in unit tests).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Protocol

from jeepney import HeaderFields, Message, MessageType
from jeepney.io.blocking import DBusConnection, open_dbus_connection

from .failures import DBusError


class Connection(Protocol):
    """What the firewalld calls need from a bus: one call at a time, reply body back."""

    def call(self, message: Message, timeout: float) -> tuple[Any, ...]: ...

    def close(self) -> None: ...


class SignalConnection(Connection, Protocol):
    """A Connection that also receives the signals it subscribed to (the watcher's)."""

    def receive(self, timeout: float) -> Message | None: ...


def bus_address() -> str:
    """jeepney's 'SYSTEM' is $DBUS_SYSTEM_BUS_ADDRESS, else /var/run/dbus/system_bus_socket."""
    return "SYSTEM"


class BusConnection:
    """A blocking jeepney connection opened on first use and dropped after any transport
    failure, so the next call reconnects (the bus daemon may restart too). Not
    thread-safe: its owner serialises its use. Never shared across fork()."""

    def __init__(self, address: str | None = None) -> None:
        self._address = address or bus_address()
        self._conn: DBusConnection | None = None
        self._pid = 0

    def _open(self) -> DBusConnection:
        if self._conn is None or self._pid != os.getpid():
            self._conn = None  # a socket inherited across fork belongs to the parent
            self._conn = open_dbus_connection(bus=self._address, auth_timeout=2.0)
            self._pid = os.getpid()
        return self._conn

    def call(self, message: Message, timeout: float) -> tuple[Any, ...]:
        try:
            reply = self._open().send_and_get_reply(message, timeout=timeout)
        except (OSError, TimeoutError, EOFError, ValueError):
            # A late reply would confuse the next call: start afresh.
            self.close()
            raise
        if reply.header.message_type is MessageType.error:
            name = str(reply.header.fields.get(HeaderFields.error_name, "unknown error"))
            body = reply.body
            text = str(body[0]) if body and isinstance(body[0], str) else ""
            raise DBusError(name, text)
        return tuple(reply.body)

    def receive(self, timeout: float) -> Message | None:
        """The next message that arrives unasked (a signal matching a rule this connection
        added), or None after `timeout` seconds. Never reconnects: a new connection would
        not carry the subscriptions, so a lost one raises EOFError."""
        conn = self._conn
        if conn is None or self._pid != os.getpid():
            raise EOFError("the signal connection is closed")
        try:
            message: Message = conn.receive(timeout=timeout)
        except TimeoutError:
            return None
        except (OSError, EOFError, ValueError):
            self.close()
            raise
        return message

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                conn.close()
