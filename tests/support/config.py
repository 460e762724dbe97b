"""Config builders: a valid knocker.yaml as a dict, or already parsed into a Config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knocker.config import Config, parse_config

TEST_KEY = "test-key-0123456789abcdefghijklmnopqrstuvwxyz"
ADMIN_KEY = "admin-key-0123456789abcdefghijklmnopqrstuvwxyz"


def base_config(directory: Path, **sections: Any) -> dict[str, Any]:
    """A valid config with a normal key ("phone", max_ttl 3600) and an admin key ("admin",
    max_ttl 86400, allow_remote_whitelist, admin), storage inside `directory`; each keyword
    replaces one top-level section."""
    config: dict[str, Any] = {
        "api_keys": [
            {"name": "phone", "key": TEST_KEY, "max_ttl": 3600},
            {
                "name": "admin",
                "key": ADMIN_KEY,
                "max_ttl": 86400,
                "allow_remote_whitelist": True,
                "admin": True,
            },
        ],
        "whitelist": {"storage_path": str(directory / "whitelist.json")},
    }
    config.update(sections)
    return config


def make_config(directory: Path, **sections: Any) -> Config:
    """base_config(), validated."""
    return parse_config(base_config(directory, **sections))
