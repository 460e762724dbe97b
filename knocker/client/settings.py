"""The client's settings, resolved like the Go knocker-cli's (viper): command-line flags,
then KNOCKER_* variables, then ~/.knocker.yaml. Also the few helpers that keep a URL's
credentials and the API key out of anything printed.
"""

from __future__ import annotations

import argparse
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..addresses import parse_ip
from ..config import MAX_TTL

DEFAULT_CHECK_INTERVAL_MINUTES = 5.0


class SettingsError(Exception):
    """The client settings are missing or invalid (exit status 2)."""


@dataclass(frozen=True)
class Settings:
    """Resolved client settings; precedence flags > environment > settings file."""

    api_url: str
    api_key: str = field(repr=False)
    ttl: int | None = None
    check_interval_minutes: float = DEFAULT_CHECK_INTERVAL_MINUTES
    ip_check_url: str | None = None

    @property
    def knock_url(self) -> str:
        # The Go CLI formats "<api_url>/knock"; stripping a trailing slash first keeps
        # "https://host/" from becoming "https://host//knock".
        return self.api_url.rstrip("/") + "/knock"


def _check_url(name: str, url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{name}: must be an http:// or https:// URL, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as error:
        raise SettingsError(f"{name}: {error}") from None
    return url


def _int_setting(name: str, value: object) -> int | None:
    # YAML reads `true` as a bool, and bool is an int in Python: refuse it explicitly.
    if value is None or isinstance(value, bool):
        if value is None:
            return None
        raise SettingsError(f"{name}: must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise SettingsError(f"{name}: must be an integer, got {value!r}")


def _minutes_setting(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise SettingsError(f"{name}: must be a number of minutes, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise SettingsError(f"{name}: must be a number of minutes, got {value!r}") from None
    else:
        raise SettingsError(f"{name}: must be a number of minutes, got {value!r}")
    if not math.isfinite(number) or number <= 0:
        raise SettingsError(f"{name}: must be a positive number of minutes")
    return number


def _string_setting(name: str, value: object) -> str | None:
    if value is None:
        return None
    # An all-digit key written unquoted in YAML arrives as an int; it means its digits.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value.strip() or None
    raise SettingsError(f"{name}: must be a string")


def read_settings_file(path: Path, required: bool) -> dict[str, object]:
    """The mapping in a ~/.knocker.yaml-style file; {} when absent and not required."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise SettingsError(f"{path}: no such file") from None
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"{path}: cannot read: {error.__class__.__name__}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        # PyYAML's message quotes the offending line, which may hold the key.
        raise SettingsError(f"{path}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: must hold a mapping of settings")
    # viper (the Go CLI's config library) matches keys case-insensitively.
    return {str(k).lower(): v for k, v in data.items()}


def _env(environ: Mapping[str, str], name: str) -> str | None:
    # viper ignores empty environment variables unless told otherwise; so do we.
    value = environ.get(name)
    return value if value else None


def _read_key_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"--key-file {path}: cannot read: {error.__class__.__name__}") from None
    key = text.strip()
    if not key:
        raise SettingsError(f"--key-file {path}: the file is empty")
    return key


def load_settings(args: argparse.Namespace, environ: Mapping[str, str], home: Path) -> Settings:
    """Settings from flags, then KNOCKER_* variables, then the settings file (viper's order)."""
    config_path = getattr(args, "config", None)
    path = Path(config_path) if config_path else home / ".knocker.yaml"
    file = read_settings_file(path, required=bool(config_path))
    where = str(path)

    def pick(flag: object, env_name: str, key: str) -> tuple[object, str]:
        if flag is not None:
            return flag, f"--{key.replace('_', '-')}"
        env_value = _env(environ, env_name)
        if env_value is not None:
            return env_value, env_name
        # The Go CLI's first releases called check_interval "interval".
        if key == "check_interval" and key not in file and "interval" in file:
            return file["interval"], f"{where}: interval"
        return file.get(key), f"{where}: {key}"

    url_value, url_src = pick(getattr(args, "url", None), "KNOCKER_API_URL", "api_url")
    api_url = _string_setting(url_src, url_value)
    if not api_url:
        raise SettingsError(
            "no API URL: pass --url, set KNOCKER_API_URL, or put api_url in ~/.knocker.yaml"
        )
    _check_url(url_src, api_url)

    key_flag: str | None = getattr(args, "key", None)
    key_file: str | None = getattr(args, "key_file", None)
    if key_file is not None:
        key_flag = _read_key_file(key_file)
    key_value, key_src = pick(key_flag, "KNOCKER_API_KEY", "api_key")
    api_key = _string_setting(key_src, key_value)
    if not api_key:
        raise SettingsError(
            "no API key: pass --key-file (or --key), set KNOCKER_API_KEY, "
            "or put api_key in ~/.knocker.yaml"
        )
    # http.client quotes an invalid header value in its exception text; refuse such a key
    # here, with a message that does not contain it.
    if any(not (0x20 <= ord(ch) < 0x7F) for ch in api_key):
        raise SettingsError(f"{key_src}: the API key has characters an HTTP header cannot carry")

    ttl_value, ttl_src = pick(getattr(args, "ttl", None), "KNOCKER_TTL", "ttl")
    ttl = _int_setting(ttl_src, ttl_value)
    if ttl is not None and ttl <= 0:
        ttl = None  # the Go CLI sends a ttl only when it is > 0: 0 means "key's maximum"
    if ttl is not None and ttl > MAX_TTL:
        raise SettingsError(f"{ttl_src}: must be at most {MAX_TTL} seconds")

    interval_value, interval_src = pick(
        getattr(args, "check_interval", None), "KNOCKER_CHECK_INTERVAL", "check_interval"
    )
    interval = _minutes_setting(interval_src, interval_value)

    check_value, check_src = pick(
        getattr(args, "ip_check_url", None), "KNOCKER_IP_CHECK_URL", "ip_check_url"
    )
    ip_check_url = _string_setting(check_src, check_value)
    if ip_check_url:
        _check_url(check_src, ip_check_url)

    return Settings(
        api_url=api_url,
        api_key=api_key,
        ttl=ttl,
        check_interval_minutes=interval or DEFAULT_CHECK_INTERVAL_MINUTES,
        ip_check_url=ip_check_url or None,
    )


def is_loopback_host(host: str) -> bool:
    """True for names and addresses that never leave this machine."""
    host = host.lower().rstrip(".")
    # RFC 6761 6.3: localhost and *.localhost resolve to loopback.
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = parse_ip(host)
    return address is not None and address.is_loopback


def plain_http_warning(api_url: str) -> str | None:
    """The warning to print when the key would travel unencrypted off this machine."""
    parts = urllib.parse.urlsplit(api_url)
    if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
        return (
            f"warning: {display_url(api_url)} is plain http to another machine: "
            "the API key travels unencrypted; use https"
        )
    return None


def display_url(url: str) -> str:
    """The URL without user:password@, safe to print."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def redact(text: str, secret: str) -> str:
    """Defence in depth: whatever a server or library said, the key is not printed."""
    return text.replace(secret, "[key hidden]") if secret else text
