"""`knocker service install|start|stop|status|uninstall`: `knocker watch` as the systemd
USER unit knocker.service of the current user, driven through `systemctl --user` (the Go
knocker-cli's verbs, under `service` so they cannot be mistaken for the server's). The
unit text lives here once; deploy/systemd/user/knocker.service is it rendered for
~/.local/bin/knocker (a test keeps the two equal). `systemctl` is an injected runner.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

UNIT_NAME = "knocker.service"
# `knocker service status` prints the Go client's numbers (kardianos/service's Status).
STATUS_RUNNING = 1
STATUS_STOPPED = 2

UNIT_TEMPLATE = """\
# knocker.service: keep this machine whitelisted with `knocker watch`, as a systemd USER
# service (no root needed; it runs with your settings and your key). The GNOME extension
# knocker-gnome controls a user unit of exactly this name and reads its journal.
#
# `knocker service install` writes this file to ~/.config/systemd/user/ with ExecStart
# pointing at the knocker that ran it, and enables it; `knocker service start` starts it.
# By hand: copy it there, adjust ExecStart if knocker is not in ~/.local/bin, then
#   systemctl --user daemon-reload && systemctl --user enable --now knocker.service
# Settings: ~/.knocker.yaml (api_url, api_key, ...) or the environment file below, e.g.
#   install -m 600 /dev/null ~/.config/knocker/env
#   printf 'KNOCKER_API_URL=https://...\\nKNOCKER_API_KEY=...\\n' >> ~/.config/knocker/env
# Events: journalctl --user -u knocker.service -o json (native entries, KNOCKER_* fields).
# To keep it running while you are logged out: loginctl enable-linger "$USER".

[Unit]
Description=Knocker watch: keep this machine whitelisted
Documentation=https://github.com/FarisZR/knocker
# No network-online.target: a user manager cannot order against system targets. watch
# retries failed knocks with backoff, so starting before the network is harmless.

[Service]
Type=exec
# The same environment file the Go knocker-cli's user service reads.
EnvironmentFile=-%h/.config/knocker/env
# stdout/stderr go to the journal (the default), which sets JOURNAL_STREAM: watch then
# writes native journal entries instead of lines.
ExecStart={exec_start} watch
# SIGTERM makes watch log "stopping"/"stopped" and exit 0.
KillSignal=SIGTERM
TimeoutStopSec=20
Restart=on-failure
RestartSec=30
UMask=0077
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native

[Install]
WantedBy=default.target
"""

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def systemctl_user(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """The real runner: `systemctl --user ARGS`, output captured, bounded in time."""
    return subprocess.run(
        ["systemctl", "--user", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def quote_exec_path(path: str) -> str:
    """A path as one ExecStart word (systemd.service(5) "Command lines"; systemd.unit(5)
    specifiers): `%` doubled, quoted when it holds spaces or quotes."""
    word = path.replace("\\", "\\\\").replace("%", "%%")
    if any(ch.isspace() or ch in "\"'" for ch in word):
        word = '"' + word.replace('"', '\\"') + '"'
    return word


def unit_text(executable: str) -> str:
    """knocker.service running `<executable> watch`; "%h/..." paths are kept as systemd
    specifiers (that is how deploy/systemd/user/knocker.service names ~/.local/bin)."""
    if executable.startswith("%h/"):
        exec_start = "%h/" + quote_exec_path(executable[3:])
    else:
        exec_start = quote_exec_path(executable)
    return UNIT_TEMPLATE.format(exec_start=exec_start)


def unit_directory(environ: Mapping[str, str], home: Path) -> Path:
    """Where systemd looks for a user's own units: $XDG_CONFIG_HOME/systemd/user, else
    ~/.config/systemd/user (systemd.unit(5), "User Unit Search Path")."""
    config = environ.get("XDG_CONFIG_HOME")
    base = Path(config) if config and os.path.isabs(config) else home / ".config"
    return base / "systemd" / "user"


def this_executable(argv0: str = sys.argv[0]) -> str:
    """The `knocker` console script that is running, as an absolute path."""
    if Path(argv0).name == "knocker" and os.path.isfile(argv0):
        return os.path.abspath(argv0)
    sibling = Path(sys.executable).with_name("knocker")
    if sibling.is_file():
        return str(sibling)
    return shutil.which("knocker") or os.path.abspath(argv0)


class ServiceVerbs:
    """The five verbs, each returning an exit status; messages on `out`/`err`."""

    def __init__(
        self,
        run: Runner,
        unit_path: Path,
        executable: str,
        out: TextIO,
        err: TextIO,
    ) -> None:
        self.run = run
        self.unit_path = unit_path
        self.executable = executable
        self.out = out
        self.err = err

    def _systemctl(self, *args: str) -> bool:
        try:
            result = self.run(args)
        except (OSError, subprocess.SubprocessError) as error:
            print(f"knocker: systemctl --user {' '.join(args)}: {error}", file=self.err)
            return False
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            print(f"knocker: systemctl --user {' '.join(args)} failed: {detail}", file=self.err)
            return False
        return True

    def _require_installed(self) -> bool:
        if self.unit_path.exists():
            return True
        print(
            f"knocker: {UNIT_NAME} is not installed ({self.unit_path}); "
            "run `knocker service install`",
            file=self.err,
        )
        return False

    def install(self) -> int:
        """Write (or rewrite) the unit for this knocker, reload systemd, enable it."""
        self.unit_path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.unit_path.exists()
        partial = self.unit_path.with_name(f".{UNIT_NAME}.tmp")
        partial.write_text(unit_text(self.executable), encoding="utf-8")
        partial.chmod(0o644)
        os.replace(partial, self.unit_path)  # rename(2): systemd never reads half a unit
        if not (self._systemctl("daemon-reload") and self._systemctl("enable", UNIT_NAME)):
            return 1
        print(
            f"{UNIT_NAME} {'updated' if existed else 'installed'} ({self.unit_path}), "
            f"enabled; `knocker service start` starts it",
            file=self.out,
        )
        return 0

    def start(self) -> int:
        if not (self._require_installed() and self._systemctl("start", UNIT_NAME)):
            return 1
        print(f"{UNIT_NAME} started", file=self.out)
        return 0

    def stop(self) -> int:
        if not (self._require_installed() and self._systemctl("stop", UNIT_NAME)):
            return 1
        print(f"{UNIT_NAME} stopped", file=self.out)
        return 0

    def status(self) -> int:
        """Prints 1 (running) or 2 (stopped), like the Go client; not installed: exit 1."""
        if not self._require_installed():
            return 1
        try:
            # is-active exits non-zero for anything but "active": its output is the answer.
            state = self.run(("is-active", UNIT_NAME)).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            print(f"knocker: systemctl --user is-active {UNIT_NAME}: {error}", file=self.err)
            return 1
        print(STATUS_RUNNING if state == "active" else STATUS_STOPPED, file=self.out)
        return 0

    def uninstall(self) -> int:
        """Stop and disable the unit, remove its file, reload systemd."""
        if not self._require_installed():
            return 1
        if not self._systemctl("disable", "--now", UNIT_NAME):
            return 1
        self.unit_path.unlink()
        if not self._systemctl("daemon-reload"):
            return 1
        print(f"{UNIT_NAME} stopped, disabled and removed", file=self.out)
        return 0


VERBS = ("install", "start", "stop", "status", "uninstall")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `knocker service VERB`."""
    parser = subparsers.add_parser(
        "service",
        help="install and control `knocker watch` as your systemd user unit knocker.service",
        description=(
            "Manage the systemd USER unit knocker.service, which runs `knocker watch` for\n"
            "the current user (systemctl --user; no root). The Go knocker-cli's verbs:\n"
            "  install    write ~/.config/systemd/user/knocker.service for this knocker\n"
            "             and enable it\n"
            "  start      start it now\n"
            "  stop       stop it\n"
            "  status     print 1 (running) or 2 (stopped); exit 1 if not installed\n"
            "  uninstall  stop, disable and remove it"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("verb", choices=VERBS, metavar="VERB", help=" | ".join(VERBS))
    parser.set_defaults(func=run_service)


def run_service(
    args: argparse.Namespace,
    run: Runner = systemctl_user,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    executable: str | None = None,
) -> int:
    """`knocker service VERB` for the current user."""
    environ = os.environ if environ is None else environ
    verbs = ServiceVerbs(
        run,
        unit_directory(environ, home or Path.home()) / UNIT_NAME,
        executable or this_executable(),
        getattr(args, "out", None) or sys.stdout,
        getattr(args, "err", None) or sys.stderr,
    )
    handler: Callable[[], int] = getattr(verbs, args.verb)
    return handler()
