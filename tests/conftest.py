"""Fixtures shared by several test modules (helpers without pytest state: tests/support)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """A test that runs `knocker serve`'s or create_app()'s logging setup hands the next
    test the logging it had: the knocker logger's level and the root handlers."""
    logger = logging.getLogger("knocker")
    level, root_handlers = logger.level, list(logging.getLogger().handlers)
    yield
    logger.setLevel(level)
    for handler in logging.getLogger().handlers:
        if handler not in root_handlers:
            logging.getLogger().removeHandler(handler)
