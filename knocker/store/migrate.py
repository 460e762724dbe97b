"""Edge: `knocker migrate --to redis|file`, copying the live whitelist between backends.

Owns the one rule of a migration: the target must hold no live entry unless --force
(then entries are merged, the later expiry winning). The source is read through its
own backend, so a damaged journal or a server it cannot reach fails the same way it
would for `knocker serve`. Stop the file-backed service first: its workers keep their
own copy of whitelist.json.
"""

from __future__ import annotations

import dataclasses

from ..config import Config
from ..errors import StorageError
from ..firewall import NullFirewall
from .files import atomic_write
from .filestore import FileStore
from .formats import encode_whitelist


class TargetNotEmpty(StorageError):
    """The target already holds live entries and --force was not given."""


def migrate(config: Config, to: str, force: bool, now: float) -> tuple[int, str]:
    """Copy the live whitelist of the other backend into `to` ('redis' or 'file');
    (entries copied, where to). Firewalls are not touched: no service runs here."""
    from .redisstore import RedisStore  # the redis client is needed either way

    firewall = NullFirewall()
    if to == "redis":
        source_config = dataclasses.replace(
            config, whitelist=dataclasses.replace(config.whitelist, backend="file")
        )
        source = FileStore(source_config, firewall, clock=lambda: now)
        try:
            entries = source.entries()
        finally:
            source.close()
        target = RedisStore(config, firewall, clock=lambda: now)
        try:
            problem = target.ready()
            if problem is not None:
                raise StorageError(problem)
            present = target.stored_count(now)
            if present and not force:
                raise TargetNotEmpty(
                    f"{target.location} already holds {present} live "
                    f"entries; use --force to merge into them"
                )
            return target.load(entries, now), target.location
        finally:
            target.close()
    redis_source = RedisStore(config, firewall, clock=lambda: now)
    try:
        problem = redis_source.ready()
        if problem is not None:
            raise StorageError(problem)
        entries = redis_source.entries()
    finally:
        redis_source.close()
    file_target = FileStore(config, firewall, clock=lambda: now)
    try:
        present_entries = file_target.entries()
    finally:
        file_target.close()  # folds any journal into whitelist.json
    if present_entries and not force:
        raise TargetNotEmpty(
            f"{file_target.location} already holds {len(present_entries)} "
            f"live entries; use --force to merge into them"
        )
    merged = dict(present_entries)
    for entry, expiry in entries.items():
        if merged.get(entry, 0) < expiry:
            merged[entry] = expiry
    atomic_write(file_target.location, [encode_whitelist(merged)])
    return len(entries), file_target.location
