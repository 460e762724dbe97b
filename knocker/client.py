"""`knocker knock` and `knocker watch`: Knocker's own command-line client.

Owns: the client settings (compatible with the Go knocker-cli: ~/.knocker.yaml, KNOCKER_*
variables, command-line flags win), one POST /knock over urllib, and the watch loop's
schedule. Effects (HTTP, clock, waiting, randomness, output) are parameters so tests can
drive them. The API key is never printed: not in results, errors, events or logs.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TextIO, TypeVar

import yaml

from . import __version__
from .addresses import parse_ip

_N = TypeVar("_N", int, float)

# Exit codes of `knocker knock` (documented in --help and the README). 2 is argparse's
# own code for a bad command line, so settings errors share it.
EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_NETWORK = 3
EXIT_UNAUTHORIZED = 4
EXIT_FORBIDDEN = 5
EXIT_RATE_LIMITED = 6

EXIT_CODES_HELP = """\
exit status:
  0  whitelisted
  1  any other failure (400 invalid input, 5xx, unexpected answer)
  2  bad command line or settings (no api_url or api_key, unreadable file)
  3  network error (cannot connect, timeout, TLS failure)
  4  401: the API key was not accepted
  5  403: the key may not whitelist other addresses (--ip)
  6  429: too many knocks from this address; wait and retry
"""

DEFAULT_CHECK_INTERVAL_MINUTES = 5.0
DEFAULT_CADENCE_SECONDS = 300.0  # re-knock cadence when the server reports no TTL
REFRESH_FRACTION = 0.9  # knock again when 90 % of the granted TTL has passed
MIN_REFRESH_SECONDS = 1.0
HTTP_TIMEOUT_SECONDS = 10.0
MAX_BODY_BYTES = 64 * 1024
# A laptop that sleeps does not advance monotonic waits; waking at least this often and
# comparing against the wall clock keeps a resumed machine from knocking late.
MAX_WAIT_SECONDS = 30.0
MAX_TTL = 315360000


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


@dataclass(frozen=True)
class Grant:
    """A successful knock: the server's three members, validated."""

    entry: str
    expires_at: int
    expires_in_seconds: int

    def as_json(self) -> dict[str, Any]:
        return {
            "whitelisted_entry": self.entry,
            "expires_at": self.expires_at,
            "expires_in_seconds": self.expires_in_seconds,
        }


class KnockFailed(Exception):
    """A knock that did not whitelist anything; `exit_code` tells the kind."""

    def __init__(self, message: str, exit_code: int, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status


class Transport(Protocol):
    """Sends one request; returns (HTTP status, body) for every status, raises OSError or
    http.client.HTTPException when no HTTP answer arrived."""

    def __call__(self, request: urllib.request.Request, timeout: float) -> tuple[int, bytes]: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would repeat the request, X-Api-Key included, to wherever a redirect points;
    # a knock must never carry the key to an address the user did not configure.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> None:
        return None


def urllib_transport(request: urllib.request.Request, timeout: float) -> tuple[int, bytes]:
    """The real transport: urllib with TLS verification, proxies from the environment, no
    redirects."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        # S310: settings only ever hold http(s) URLs (checked in _check_url).
        with opener.open(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), response.read(MAX_BODY_BYTES)
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), error.read(MAX_BODY_BYTES)


# ---------------------------------------------------------------------------------------
# Settings


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


# ---------------------------------------------------------------------------------------
# One knock


_EXPLAIN = {
    400: "the server refused the request as invalid input",
    401: "the API key was not accepted",
    403: "this key may not whitelist other addresses (drop --ip, or use a key with "
    "allow_remote_whitelist)",
    405: "the server does not accept knocks at this URL; check api_url",
    413: "the request body was too large",
    415: "the server refused the request's media type",
    429: "too many knocks from this address; wait a minute and try again",
    500: "the server failed to grant the whitelist",
    503: "the server cannot grant right now (firewall unavailable or overloaded)",
}

_EXIT_FOR_STATUS = {401: EXIT_UNAUTHORIZED, 403: EXIT_FORBIDDEN, 429: EXIT_RATE_LIMITED}


def _server_reason(body: bytes) -> str | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        text = "".join(ch if ch.isprintable() else " " for ch in data["error"])
        return text[:200]
    return None


def _parse_grant(body: bytes) -> Grant:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if isinstance(data, dict):
        entry = data.get("whitelisted_entry")
        expires_at = data.get("expires_at")
        expires_in = data.get("expires_in_seconds")
        if (
            isinstance(entry, str)
            and entry
            and all(
                isinstance(v, int) and not isinstance(v, bool) for v in (expires_at, expires_in)
            )
        ):
            assert isinstance(expires_at, int) and isinstance(expires_in, int)
            return Grant(entry[:100], expires_at, expires_in)
    raise KnockFailed(
        "the server's 200 answer is not a knock result; check api_url", EXIT_OTHER, 200
    )


def knock(
    settings: Settings,
    transport: Transport,
    ttl: int | None = None,
    ip: str | None = None,
    timeout: float = HTTP_TIMEOUT_SECONDS,
) -> Grant:
    """POST <api_url>/knock once; the Grant, or KnockFailed saying why (never with the key)."""
    body: dict[str, object] = {}
    if ip:
        body["ip_address"] = ip
    if ttl is not None:
        body["ttl"] = ttl
    request = urllib.request.Request(  # noqa: S310 - http(s) only, see _check_url
        settings.knock_url,
        data=json.dumps(body).encode("utf-8"),
        method="POST",
        headers={
            "X-Api-Key": settings.api_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"knocker-client/{__version__}",
        },
    )
    try:
        status, payload = transport(request, timeout)
    except (OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        message = f"cannot reach {display_url(settings.api_url)}: {reason}"
        raise KnockFailed(redact(message, settings.api_key), EXIT_NETWORK) from None
    if status == 200:
        return _parse_grant(payload)
    explanation = _EXPLAIN.get(status)
    if explanation is None:
        if 300 <= status < 400:
            explanation = "the server answered with a redirect; set api_url to its final address"
        else:
            explanation = "unexpected answer from the server"
    reason = _server_reason(payload)
    message = f"HTTP {status}: {explanation}" + (f" ({reason})" if reason else "")
    raise KnockFailed(
        redact(message, settings.api_key), _EXIT_FOR_STATUS.get(status, EXIT_OTHER), status
    )


def fetch_public_ip(url: str, transport: Transport, timeout: float = HTTP_TIMEOUT_SECONDS) -> str:
    """The address an ip_check_url service reports (plain text body); ValueError otherwise."""
    request = urllib.request.Request(  # noqa: S310 - http(s) only, see _check_url
        url, headers={"User-Agent": f"knocker-client/{__version__}", "Accept": "text/plain"}
    )
    try:
        status, body = transport(request, timeout)
    except (OSError, http.client.HTTPException) as error:
        raise ValueError(
            f"cannot reach {display_url(url)}: {getattr(error, 'reason', error)}"
        ) from None
    if status != 200:
        raise ValueError(f"{display_url(url)} answered HTTP {status}")
    text = body[:100].decode("ascii", "replace").strip()
    # A captive portal or error page must not count as "the address changed".
    if parse_ip(text) is None:
        raise ValueError(f"{display_url(url)} did not return an IP address")
    return text


def human_duration(seconds: float) -> str:
    """1 d 2 h, 3 h 5 min, 4 min 10 s, 42 s."""
    total = max(0, int(round(seconds)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def _local_time(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix))


def describe_grant(grant: Grant, now: float) -> str:
    remaining = grant.expires_at - now
    return (
        f"Whitelisted {grant.entry} until {_local_time(grant.expires_at)} "
        f"(in {human_duration(remaining)})."
    )


def cap_warning(requested: int | None, grant: Grant) -> str | None:
    if requested is not None and grant.expires_in_seconds < requested:
        return (
            f"warning: the server granted {human_duration(grant.expires_in_seconds)}, less "
            f"than the requested {human_duration(requested)} (the key's max_ttl caps it)"
        )
    return None


# ---------------------------------------------------------------------------------------
# Command-line plumbing shared by both subcommands


def _number(convert: Callable[[str], _N], valid: Callable[[_N], bool],
            rule: str) -> Callable[[str], _N]:
    """An argparse type: `convert` the text, then insist on `valid` (else say `rule`)."""

    def parse(text: str) -> _N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(rule)
        return value

    return parse


_positive_int = _number(int, lambda value: 1 <= value <= MAX_TTL,
                        f"must be between 1 and {MAX_TTL}")
_positive_float = _number(float, lambda value: math.isfinite(value) and value > 0,
                          "must be a positive number")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", metavar="URL", help="Knocker base URL (api_url; POSTs to URL/knock)"
    )
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--key", metavar="KEY", help="API key (visible in the process list: prefer --key-file)"
    )
    keys.add_argument("--key-file", metavar="FILE", help="read the API key from FILE")
    parser.add_argument(
        "--ttl",
        type=_positive_int,
        metavar="N",
        help="requested TTL in seconds (capped by the key)",
    )
    parser.add_argument(
        "--ip",
        metavar="IP/CIDR",
        help="whitelist this address or network instead of the caller (admin keys only)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="client settings file (default ~/.knocker.yaml, same keys as the Go knocker-cli)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")


_SETTINGS_HELP = """\
settings (flags win over environment, environment over the file):
  --url            KNOCKER_API_URL         api_url
  --key/--key-file KNOCKER_API_KEY         api_key
  --ttl            KNOCKER_TTL             ttl
  --check-interval KNOCKER_CHECK_INTERVAL  check_interval   (minutes, watch only)
  --ip-check-url   KNOCKER_IP_CHECK_URL    ip_check_url     (watch only)
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `knock` and `watch` subcommands to knocker's command line."""
    knock_parser = subparsers.add_parser(
        "knock",
        help="knock once: whitelist this machine's address",
        description="Knock once: ask Knocker to whitelist this machine's address (or --ip).",
        epilog=_SETTINGS_HELP + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common_arguments(knock_parser)
    knock_parser.set_defaults(func=run_knock)

    watch_parser = subparsers.add_parser(
        "watch",
        help="stay running and keep this machine whitelisted",
        description=(
            "Knock now, then again when 90 % of the granted TTL has passed (every 5\n"
            "minutes when unknown). With ip_check_url, poll it every check_interval minutes\n"
            "and knock when the reported address changes. Failures are retried with\n"
            "exponential backoff and jitter. SIGTERM stops it (exit 0)."
        ),
        epilog=_SETTINGS_HELP
        + "\nevents (--json prints one JSON object per line): ServiceState, StatusSnapshot,\n"
        "WhitelistApplied, WhitelistExpired, NextKnockUpdated, KnockTriggered, Error\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common_arguments(watch_parser)
    watch_parser.add_argument(
        "--check-interval",
        type=_positive_float,
        metavar="MINUTES",
        help="with --ip-check-url: minutes between address checks (default 5)",
    )
    watch_parser.add_argument(
        "--ip-check-url", metavar="URL", help="service that returns this machine's public IP"
    )
    watch_parser.add_argument(
        "--backoff-min",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="first retry delay after a failure (default 5)",
    )
    watch_parser.add_argument(
        "--backoff-max",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="longest retry delay (default 300)",
    )
    watch_parser.set_defaults(func=run_watch)


def _settings_or_exit(
    args: argparse.Namespace, environ: Mapping[str, str], home: Path, err: TextIO
) -> Settings | None:
    try:
        settings = load_settings(args, environ, home)
    except SettingsError as error:
        print(f"knocker: {error}", file=err)
        return None
    warning = plain_http_warning(settings.api_url)
    if warning:
        print(warning, file=err)
    return settings


def _start(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None,
    home: Path | None,
    out: TextIO | None,
    err: TextIO | None,
) -> tuple[TextIO, TextIO, Settings | None]:
    """Streams (cli.main hands its own over on the namespace) and settings (None after
    printing why they are unusable) for either subcommand."""
    out = out or getattr(args, "out", None) or sys.stdout
    err = err or getattr(args, "err", None) or sys.stderr
    settings = _settings_or_exit(
        args, os.environ if environ is None else environ, home or Path.home(), err
    )
    return out, err, settings


def run_knock(
    args: argparse.Namespace,
    transport: Transport = urllib_transport,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    clock: Callable[[], float] = time.time,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`knocker knock`: one knock; prints the grant (or JSON); exit status per EXIT_CODES_HELP."""
    out, err, settings = _start(args, environ, home, out, err)
    if settings is None:
        return EXIT_USAGE
    requested = settings.ttl
    try:
        grant = knock(settings, transport, ttl=requested, ip=args.ip)
    except KnockFailed as failure:
        print(f"knocker: knock failed: {failure.message}", file=err)
        if args.json:
            print(json.dumps({"error": failure.message, "status": failure.status}), file=out)
        return failure.exit_code
    warning = cap_warning(requested, grant)
    if warning:
        print(warning, file=err)
    if args.json:
        print(json.dumps(grant.as_json()), file=out)
    else:
        print(describe_grant(grant, clock()), file=out)
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# watch


class EventLog:
    """One line per event: human text, or (json=True) a JSON object whose field names are
    the Go knocker-cli's journald fields, so tools built for its journal can read it."""

    def __init__(self, out: TextIO, as_json: bool, secret: str, clock: Callable[[], float]) -> None:
        self._out = out
        self._json = as_json
        self._secret = secret
        self._clock = clock

    def emit(self, event: str | None, message: str, priority: int = 6, **fields: object) -> None:
        message = redact(message, self._secret)
        now = self._clock()
        if self._json:
            record: dict[str, str] = {
                "MESSAGE": message,
                "PRIORITY": str(priority),
                "SYSLOG_IDENTIFIER": "knocker",
                "KNOCKER_SCHEMA_VERSION": "1",
                "KNOCKER_TIME_UNIX": f"{now:.3f}",
            }
            if event:
                record["KNOCKER_EVENT"] = event
            # journald stores every field as a string; the Go CLI's consumers expect that.
            for name, value in fields.items():
                if value is not None and value != "":
                    record[name] = redact(str(value), self._secret)
            line = json.dumps(record)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            line = f"{stamp} {message}"
        try:
            print(line, file=self._out, flush=True)
        except BrokenPipeError:
            pass  # a closed log reader must not kill the watcher


def _utc(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


@dataclass
class _State:
    grant: Grant | None = None
    grant_source: str = ""
    next_knock: float | None = None
    cadence: str = ""
    failures: int = 0
    last_ip: str | None = None
    seen_ip: str | None = None
    next_ip_check: float | None = None


class Watcher:
    """The `knocker watch` loop, with every effect injected."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        transport: Transport,
        clock: Callable[[], float],
        wait: Callable[[float], bool],
        rng: Callable[[], float],
        ip: str | None = None,
        backoff_min: float = 5.0,
        backoff_max: float = 300.0,
    ) -> None:
        self.settings = settings
        self.log = log
        self.transport = transport
        self.clock = clock
        self.wait = wait  # sleeps up to N seconds; True when asked to stop
        self.rng = rng
        self.ip = ip
        self.backoff_min = backoff_min
        self.backoff_max = max(backoff_max, backoff_min)
        self.state = _State()

    def backoff(self, failures: int) -> float:
        """Exponential, bounded, with "equal jitter": half fixed, half random, so retries of
        many clients spread out while each delay still grows."""
        ceiling = min(self.backoff_max, self.backoff_min * 2.0 ** min(failures - 1, 30))
        return ceiling / 2 + self.rng() * ceiling / 2

    def refresh_delay(self, grant: Grant) -> tuple[float, str]:
        if grant.expires_in_seconds > 0:
            delay = max(MIN_REFRESH_SECONDS, grant.expires_in_seconds * REFRESH_FRACTION)
            return delay, "ttl"
        return DEFAULT_CADENCE_SECONDS, "default"

    # -- events -----------------------------------------------------------------------

    def _snapshot(self) -> None:
        s = self.state
        parts = []
        if s.grant is not None:
            parts.append(f"whitelisted {s.grant.entry} until {_utc(s.grant.expires_at)}")
        else:
            parts.append("not whitelisted")
        if s.next_knock is not None:
            parts.append(f"next knock at {_utc(s.next_knock)}")
        self.log.emit(
            "StatusSnapshot",
            "Status: " + ", ".join(parts),
            KNOCKER_WHITELIST_IP=s.grant.entry if s.grant else None,
            KNOCKER_EXPIRES_UNIX=s.grant.expires_at if s.grant else None,
            KNOCKER_TTL_SEC=s.grant.expires_in_seconds if s.grant else None,
            KNOCKER_NEXT_AT_UNIX=int(s.next_knock) if s.next_knock is not None else None,
            KNOCKER_CADENCE_SOURCE=s.cadence,
        )

    def _set_next_knock(self, when: float, cadence: str) -> None:
        self.state.next_knock = when
        self.state.cadence = cadence
        self.log.emit(
            "NextKnockUpdated",
            f"Next knock at {_utc(when)}",
            KNOCKER_NEXT_AT_UNIX=int(when),
            KNOCKER_CADENCE_SOURCE=cadence,
        )

    # -- steps ------------------------------------------------------------------------

    def _check_ip(self, now: float) -> None:
        s = self.state
        assert self.settings.ip_check_url is not None
        s.next_ip_check = now + self.settings.check_interval_minutes * 60
        try:
            address = fetch_public_ip(self.settings.ip_check_url, self.transport)
        except ValueError as error:
            self.log.emit(
                "Error",
                f"IP lookup failed: {error}",
                3,
                KNOCKER_ERROR_CODE="ip_lookup_failed",
                KNOCKER_ERROR_MSG=str(error),
                KNOCKER_CONTEXT=display_url(self.settings.ip_check_url),
            )
            return
        s.seen_ip = address
        if address == s.last_ip:
            return
        if s.last_ip is not None:
            self.log.emit(None, f"Public address changed from {s.last_ip} to {address}")
        # A knock already due (startup) or a backoff retry in progress covers the change.
        if s.failures == 0 and (s.next_knock is None or s.next_knock > now):
            self._set_next_knock(now, "ip_change")

    def _knock(self) -> None:
        s = self.state
        seen = s.seen_ip
        try:
            grant = knock(self.settings, self.transport, ttl=self.settings.ttl, ip=self.ip)
        except KnockFailed as failure:
            s.failures += 1
            self.log.emit(
                "KnockTriggered",
                f"Knock triggered via schedule: failure ({failure.message})",
                3,
                KNOCKER_TRIGGER_SOURCE="schedule",
                KNOCKER_RESULT="failure",
            )
            self.log.emit(
                "Error",
                f"Knock failed: {failure.message}",
                3,
                KNOCKER_ERROR_CODE="knock_failed",
                KNOCKER_ERROR_MSG=failure.message,
                KNOCKER_CONTEXT=display_url(self.settings.api_url),
                KNOCKER_HTTP_STATUS=failure.status,
            )
            delay = self.backoff(s.failures)
            self._set_next_knock(self.clock() + delay, "backoff")
            self._snapshot()
            return
        s.failures = 0
        s.grant = grant
        s.last_ip = seen if seen is not None else s.last_ip
        self.log.emit(
            "KnockTriggered",
            "Knock triggered via schedule: success",
            KNOCKER_TRIGGER_SOURCE="schedule",
            KNOCKER_RESULT="success",
            KNOCKER_WHITELIST_IP=grant.entry,
        )
        self.log.emit(
            "WhitelistApplied",
            f"Whitelisted {grant.entry} for {grant.expires_in_seconds}s "
            f"(expires at {_utc(grant.expires_at)})",
            KNOCKER_WHITELIST_IP=grant.entry,
            KNOCKER_TTL_SEC=grant.expires_in_seconds,
            KNOCKER_EXPIRES_UNIX=grant.expires_at,
            KNOCKER_SOURCE="schedule",
        )
        warning = cap_warning(self.settings.ttl, grant)
        if warning:
            self.log.emit(None, warning, 4)
        delay, cadence = self.refresh_delay(grant)
        self._set_next_knock(self.clock() + delay, cadence)
        self._snapshot()

    def run(self) -> int:
        s = self.state
        self.log.emit(
            "ServiceState",
            f"Service state: started (knocker {__version__}, {display_url(self.settings.api_url)})",
            KNOCKER_SERVICE_STATE="started",
            KNOCKER_VERSION=__version__,
        )
        now = self.clock()
        s.next_knock = now
        s.cadence = "startup"
        if self.settings.ip_check_url:
            s.next_ip_check = now
        self._snapshot()
        while True:
            now = self.clock()
            if s.grant is not None and now >= s.grant.expires_at:
                expired = s.grant
                s.grant = None
                self.log.emit(
                    "WhitelistExpired",
                    f"Whitelist expired for {expired.entry} at {_utc(expired.expires_at)}",
                    5,
                    KNOCKER_WHITELIST_IP=expired.entry,
                    KNOCKER_EXPIRED_UNIX=expired.expires_at,
                )
                self._snapshot()
            if s.next_ip_check is not None and now >= s.next_ip_check:
                self._check_ip(now)
            if s.next_knock is not None and self.clock() >= s.next_knock:
                self._knock()
            deadlines = [t for t in (s.next_knock, s.next_ip_check) if t is not None]
            if s.grant is not None:
                deadlines.append(float(s.grant.expires_at))
            delay = min(deadlines) - self.clock() if deadlines else MAX_WAIT_SECONDS
            if self.wait(min(max(delay, 0.0), MAX_WAIT_SECONDS)):
                break
        self.log.emit(
            "ServiceState", "Service state: stopping", 5, KNOCKER_SERVICE_STATE="stopping"
        )
        self.log.emit("ServiceState", "Service state: stopped", KNOCKER_SERVICE_STATE="stopped")
        return EXIT_OK


def run_watch(
    args: argparse.Namespace,
    transport: Transport = urllib_transport,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stop: threading.Event | None = None,
) -> int:
    """`knocker watch`: keeps this machine whitelisted until SIGTERM/SIGINT (exit 0)."""
    out, err, settings = _start(args, environ, home, out, err)
    if settings is None:
        return EXIT_USAGE
    if args.ip:
        # Let the server judge the value, but catch typos before a daemon retries forever.
        try:
            ipaddress.ip_network(args.ip, strict=False)
        except ValueError:
            print(f"knocker: --ip: not an IP address or network: {args.ip!r}", file=err)
            return EXIT_USAGE
    if stop is None:
        stop = threading.Event()

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    # S311: jitter spreads retries; it protects nothing, so a CSPRNG buys nothing.
    rng = random.Random()  # noqa: S311
    watcher = Watcher(
        settings,
        EventLog(out, args.json, settings.api_key, time.time),
        transport,
        clock=time.time,
        wait=stop.wait,
        rng=rng.random,
        ip=args.ip,
        backoff_min=args.backoff_min,
        backoff_max=args.backoff_max,
    )
    return watcher.run()
