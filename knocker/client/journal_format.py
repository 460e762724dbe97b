"""Pure: the systemd journal's native protocol, as bytes (no socket here).

One datagram is one entry: `KEY=value\\n` per field, or, for a value that holds a newline
(or is not text), `KEY\\n`, the value's length as 64-bit little endian, the value, `\\n`
(systemd-journald.service(8), "Journal Native Protocol" on systemd.io). Field names are
upper-case letters, digits and `_`, not starting with `_` or a digit (names starting with
`_` are trusted fields journald sets itself), at most 64 characters.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def valid_field_name(name: str) -> bool:
    return _FIELD_NAME.fullmatch(name) is not None


def encode_entry(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """One journal entry in the native protocol; ValueError for an invalid field name."""
    parts: list[bytes] = []
    for name, value in fields:
        if not valid_field_name(name):
            raise ValueError(f"not a journal field name: {name!r}")
        data = value.encode("utf-8") if isinstance(value, str) else value
        key = name.encode("ascii")
        if b"\n" in data:
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


def parse_journal_stream(value: str | None) -> tuple[int, int] | None:
    """$JOURNAL_STREAM ("<device>:<inode>", decimal, systemd.exec(5)) as numbers, or None."""
    if not value:
        return None
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return None
    return int(device), int(inode)
