"""Tests that need a real resource (a proxy, chromium, root, podman) skip locally when it
is missing and fail under CI=true, where `make test-deps` must have provided it."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI") == "true"


def require(available: object, what: str) -> None:
    """Return when `available` is truthy; else skip here, or fail in CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is missing: `make test-deps` must provide it in CI")
    pytest.skip(f"{what} is not available here")
