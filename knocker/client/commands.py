"""The client's command line: `knocker knock`, `knocker watch` (and the `knocker service`
verbs from service.py) registered on knocker's parser; each `run_*` takes its effects as
arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TextIO, TypeVar

from ..config import MAX_TTL
from . import grants, service
from .events import EventLog, JournalWriter, LineWriter, Writer
from .journald import JournalSocket, journal_attached
from .knock import (
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_USAGE,
    KnockFailed,
    Transport,
    cap_warning,
    describe_result,
    knock,
    urllib_transport,
)
from .loop import KnockLoop
from .settings import Settings, SettingsError, load_settings, plain_http_warning

_N = TypeVar("_N", int, float)


def _number(
    convert: Callable[[str], _N], valid: Callable[[_N], bool], rule: str
) -> Callable[[str], _N]:
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


_positive_int = _number(
    int, lambda value: 1 <= value <= MAX_TTL, f"must be between 1 and {MAX_TTL}"
)
_positive_float = _number(
    float, lambda value: math.isfinite(value) and value > 0, "must be a positive number"
)


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
    """Add `knock`, `watch` and `service` to knocker's command line."""
    knock_parser = subparsers.add_parser(
        "knock",
        help="knock once: whitelist this machine's address",
        description="Knock once: ask Knocker to whitelist this machine's address (or --ip).",
        epilog=_SETTINGS_HELP + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common_arguments(knock_parser)
    knock_parser.add_argument(
        "--revoke",
        action="store_true",
        help="sign out instead: end the grants this key made for this machine (or --ip)",
    )
    knock_parser.set_defaults(func=run_knock)
    _register_grants(subparsers)

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
        + "\nevents (journal entries under systemd, else lines; --json prints one JSON object\n"
        "per line): ServiceState, StatusSnapshot, WhitelistApplied, WhitelistExpired,\n"
        "NextKnockUpdated, KnockTriggered, Error\n",
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
    watch_parser.add_argument(
        "--journal",
        action="store_true",
        help="write native systemd journal entries (the default when systemd connected "
        "stdout or stderr to the journal)",
    )
    watch_parser.set_defaults(func=run_watch)
    service.register(subparsers)


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
    """`knocker knock`: one knock; prints the result (or JSON); exit status per EXIT_CODES_HELP."""
    out, err, settings = _start(args, environ, home, out, err)
    if settings is None:
        return EXIT_USAGE
    if getattr(args, "revoke", False):
        return _run_sign_out(args, settings, transport, out, err)
    requested = settings.ttl
    try:
        result = knock(settings, transport, ttl=requested, ip=args.ip)
    except KnockFailed as failure:
        return _failed("knock", failure, args.json, out, err)
    warning = cap_warning(requested, result)
    if warning:
        print(warning, file=err)
    if args.json:
        print(json.dumps(result.as_json()), file=out)
    else:
        print(describe_result(result, clock()), file=out)
    return EXIT_OK


def _run_sign_out(
    args: argparse.Namespace, settings: Settings, transport: Transport, out: TextIO, err: TextIO
) -> int:
    try:
        removed = grants.sign_out(settings, transport, ip=args.ip)
    except KnockFailed as failure:
        return _failed("sign-out", failure, args.json, out, err)
    print(
        json.dumps({"removed": removed}) if args.json else grants.describe_removed(removed),
        file=out,
    )
    return EXIT_OK


def _failed(what: str, failure: KnockFailed, as_json: bool, out: TextIO, err: TextIO) -> int:
    print(f"knocker: {what} failed: {failure.message}", file=err)
    if as_json:
        print(json.dumps({"error": failure.message, "status": failure.status}), file=out)
    return failure.exit_code


def _register_grants(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "grants",
        help="list or end the server's grants (needs a key with admin: true)",
        description="List every live grant, or end the grants of one entry, through the\n"
        "grants API. Same settings as `knocker knock` (URL, key from a file or the\n"
        "environment).",
        epilog=_SETTINGS_HELP + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="every live grant: a table, or --json")
    revoke = verbs.add_parser("revoke", help="end every grant of ENTRY (an address or CIDR)")
    revoke.add_argument("entry", metavar="ENTRY")
    for verb in (listing, revoke):
        verb.add_argument("--url", metavar="URL", help="Knocker base URL (api_url)")
        keys = verb.add_mutually_exclusive_group()
        keys.add_argument("--key", metavar="KEY", help="API key (prefer --key-file)")
        keys.add_argument("--key-file", metavar="FILE", help="read the API key from FILE")
        verb.add_argument("--config", metavar="FILE", help="client settings file")
        verb.add_argument("--json", action="store_true", help="machine-readable JSON output")
        verb.set_defaults(func=run_grants)


def run_grants(
    args: argparse.Namespace,
    transport: Transport = urllib_transport,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    clock: Callable[[], float] = time.time,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`knocker grants list|revoke`: the admin side of the grants API."""
    out, err, settings = _start(args, environ, home, out, err)
    if settings is None:
        return EXIT_USAGE
    try:
        if args.verb == "list":
            listed = grants.list_grants(settings, transport)
        else:
            removed = grants.revoke_grant(settings, transport, args.entry)
    except KnockFailed as failure:
        return _failed(f"grants {args.verb}", failure, args.json, out, err)
    if args.verb == "list":
        print(
            json.dumps({"grants": listed}) if args.json else grants.grants_table(listed, clock()),
            file=out,
        )
    else:
        print(
            json.dumps({"removed": removed})
            if args.json
            else grants.describe_removed(removed).replace("Signed out: ended", "Ended"),
            file=out,
        )
    return EXIT_OK


def watch_writer(
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str],
    journal: Callable[[], JournalSocket] = JournalSocket,
) -> Writer:
    """Native journal entries under systemd with the journal attached (or --journal);
    otherwise lines on `out` (human or --json). A journal that cannot be reached or refuses
    an entry costs that entry its structure, never the watch: it is written as a line on
    stderr instead (which systemd also hands to the journal)."""
    lines = LineWriter(out, args.json)
    if not (args.journal or journal_attached(environ)):
        return lines
    fallback = LineWriter(err, args.json)
    try:
        sink = journal()
    except OSError as error:
        print(f"knocker: cannot open the journal socket ({error}); logging to stderr", file=err)
        return fallback
    return JournalWriter(sink.send, fallback)


def run_watch(
    args: argparse.Namespace,
    transport: Transport = urllib_transport,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stop: threading.Event | None = None,
    journal: Callable[[], JournalSocket] = JournalSocket,
) -> int:
    """`knocker watch`: keeps this machine whitelisted until SIGTERM/SIGINT (exit 0)."""
    environ = os.environ if environ is None else environ
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
    writer = watch_writer(args, out, err, environ, journal)
    loop = KnockLoop(
        settings,
        EventLog(writer, settings.api_key, time.time),
        transport,
        clock=time.time,
        monotonic=time.monotonic,
        sleep=stop.wait,
        rng=rng.random,
        ip=args.ip,
        backoff_min=args.backoff_min,
        backoff_max=args.backoff_max,
    )
    return loop.run()
