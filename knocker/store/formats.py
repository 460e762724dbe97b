"""Pure: the two on-disk formats of the file store, as bytes <-> whitelist values.

Owns whitelist.json (the upstream format, {"entry": unix_expiry_int}) and the journal's
line format (`+ entry expiry crc` / `- entry crc`). No I/O, no clock: callers read and
write the bytes and pass `now`.
"""

from __future__ import annotations

import json
import math
import re
import socket
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..whitelist import Key, Whitelist, entry_text, parse_entry

# The largest expiry the journal and the shared ring can hold (a signed 64-bit integer);
# anything later in a whitelist.json is skipped like any other invalid entry.
MAX_EXPIRY = 2**63 - 1

_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}

# ---------------------------------------------------------------------- whitelist.json

# One entry of whitelist.json as Knocker writes it: `"1.2.3.4": 1767225600`. The name
# can hold no quote or backslash, so a file made only of these is plain JSON.
_CANONICAL_PAIR = re.compile(rb'"([0-9a-f.:/]{2,43})": ([0-9]{1,15})')


class NotCanonical(ValueError):
    """whitelist.json is not in Knocker's own layout: read it with a JSON parser."""


def canonical_pairs(raw: bytes) -> Iterator[tuple[str, int]]:
    """The entries of a whitelist.json in Knocker's own layout (`{"k": v, "k": v}`), one
    at a time, without building the JSON object (startup memory with 100,000 entries).
    Raises NotCanonical, possibly after yielding some pairs, for any other layout."""
    if raw == b"{}":
        return
    if raw[:1] != b"{" or raw[-1:] != b"}":
        raise NotCanonical("not Knocker's layout")
    position = 1
    for match in _CANONICAL_PAIR.finditer(raw, 1, len(raw) - 1):
        if match.start() != position:
            raise NotCanonical("not Knocker's layout")
        yield match[1].decode("ascii"), int(match[2])
        position = match.end() + 2  # the ", " between pairs
    if position != len(raw) + 1:
        raise NotCanonical("not Knocker's layout")


def load_entries(
    pairs: Iterable[tuple[str, object]], now: float, into: Whitelist
) -> tuple[int, list[str]]:
    """Add the unexpired entries of an upstream whitelist.json ({"entry":
    unix_expiry_int}, given as its items) to `into`. Returns how many pairs were read and
    complaints about skipped entries (never quoting more than the entry text). Each bad
    entry is skipped on its own: a non-number, NaN, an infinity or an expiry past
    MAX_EXPIRY costs that entry, never the file.

    Single addresses, nearly all of a big whitelist, take an unrolled path: startup
    with 100,000 entries must stay well under a second.
    """
    problems = []
    hosts: dict[int, dict[int, int]] = {4: {}, 6: {}}
    pton, from_bytes = socket.inet_pton, int.from_bytes
    seen = 0
    for text, expiry in pairs:
        seen += 1
        if type(expiry) is not int:  # bool is an int subclass, and no expiry
            if not isinstance(expiry, float):
                problems.append(f"{text[:100]!r}: expiry is not a number")
                continue
            if not math.isfinite(expiry):
                problems.append(f"{text[:100]!r}: expiry {expiry} is not a time")
                continue
            expiry = math.ceil(expiry)  # never cut a grant short
        if expiry <= now:
            continue
        if expiry > MAX_EXPIRY:
            problems.append(f"{text[:100]!r}: expiry is out of range")
            continue
        if "/" not in text and len(text) <= 45:
            version = 6 if ":" in text else 4
            try:
                value = from_bytes(pton(_FAMILY[version], text), "big")
            except OSError:
                value = -1
            if value >= 0 and not (version == 6 and value >> 32 == 0xFFFF):
                table = hosts[version]
                if table.get(value, 0) < expiry:
                    table[value] = expiry
                continue
        key = parse_entry(text) if len(text) <= 100 else None
        if key is None:
            problems.append(f"{text[:100]!r}: not an IP address or network")
        else:
            into.extend(key, expiry)
    for version, table in hosts.items():
        into.extend_hosts(version, table)
    return seen, problems


def decode_whitelist(raw: bytes, now: float) -> tuple[Whitelist, int, list[str]]:
    """(whitelist, pairs read, complaints) of a whitelist.json's bytes. Raises ValueError
    (UnicodeDecodeError included) when the bytes are not a JSON object at all."""
    whitelist = Whitelist()
    try:  # Knocker's own layout is read without building a JSON object
        seen, problems = load_entries(canonical_pairs(raw), now, whitelist)
    except NotCanonical:
        whitelist = Whitelist()
        data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        if not isinstance(data, dict):
            raise ValueError(  # noqa: B904 - the layout check is not the cause
                f"expected a JSON object, found {type(data).__name__}"
            )
        seen, problems = load_entries(data.items(), now, whitelist)
    return whitelist, seen, problems


def encode_whitelist(state: dict[str, int]) -> bytes:
    """whitelist.json for a small {entry: expiry} (the layout canonical_pairs reads)."""
    return json.dumps(state, separators=(", ", ": ")).encode("utf-8")


def json_pieces(
    whitelist: Whitelist, now: float, soonest: list[float], per_piece: int = 4096
) -> Iterator[bytes]:
    """whitelist.as_dict(now) as whitelist.json text, byte for byte what
    encode_whitelist gives, in pieces of `per_piece` entries, so a snapshot of 100,000
    entries never exists as one dict or one string; soonest[0] ends up as the smallest
    expiry written. Entry texts are plain ASCII: nothing to escape."""
    parts: list[str] = []
    separator = ""
    low = math.inf
    yield b"{"
    for text, expiry in whitelist.texts(now):
        if expiry < low:
            low = expiry
        parts.append(f'"{text}": {expiry}')
        if len(parts) >= per_piece:
            yield (separator + ", ".join(parts)).encode()
            separator, parts = ", ", []
    if parts:
        yield (separator + ", ".join(parts)).encode()
    yield b"}"
    soonest[0] = low


# ---------------------------------------------------------------------- the journal

REMOVED = -1  # the expiry of a removal record


def journal_line(key: Key, expiry: int) -> bytes:
    """One journal record: `+ entry expiry crc` (grant) or `- entry crc` (expiry < 0)."""
    body = f"- {entry_text(key)}" if expiry < 0 else f"+ {entry_text(key)} {expiry}"
    return f"{body} {zlib.crc32(body.encode()):08x}\n".encode()


def parse_journal_line(line: bytes) -> tuple[Key, int] | None:
    """(key, expiry) of one record without its newline; None when damaged."""
    body, _, crc = line.rpartition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        fields = body.decode("ascii").split(" ")
    except ValueError:
        return None
    if fields[0] == "-" and len(fields) == 2:
        key, expiry = parse_entry(fields[1]), REMOVED
    elif fields[0] == "+" and len(fields) == 3 and fields[2].isdigit():
        key, expiry = parse_entry(fields[1]), int(fields[2])
        if expiry > MAX_EXPIRY:
            return None
    else:
        return None
    return None if key is None else (key, expiry)


@dataclass(frozen=True)
class JournalContents:
    records: list[tuple[Key, int]]
    damaged: list[int]  # line numbers (from 1) of records that failed their check
    torn: bool  # text after the last newline: an append cut short by a crash

    @property
    def needs_repair(self) -> bool:
        return bool(self.damaged) or self.torn


def decode_journal(data: bytes) -> JournalContents:
    """Every intact record of a journal; a damaged line costs that record only (each
    line carries its own checksum, so the ones after it are still trustworthy)."""
    lines = data.split(b"\n")
    torn = lines.pop() != b""
    records: list[tuple[Key, int]] = []
    damaged: list[int] = []
    for number, line in enumerate(lines, 1):
        record = parse_journal_line(line)
        if record is None:
            damaged.append(number)
        else:
            records.append(record)
    return JournalContents(records, damaged, torn)
