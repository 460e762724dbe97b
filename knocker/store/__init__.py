"""The whitelist's storage: the interface the app talks to, and its implementations.

Faces: `WhitelistBackend` (backend.py, what the app may ask), `open_backend` (the one
place that picks an implementation), `FileStore` (filestore.py, whitelist.json + journal
+ shared memory), `RedisStore` (redisstore.py, imported only for `whitelist.backend:
redis`: a server shared by several instances, docs/redis.md), and `atomic_write`
(files.py, how every file Knocker writes is replaced). Who granted what lives beside the
whitelist: grant_format.py (pure: the Grant value and the grants log's lines) and
grantlog.py (whitelist.json.grants).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..config import Config
from ..errors import StorageError
from ..firewall import Firewall
from .backend import KnockResult, WhitelistBackend
from .files import atomic_write
from .filestore import FileStore, Offload, release_free_memory

__all__ = [
    "FileStore",
    "KnockResult",
    "WhitelistBackend",
    "atomic_write",
    "open_backend",
    "release_free_memory",
]


def open_backend(
    config: Config, firewall: Firewall, clock: Callable[[], float]
) -> WhitelistBackend:
    """The whitelist backend `config` asks for, open and loaded (StorageError if not)."""
    if config.whitelist.backend == "redis":
        try:
            from .redisstore import RedisStore  # needs the optional redis client
        except ImportError as error:
            raise StorageError(
                "whitelist.backend is 'redis' but the redis client is "
                "missing: pip install 'knocker[redis]'"
            ) from error

        return RedisStore(config, firewall, clock=clock)
    return FileStore(config, firewall, clock=clock, offload=_offload_for_this_process())


def _offload_for_this_process() -> Offload | None:
    """gevent's thread pool when gevent has patched threading (`knocker serve`'s default
    worker: cli.py patches before building the app), else None (plain threads). gevent is
    imported only when it is already in use."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return None
    import gevent

    def offload(work: Callable[[], None]) -> None:
        # The hub of the calling thread, looked up per call: a worker forked from the
        # master has a hub and a pool of its own.
        gevent.get_hub().threadpool.apply(work)

    return offload
