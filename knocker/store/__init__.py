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

from collections.abc import Callable

from ..config import Config
from ..errors import StorageError
from ..firewall import Firewall
from .backend import KnockResult, WhitelistBackend
from .files import atomic_write
from .filestore import FileStore, release_free_memory

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
            raise StorageError("whitelist.backend is 'redis' but the redis client is "
                               "missing: pip install 'knocker[redis]'") from error

        return RedisStore(config, firewall, clock=clock)
    return FileStore(config, firewall, clock=clock)
