"""Edge: `knocker migrate --to redis|file`, copying the live whitelist between backends.

Owns the one rule of a migration: the target must hold no live entry unless --force
(then entries are merged, the later expiry winning). Who granted what (the grant records
of docs/whitelist.md#grants, host- and port-scoped grants included, with their ports)
travels with the entries.
The source is read through its own backend, so a damaged journal or a server it cannot
reach fails the same way it would for `knocker serve`. Stop the file-backed service
first: its workers keep their own copy of whitelist.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import StorageError
from ..firewall import NullFirewall
from .files import atomic_write
from .filestore import FileStore
from .formats import encode_whitelist
from .grant_format import Grant, encode_grants, fold_grants

if TYPE_CHECKING:
    from .redisstore import RedisStore


def unscoped_entries(grants: list[Grant]) -> dict[str, int]:
    """entry -> expiry of the whitelist proper: scoped grants (hosts:, ports:) are not
    part of it (a `restored` grant covers an entry's whole expiry)."""
    entries: dict[str, int] = {}
    for grant in grants:
        if not grant.scoped and grant.expires_at > entries.get(grant.entry, 0):
            entries[grant.entry] = grant.expires_at
    return entries


class TargetNotEmpty(StorageError):
    """The target already holds live entries and --force was not given."""


@contextmanager
def _reachable_redis(config: Config, now: float) -> Iterator[RedisStore]:
    """The redis backend of `config`, or StorageError saying why it is not usable."""
    from .redisstore import RedisStore  # imports the redis client: only when migrating

    store = RedisStore(config, NullFirewall(), clock=lambda: now)
    try:
        problem = store.ready()
        if problem is not None:
            raise StorageError(problem)
        yield store
    finally:
        store.close()


def migrate(config: Config, to: str, force: bool, now: float) -> tuple[int, str]:
    """Copy the live whitelist of the other backend into `to` ('redis' or 'file');
    (entries copied, where to). Firewalls are not touched: no service runs here."""
    firewall = NullFirewall()
    if to == "redis":
        source_config = dataclasses.replace(
            config, whitelist=dataclasses.replace(config.whitelist, backend="file")
        )
        source = FileStore(source_config, firewall, clock=lambda: now)
        try:
            grants = source.grants(now)
        finally:
            source.close()
        with _reachable_redis(config, now) as target:
            present = target.stored_count(now)
            if present and not force:
                raise TargetNotEmpty(
                    f"{target.location} already holds {present} live "
                    f"entries; use --force to merge into them"
                )
            copied = target.load(unscoped_entries(grants), now)
            target.load_grants(grants, now)
            return copied, target.location
    with _reachable_redis(config, now) as redis_source:
        grants = redis_source.grants(now)
    file_target = FileStore(config, firewall, clock=lambda: now)
    try:
        # The whitelist proper only: entries() also names scoped grants, port by port.
        present_entries = unscoped_entries(file_target.grants(now))
    finally:
        file_target.close()  # folds any journal into whitelist.json
    if present_entries and not force:
        raise TargetNotEmpty(
            f"{file_target.location} already holds {len(present_entries)} "
            f"live entries; use --force to merge into them"
        )
    entries = unscoped_entries(grants)
    merged = dict(present_entries)
    for entry, expiry in entries.items():
        if merged.get(entry, 0) < expiry:
            merged[entry] = expiry
    # The grants log first: whitelist.json never holds an entry whose records are missing.
    # Appended to what is there (--force): a later line replaces an earlier one, so a
    # record already there that runs longer is not followed by the copied one.
    log_path = file_target.location + ".grants"
    try:
        with open(log_path, "rb") as handle:
            earlier = handle.read()
    except FileNotFoundError:
        earlier = b""
    if earlier and not earlier.endswith(b"\n"):
        earlier += b"\n"
    kept = fold_grants(earlier, now)
    recorded = [
        g
        for g in grants
        if g.key_name is not None
        and not (g.ident in kept and kept[g.ident].expires_at >= g.expires_at)
    ]
    atomic_write(log_path, [earlier, encode_grants(recorded)])
    atomic_write(file_target.location, [encode_whitelist(merged)])
    return len(entries), file_target.location
