"""Fake time for tests: a wall clock, a monotonic clock and a sleep that only move when
told to (or when something sleeps), so nothing in a unit test waits on the real clock."""

from __future__ import annotations

NOW = 1_700_000_000.0


class FakeClock:
    """`clock()` is the wall clock, `monotonic()` the monotonic one, `sleep(s)` advances
    both by `s` at once; `now` may be set directly and `advance(s)` moves it."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now
        self.elapsed = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def clock(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.elapsed

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.elapsed += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
