"""Sliding-window knock budgets per client, in a fixed-size table.

Owns: the counting rules of docs/api.md#rate-limiting. The table lives in a
caller-supplied buffer (a bytearray in tests, a shared mmap across gunicorn workers in
production), so memory is bounded by construction: a full table forgets the stalest
client of the bucket a new client hashes to. Each client keeps the timestamps of its
last N successes and last M failures in two rings; it is over a budget when the oldest
of those N (or M) is still inside the window — an exact sliding window, not an
approximation. The caller serialises access (a lock) and passes `now`; no I/O, no clock
here.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .addresses import IPAddress
from .config import RateLimitConfig

_WAYS = 8  # slots probed per client: a bucket of neighbours, the stalest is replaced
_HEAD = struct.Struct("<16sdII")  # client key, last seen, success ring head, failure ring head


@dataclass(frozen=True)
class Layout:
    slots: int
    successes: int
    failures: int

    @property
    def slot_size(self) -> int:
        return _HEAD.size + 8 * (self.successes + self.failures)

    @property
    def size(self) -> int:
        return self.slots * self.slot_size


def layout_for(config: RateLimitConfig, max_bytes: int = 32 << 20) -> Layout:
    """As many client slots as fit in `max_bytes` (between 64 and 4096)."""
    probe = Layout(1, config.successful_requests, config.failed_requests)
    slots = max(64, min(4096, max_bytes // probe.slot_size))
    slots -= slots % _WAYS
    return Layout(slots, config.successful_requests, config.failed_requests)


class RateLimiter:
    def __init__(self, config: RateLimitConfig, buffer: memoryview | bytearray, salt: bytes,
                 layout: Layout | None = None) -> None:
        self._window = config.window_seconds
        self._layout = layout or layout_for(config)
        if len(buffer) < self._layout.size:
            raise ValueError("rate-limit buffer smaller than its layout")
        self._buffer = buffer
        self._salt = salt[:16]
        self._ring = struct.Struct(f"<{self._layout.successes + self._layout.failures}d")

    def blocked(self, client: bytes, now: float) -> bool:
        """True when `client` has used up either budget within the window."""
        offset = self._find(client, create=False)
        if offset is None:
            return False
        layout = self._layout
        _, _, s_head, f_head = _HEAD.unpack_from(self._buffer, offset)
        ring = self._ring.unpack_from(self._buffer, offset + _HEAD.size)
        since = now - self._window
        if layout.successes and ring[s_head] > since:
            return True
        return bool(layout.failures and ring[layout.successes + f_head] > since)

    def record(self, client: bytes, success: bool, now: float) -> None:
        """Count one successful or failed knock for `client` at `now`."""
        layout = self._layout
        size = layout.successes if success else layout.failures
        if size == 0:  # 0 means unlimited: nothing to remember
            return
        offset = self._find(client, create=True)
        assert offset is not None
        key, _, s_head, f_head = _HEAD.unpack_from(self._buffer, offset)
        head = s_head if success else f_head
        base = offset + _HEAD.size + 8 * (head if success else layout.successes + head)
        struct.pack_into("<d", self._buffer, base, now)
        head = (head + 1) % size
        if success:
            s_head = head
        else:
            f_head = head
        _HEAD.pack_into(self._buffer, offset, key, now, s_head, f_head)

    def _find(self, client: bytes, create: bool) -> int | None:
        """Offset of `client`'s slot; with create, claim a free or the stalest slot."""
        key = client.ljust(16, b"\0")[:16]
        digest = hashlib.blake2b(key, key=self._salt, digest_size=8).digest()
        first = int.from_bytes(digest, "little") % (self._layout.slots // _WAYS) * _WAYS
        stalest, stalest_seen = None, float("inf")
        for slot in range(first, first + _WAYS):
            offset = slot * self._layout.slot_size
            owner, seen, _, _ = _HEAD.unpack_from(self._buffer, offset)
            if owner == key and seen > 0:
                return offset
            if seen < stalest_seen:
                stalest, stalest_seen = offset, seen
        if not create or stalest is None:
            return None
        # Forget the stalest neighbour: its budgets start afresh if it comes back.
        self._buffer[stalest:stalest + self._layout.slot_size] = bytes(self._layout.slot_size)
        _HEAD.pack_into(self._buffer, stalest, key, 0.0, 0, 0)
        return stalest


def client_key(address: IPAddress) -> bytes:
    """16-byte table key: IPv6 as is, IPv4 as its IPv4-mapped IPv6 form (no IPv6 client
    ever has that form: addresses.parse_ip unmaps it to IPv4)."""
    if address.version == 4:
        return b"\0" * 10 + b"\xff\xff" + address.packed
    return address.packed
