"""Edge: whitelist.json, the snapshot of the whole whitelist in the upstream format.

Owns reading it at startup (bad entries skipped one by one, an unreadable file moved
aside as `whitelist.json.corrupt-<time>`) and replacing it atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from ..errors import StorageError
from ..whitelist import Whitelist
from .files import atomic_write, read_private
from .formats import decode_whitelist

log = logging.getLogger("knocker.store")

_MAX_COMPLAINTS = 20


class SnapshotFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def load(self, now: float, repair: bool) -> tuple[Whitelist, bool]:
        """The whitelist in the file (empty when there is none), and whether the file
        held entries that were dropped (expired or invalid) or was unreadable. With
        repair, an unreadable file is moved aside; without, it is a StorageError."""
        raw = read_private(self.path)
        if raw is None:
            return Whitelist(), False
        try:
            whitelist, seen, problems = decode_whitelist(raw, now)
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError included
            if not repair:
                raise StorageError(f"{self.path} is not a whitelist: {error}") from error
            aside = f"{self.path}.corrupt-{int(now)}"
            os.replace(self.path, aside)
            log.error(
                "%s is not a valid whitelist (%s); moved it to %s and starting empty",
                self.path,
                error,
                aside,
            )
            return Whitelist(), True
        for problem in problems[:_MAX_COMPLAINTS]:
            log.warning("skipping whitelist entry %s", problem)
        if len(problems) > _MAX_COMPLAINTS:
            log.warning(
                "skipped %d more invalid whitelist entries", len(problems) - _MAX_COMPLAINTS
            )
        return whitelist, len(whitelist) != seen

    def write(self, pieces: Iterable[bytes]) -> None:
        """Replace the file with `pieces`, durably (raises OSError)."""
        atomic_write(self.path, pieces)
