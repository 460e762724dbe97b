"""The one polling loop: bounded in time, and so in count."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float, *, interval: float = 0.1, what: str = ""
) -> T:
    """Call `predicate` until it returns something truthy and return that; AssertionError
    naming `what` after `timeout` seconds. The predicate may raise to give up early (a
    process that died, say). Checked once more at the deadline, so a slow last step
    still counts."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for "
                f"{what or getattr(predicate, '__name__', 'a condition')}"
            )
        time.sleep(interval)
