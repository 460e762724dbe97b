"""Sliding-window knock budgets per client, in a fixed-size table.

Owns: the counting rules of SPEC 5.4. The table lives in a caller-supplied buffer (a
bytearray in tests, a shared mmap across gunicorn workers in production), so memory is
bounded by construction: a full table forgets the stalest client of the bucket a new
client hashes to. Each client keeps the timestamps of its last N successes and last M
failures in two rings; it is over a budget when the oldest of those N (or M) is still
inside the window: an exact sliding window. Budgets above EXACT_MAX are kept in batches
(one timestamp per batch of knocks), so the table's size is capped, not the budget.
Budgets are exact under concurrency through reservations: `reserve` checks and holds a
place in one step, `settle` turns it into what the knock turned out to be. The caller
serialises access (a lock) and passes `now`; no I/O, no clock here.
"""

from __future__ import annotations

import enum
import hashlib
import math
import struct
from dataclasses import dataclass

from .addresses import IPAddress
from .config import RateLimitConfig

_WAYS = 8  # slots probed per client: a bucket of neighbours, the stalest is replaced
# client key, last seen, reservations' time; success and failure: ring head, knocks
# reserved, knocks counted in the current batch
_HEAD = struct.Struct("<16sddIIIIII")
_STAMP = struct.Struct("<d")
EXACT_MAX = 1024  # timestamps per budget and client; larger budgets count in batches
# A reservation a worker never settled (it died mid-knock) stops counting after this.
RESERVATION_SECONDS = 120.0


class Outcome(enum.Enum):
    SUCCESS = "success"  # counts against the success budget
    FAILURE = "failure"  # counts against the failure budget
    UNCOUNTED = "uncounted"  # neither (a server-side error, a 429)


@dataclass(frozen=True)
class Layout:
    slots: int
    successes: int  # ring size (timestamps kept) for the success budget; 0: unlimited
    failures: int
    success_batch: int = 1  # knocks per timestamp (1: every knock, exact)
    failure_batch: int = 1

    @property
    def slot_size(self) -> int:
        return _HEAD.size + 8 * (self.successes + self.failures)

    @property
    def size(self) -> int:
        return self.slots * self.slot_size


def _ring_and_batch(budget: int) -> tuple[int, int]:
    """(timestamps kept, knocks per timestamp) for a budget: their product is at most
    the budget and short of it by less than one batch (exact up to EXACT_MAX)."""
    if budget <= EXACT_MAX:
        return budget, 1
    batch = math.ceil(budget / EXACT_MAX)
    return budget // batch, batch


def layout_for(config: RateLimitConfig, max_bytes: int = 32 << 20) -> Layout:
    """As many client slots as fit in `max_bytes` (between 64 and 4096)."""
    successes, success_batch = _ring_and_batch(config.successful_requests)
    failures, failure_batch = _ring_and_batch(config.failed_requests)
    probe = Layout(1, successes, failures)
    slots = max(64, min(4096, max_bytes // probe.slot_size))
    slots -= slots % _WAYS
    return Layout(slots, successes, failures, success_batch, failure_batch)


class RateLimiter:
    def __init__(
        self,
        config: RateLimitConfig,
        buffer: memoryview | bytearray,
        salt: bytes,
        layout: Layout | None = None,
    ) -> None:
        self._window = config.window_seconds
        self._layout = layout or layout_for(config)
        if len(buffer) < self._layout.size:
            raise ValueError("rate-limit buffer smaller than its layout")
        self._buffer = buffer
        self._salt = salt[:16]

    def blocked(self, client: bytes, now: float) -> bool:
        """True when `client` has used up either budget within the window, counting the
        knocks it has reserved and not yet settled."""
        offset = self._find(client, create=False)
        return offset is not None and self._over(offset, now)

    def reserve(self, client: bytes, now: float) -> bool:
        """Check and hold one knock's place in both budgets, in one step: False (and
        nothing held) when either is used up. Each True needs one settle()."""
        layout = self._layout
        if not (layout.successes or layout.failures):
            return True
        offset = self._find(client, create=True)
        assert offset is not None
        if self._over(offset, now):
            return False
        key, _, _, s_head, f_head, s_held, f_held, s_count, f_count = self._head(offset, now)
        _HEAD.pack_into(
            self._buffer,
            offset,
            key,
            now,
            now,
            s_head,
            f_head,
            s_held + bool(layout.successes),
            f_held + bool(layout.failures),
            s_count,
            f_count,
        )
        return True

    def settle(self, client: bytes, outcome: Outcome, now: float) -> None:
        """Release a reservation of `client` and count what the knock turned out to be."""
        layout = self._layout
        if not (layout.successes or layout.failures):
            return
        offset = self._find(client, create=False)
        if offset is None:
            return  # forgotten meanwhile (table full): nothing held any more
        key, seen, since, s_head, f_head, s_held, f_held, s_count, f_count = self._head(offset, now)
        _HEAD.pack_into(
            self._buffer,
            offset,
            key,
            seen,
            since,
            s_head,
            f_head,
            max(0, s_held - 1),
            max(0, f_held - 1),
            s_count,
            f_count,
        )
        if outcome is not Outcome.UNCOUNTED:
            self.record(client, outcome is Outcome.SUCCESS, now)

    def record(self, client: bytes, success: bool, now: float) -> None:
        """Count one successful or failed knock for `client` at `now`."""
        layout = self._layout
        size = layout.successes if success else layout.failures
        if size == 0:  # 0 means unlimited: nothing to remember
            return
        offset = self._find(client, create=True)
        assert offset is not None
        key, _, since, s_head, f_head, s_held, f_held, s_count, f_count = _HEAD.unpack_from(
            self._buffer, offset
        )
        batch = layout.success_batch if success else layout.failure_batch
        count = (s_count if success else f_count) + 1
        head = s_head if success else f_head
        if count >= batch:  # a batch is complete: it gets its timestamp
            count = 0
            base = offset + _HEAD.size + 8 * (head if success else layout.successes + head)
            _STAMP.pack_into(self._buffer, base, now)
            head = (head + 1) % size
        if success:
            s_head, s_count = head, count
        else:
            f_head, f_count = head, count
        _HEAD.pack_into(
            self._buffer, offset, key, now, since, s_head, f_head, s_held, f_held, s_count, f_count
        )

    def _head(
        self, offset: int, now: float
    ) -> tuple[bytes, float, float, int, int, int, int, int, int]:
        """The slot's header, with reservations older than RESERVATION_SECONDS dropped."""
        fields: tuple[bytes, float, float, int, int, int, int, int, int] = _HEAD.unpack_from(
            self._buffer, offset
        )
        key, seen, since, s_head, f_head, s_held, f_held, s_count, f_count = fields
        if (s_held or f_held) and now - since > RESERVATION_SECONDS:
            return key, seen, since, s_head, f_head, 0, 0, s_count, f_count
        return fields

    def _over(self, offset: int, now: float) -> bool:
        layout = self._layout
        _, _, _, s_head, f_head, s_held, f_held, s_count, f_count = self._head(offset, now)
        ring = offset + _HEAD.size
        since = now - self._window
        return self._spent(
            ring, layout.successes, layout.success_batch, s_head, s_held + s_count, since
        ) or self._spent(
            ring + 8 * layout.successes,
            layout.failures,
            layout.failure_batch,
            f_head,
            f_held + f_count,
            since,
        )

    def _spent(self, ring: int, size: int, batch: int, head: int, extra: int, since: float) -> bool:
        """Is the budget of `size` x `batch` knocks used up, given `extra` knocks not in
        the ring (reserved, or in the current batch)? The ring is oldest-first from
        `head`; the newest j stamps are all in the window iff the oldest of them is."""
        if size == 0:
            return False
        needed = -(-(size * batch - extra) // batch)  # stamps in the window that fill it
        if needed <= 0:
            return True
        if needed > size:
            return False
        stamp: float = _STAMP.unpack_from(self._buffer, ring + 8 * ((head + size - needed) % size))[
            0
        ]
        return stamp > since

    def _find(self, client: bytes, create: bool) -> int | None:
        """Offset of `client`'s slot; with create, claim a free or the stalest slot."""
        key = client.ljust(16, b"\0")[:16]
        digest = hashlib.blake2b(key, key=self._salt, digest_size=8).digest()
        first = int.from_bytes(digest, "little") % (self._layout.slots // _WAYS) * _WAYS
        stalest, stalest_seen = None, float("inf")
        for slot in range(first, first + _WAYS):
            offset = slot * self._layout.slot_size
            owner, seen = _HEAD.unpack_from(self._buffer, offset)[:2]
            if owner == key and seen > 0:
                return offset
            if seen < stalest_seen:
                stalest, stalest_seen = offset, seen
        if not create or stalest is None:
            return None
        # Forget the stalest neighbour: its budgets start afresh if it comes back.
        self._buffer[stalest : stalest + self._layout.slot_size] = bytes(self._layout.slot_size)
        _HEAD.pack_into(self._buffer, stalest, key, 0.0, 0.0, 0, 0, 0, 0, 0, 0)
        return stalest


def client_key(address: IPAddress) -> bytes:
    """16-byte table key: IPv6 as is, IPv4 as its IPv4-mapped IPv6 form (no IPv6 client
    ever has that form: addresses.parse_ip unmaps it to IPv4)."""
    if address.version == 4:
        return b"\0" * 10 + b"\xff\xff" + address.packed
    return address.packed
