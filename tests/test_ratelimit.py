"""knocker.ratelimit: exact sliding-window knock budgets in a fixed-size table
(docs/api.md#rate-limiting)."""

from __future__ import annotations

import ipaddress

import pytest

from knocker.config import RateLimitConfig
from knocker.ratelimit import (
    EXACT_MAX,
    RESERVATION_SECONDS,
    Layout,
    Outcome,
    RateLimiter,
    client_key,
    layout_for,
)

NOW = 1_700_000_000.0
SALT = b"0123456789abcdef"


def limiter(
    window: int = 60, successes: int = 3, failures: int = 3, slots: int | None = None
) -> RateLimiter:
    config = RateLimitConfig(window, successes, failures)
    layout = layout_for(config) if slots is None else Layout(slots, successes, failures)
    return RateLimiter(config, bytearray(layout.size), SALT, layout)


def client(n: int) -> bytes:
    return client_key(ipaddress.IPv4Address(0xC6336400 + n))  # 198.51.100.0 + n


A = client(1)
B = client(2)


def test_new_client_is_not_blocked() -> None:
    """A client never seen before has its whole budget."""
    assert not limiter().blocked(A, NOW)


def test_failures_up_to_the_budget_are_allowed() -> None:
    """Fewer failures than the budget leave the client unblocked."""
    rl = limiter(failures=3)
    rl.record(A, False, NOW)
    rl.record(A, False, NOW + 1)
    assert not rl.blocked(A, NOW + 2)


def test_client_over_failure_budget_is_blocked() -> None:
    """Once failed_requests failures fall within the window, the client is blocked."""
    rl = limiter(failures=3)
    for t in range(3):
        rl.record(A, False, NOW + t)
    assert rl.blocked(A, NOW + 3)


def test_client_over_success_budget_is_blocked() -> None:
    """successful_requests successes within the window block the client too."""
    rl = limiter(successes=2, failures=30)
    rl.record(A, True, NOW)
    assert not rl.blocked(A, NOW)
    rl.record(A, True, NOW + 1)
    assert rl.blocked(A, NOW + 1)


def test_successes_do_not_spend_the_failure_budget() -> None:
    """The two budgets are counted separately."""
    rl = limiter(successes=5, failures=2)
    for t in range(4):
        rl.record(A, True, NOW + t)
    rl.record(A, False, NOW + 4)
    assert not rl.blocked(A, NOW + 5)


def test_window_frees_the_client_exactly() -> None:
    """The window slides: a client is free once its oldest counted knock leaves it."""
    rl = limiter(window=60, failures=3)
    for t in (0, 10, 20):
        rl.record(A, False, NOW + t)
    assert rl.blocked(A, NOW + 59.9)
    assert not rl.blocked(A, NOW + 60)
    rl.record(A, False, NOW + 60)  # now 10, 20, 60 are inside: blocked until 70
    assert rl.blocked(A, NOW + 69.9)
    assert not rl.blocked(A, NOW + 70)


def test_clients_have_separate_budgets() -> None:
    """One client's failures never block another client."""
    rl = limiter(failures=2)
    rl.record(A, False, NOW)
    rl.record(A, False, NOW)
    assert rl.blocked(A, NOW)
    assert not rl.blocked(B, NOW)


@pytest.mark.parametrize("success", [True, False])
def test_zero_budget_means_unlimited(success: bool) -> None:
    """A budget of 0 never blocks, however many knocks are recorded."""
    rl = limiter(successes=0, failures=0)
    for t in range(200):
        rl.record(A, success, NOW + t / 100)
    assert not rl.blocked(A, NOW + 2)


def test_unlimited_budget_does_not_hide_the_other_budget() -> None:
    """With successes unlimited, failures still block."""
    rl = limiter(successes=0, failures=2)
    rl.record(A, True, NOW)
    rl.record(A, False, NOW)
    rl.record(A, False, NOW)
    assert rl.blocked(A, NOW)


def test_spraying_many_clients_never_grows_memory() -> None:
    """The table lives in a fixed buffer; many clients neither grow it nor fail."""
    config = RateLimitConfig(60, 3, 3)
    layout = Layout(64, 3, 3)
    buffer = bytearray(layout.size)
    rl = RateLimiter(config, buffer, SALT, layout)
    for n in range(10_000):
        rl.record(client_key(ipaddress.IPv6Address((0x20010DB8 << 96) + n)), False, NOW + n)
    assert len(buffer) == layout.size


def test_full_table_forgets_the_stalest_client() -> None:
    """When a new client needs a slot, the client seen longest ago is forgotten."""
    rl = limiter(failures=2, slots=8)  # one bucket of 8: every client competes
    rl.record(A, False, NOW)
    rl.record(A, False, NOW)
    assert rl.blocked(A, NOW)
    for n in range(10, 18):  # eight newer clients fill the bucket
        rl.record(client(n), False, NOW + 1)
    assert not rl.blocked(A, NOW + 2)


def test_full_table_keeps_the_most_recent_clients() -> None:
    """A recently active blocked client survives the arrival of new clients."""
    rl = limiter(failures=2, slots=8)
    for n in range(10, 17):  # seven stale clients
        rl.record(client(n), False, NOW)
    rl.record(A, False, NOW + 5)
    rl.record(A, False, NOW + 5)
    rl.record(client(20), False, NOW + 6)  # evicts one stale client, not A
    assert rl.blocked(A, NOW + 6)


def test_limiters_over_one_buffer_share_their_counts() -> None:
    """All state lives in the buffer, so processes sharing it share budgets."""
    config = RateLimitConfig(60, 3, 2)
    layout = layout_for(config)
    buffer = bytearray(layout.size)
    first = RateLimiter(config, buffer, SALT, layout)
    second = RateLimiter(config, buffer, SALT, layout)
    first.record(A, False, NOW)
    second.record(A, False, NOW)
    assert first.blocked(A, NOW)
    assert second.blocked(A, NOW)


def test_buffer_smaller_than_layout_is_refused() -> None:
    """A buffer that cannot hold the table is a ValueError, not silent corruption."""
    config = RateLimitConfig(60, 3, 3)
    layout = layout_for(config)
    with pytest.raises(ValueError):
        RateLimiter(config, bytearray(layout.size - 1), SALT, layout)


@pytest.mark.parametrize(
    ("successes", "failures"), [(0, 0), (20, 30), (100_000, 100_000), (10**9, 10**9)]
)
def test_layout_is_bounded_and_bucket_aligned(successes: int, failures: int) -> None:
    """Between 64 and 4096 slots, a multiple of the bucket size, within the byte budget."""
    layout = layout_for(RateLimitConfig(60, successes, failures))
    assert 64 <= layout.slots <= 4096
    assert layout.slots % 8 == 0
    assert layout.size <= max(32 << 20, 64 * layout.slot_size)


def test_client_keys_are_16_bytes_and_distinct_across_families() -> None:
    """IPv4 keys are their IPv4-mapped form; no two addresses share a key."""
    v4 = client_key(ipaddress.IPv4Address("192.0.2.1"))
    v6 = client_key(ipaddress.IPv6Address("2001:db8::1"))
    low_v6 = client_key(ipaddress.IPv6Address("::c000:201"))  # same low 32 bits as v4
    assert len(v4) == len(v6) == 16
    assert v4 == ipaddress.IPv6Address("::ffff:192.0.2.1").packed
    assert len({v4, v6, low_v6}) == 3


# --- reservations: exact budgets under concurrency --------------------------------------


@pytest.mark.parametrize(("successes", "failures", "allowed"), [(3, 30, 3), (30, 5, 5)])
def test_concurrent_reservations_never_exceed_a_budget(
    successes: int, failures: int, allowed: int
) -> None:
    """16 knocks in flight at once (reserved, none settled yet): exactly as many get a
    place as the smaller budget has, since each might end either way."""
    rl = limiter(successes=successes, failures=failures)
    assert [rl.reserve(A, NOW) for _ in range(16)].count(True) == allowed


def test_settled_successes_spend_the_budget_and_uncounted_ones_release_it() -> None:
    """A settled success counts; an uncounted outcome (server error) gives the place back."""
    rl = limiter(successes=2, failures=10)
    assert rl.reserve(A, NOW) and rl.reserve(A, NOW)
    assert not rl.reserve(A, NOW)
    rl.settle(A, Outcome.UNCOUNTED, NOW)
    rl.settle(A, Outcome.SUCCESS, NOW)
    assert rl.reserve(A, NOW)
    rl.settle(A, Outcome.SUCCESS, NOW)
    assert not rl.reserve(A, NOW)
    assert rl.reserve(A, NOW + 61)  # the window frees them exactly as before


def test_settled_failure_counts_against_the_failure_budget_only() -> None:
    """A failure settles into the failure ring; the success budget is untouched."""
    rl = limiter(successes=5, failures=1)
    assert rl.reserve(A, NOW)
    rl.settle(A, Outcome.FAILURE, NOW)
    assert not rl.reserve(A, NOW)
    assert rl.reserve(B, NOW)


def test_a_reservation_never_settled_stops_counting() -> None:
    """A worker that died mid-knock cannot block its client for ever."""
    rl = limiter(successes=1, failures=1)
    assert rl.reserve(A, NOW)
    assert not rl.reserve(A, NOW + 1)
    assert rl.reserve(A, NOW + RESERVATION_SECONDS + 1)


def test_unlimited_budgets_reserve_without_a_table() -> None:
    """Both budgets 0: every reservation succeeds and settling counts nothing."""
    rl = limiter(successes=0, failures=0)
    assert all(rl.reserve(A, NOW) for _ in range(100))
    rl.settle(A, Outcome.FAILURE, NOW)


# --- budgets above EXACT_MAX: the table is capped, not the budget ------------------------


def test_huge_budget_keeps_the_table_capped() -> None:
    """An upstream budget of 10^9 per window fits the same bounded table."""
    layout = layout_for(RateLimitConfig(60, 10**9, 10**9))
    assert layout.successes <= EXACT_MAX and layout.failures <= EXACT_MAX
    assert layout.successes * layout.success_batch <= 10**9
    assert layout.successes * layout.success_batch > 10**9 - layout.success_batch
    assert layout.size <= 32 << 20


def test_budget_counted_in_batches_blocks_at_the_budget() -> None:
    """2,000 successes per window (two knocks per timestamp): the 2,000th blocks, the
    1,999th does not, and the window frees them."""
    config = RateLimitConfig(60, 2000, 0)
    layout = layout_for(config, max_bytes=1 << 20)
    assert (layout.successes, layout.success_batch) == (1000, 2)
    rl = RateLimiter(config, bytearray(layout.size), SALT, layout)
    for _ in range(1999):
        rl.record(A, True, NOW)
    assert not rl.blocked(A, NOW)
    rl.record(A, True, NOW)
    assert rl.blocked(A, NOW)
    assert not rl.blocked(A, NOW + 61)
