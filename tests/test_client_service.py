"""`knocker service install|start|stop|status|uninstall` with an injected systemctl runner
(the real `systemctl --user` runs in the booted-machine test), and the user unit
deploy/systemd/user/knocker.service checked by systemd-analyze."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from knocker.cli import build_parser
from knocker.client.service import UNIT_NAME, run_service, unit_directory, unit_text
from tests.clientsupport import client_env
from tests.serverproc import KNOCKER

REPO = Path(__file__).resolve().parent.parent
DEPLOY_UNIT = REPO / "deploy/systemd/user/knocker.service"
EXE = "/opt/knocker venv/bin/knocker"  # a space, to check ExecStart quoting


class FakeSystemctl:
    """Records each `systemctl --user` call; answers with `returncode`/`stdout` per verb."""

    def __init__(self, answers: dict[str, tuple[int, str]] | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.answers = answers or {}

    def __call__(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(tuple(args))
        code, stdout = self.answers.get(args[0], (0, ""))
        stderr = "Failed to connect to bus" if code else ""
        return subprocess.CompletedProcess(["systemctl", "--user", *args], code, stdout, stderr)


def service(
    verb: str, home: Path, systemctl: FakeSystemctl, environ: dict[str, str] | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(verb=verb, out=out, err=err)
    code = run_service(args, run=systemctl, environ=environ or {}, home=home, executable=EXE)
    return code, out.getvalue(), err.getvalue()


def test_install_writes_the_unit_reloads_and_enables(tmp_path: Path) -> None:
    """install writes ~/.config/systemd/user/knocker.service running this knocker's watch
    (the path quoted for systemd), then daemon-reload and enable, in that order."""
    systemctl = FakeSystemctl()
    code, out, err = service("install", tmp_path, systemctl)
    assert (code, err) == (0, "")
    unit = tmp_path / ".config/systemd/user/knocker.service"
    text = unit.read_text()
    assert 'ExecStart="/opt/knocker venv/bin/knocker" watch\n' in text
    assert text == unit_text(EXE)
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert systemctl.calls == [("daemon-reload",), ("enable", UNIT_NAME)]
    assert "installed" in out
    again = service("install", tmp_path, systemctl)
    assert again[0] == 0 and "updated" in again[1]
    assert not list(unit.parent.glob(".*.tmp"))


def test_install_honours_xdg_config_home(tmp_path: Path) -> None:
    """With $XDG_CONFIG_HOME set, the unit goes where systemd's user manager looks."""
    config = tmp_path / "xdg"
    code, _, _ = service("install", tmp_path, FakeSystemctl(), {"XDG_CONFIG_HOME": str(config)})
    assert code == 0
    assert (config / "systemd/user/knocker.service").is_file()
    assert unit_directory({"XDG_CONFIG_HOME": "relative"}, tmp_path) == (
        tmp_path / ".config/systemd/user"
    )


@pytest.mark.parametrize(("state", "printed"), [("active", "1"), ("inactive", "2"),
                                                ("failed", "2"), ("activating", "2")])  # fmt: skip
def test_status_prints_1_running_or_2_stopped(tmp_path: Path, state: str, printed: str) -> None:
    """status prints the Go client's number from `systemctl --user is-active`, exit 0."""
    service("install", tmp_path, FakeSystemctl())
    systemctl = FakeSystemctl({"is-active": (0 if state == "active" else 3, state + "\n")})
    assert service("status", tmp_path, systemctl) == (0, printed + "\n", "")
    assert systemctl.calls == [("is-active", UNIT_NAME)]


@pytest.mark.parametrize("verb", ["start", "stop", "status", "uninstall"])
def test_verbs_on_a_missing_unit_say_to_install_it(tmp_path: Path, verb: str) -> None:
    """Without the unit file every other verb exits 1, calls nothing, and says what to run."""
    systemctl = FakeSystemctl()
    code, out, err = service(verb, tmp_path, systemctl)
    assert (code, out) == (1, "")
    assert "not installed" in err and "knocker service install" in err
    assert systemctl.calls == []


@pytest.mark.parametrize("verb", ["start", "stop"])
def test_start_and_stop_call_systemctl_user(tmp_path: Path, verb: str) -> None:
    """start/stop are `systemctl --user start|stop knocker.service`."""
    service("install", tmp_path, FakeSystemctl())
    systemctl = FakeSystemctl()
    code, out, _ = service(verb, tmp_path, systemctl)
    assert code == 0 and verb in out
    assert systemctl.calls == [(verb, UNIT_NAME)]


def test_uninstall_stops_disables_and_removes(tmp_path: Path) -> None:
    """uninstall: disable --now, remove the file, daemon-reload."""
    service("install", tmp_path, FakeSystemctl())
    systemctl = FakeSystemctl()
    code, _, _ = service("uninstall", tmp_path, systemctl)
    assert code == 0
    assert not (tmp_path / ".config/systemd/user/knocker.service").exists()
    assert systemctl.calls == [("disable", "--now", UNIT_NAME), ("daemon-reload",)]


def test_a_failing_systemctl_is_reported_with_its_message(tmp_path: Path) -> None:
    """No user manager (systemctl fails): exit 1 with systemctl's own words."""
    code, _, err = service("install", tmp_path, FakeSystemctl({"daemon-reload": (1, "")}))
    assert code == 1
    assert "systemctl --user daemon-reload failed: Failed to connect to bus" in err


def test_service_verbs_do_not_clash_with_the_server_commands() -> None:
    """The verbs live under `knocker service`; the top level keeps the server's commands."""
    parser = build_parser()
    assert parser.parse_args(["service", "status"]).verb == "status"
    for verb in ("install", "start", "stop", "status", "uninstall"):
        with pytest.raises(SystemExit):
            parser.parse_args([verb])


# ---------------------------------------------------------------------------------------
# the unit file


def test_deploy_unit_is_the_unit_install_writes() -> None:
    """deploy/systemd/user/knocker.service is exactly what install writes for
    ~/.local/bin/knocker, so the two cannot drift apart."""
    assert DEPLOY_UNIT.read_text() == unit_text("%h/.local/bin/knocker")
    assert not (REPO / "deploy/systemd/knocker-watch.service").exists()


def test_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The user unit runs `knocker watch`, reads the Go CLI's environment file, is stopped by
    SIGTERM, and `systemd-analyze --user verify` accepts it without a warning."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze (Debian package systemd) is needed")
        pytest.skip("systemd-analyze not installed")
    text = DEPLOY_UNIT.read_text()
    assert "ExecStart=%h/.local/bin/knocker watch\n" in text
    assert "EnvironmentFile=-%h/.config/knocker/env\n" in text
    assert "KillSignal=SIGTERM\n" in text and "WantedBy=default.target\n" in text
    # %h is the user's home: give the unit one where ~/.local/bin/knocker exists.
    (tmp_path / ".local/bin").mkdir(parents=True)
    (tmp_path / ".local/bin/knocker").symlink_to(KNOCKER)
    (tmp_path / "run").mkdir(mode=0o700)
    result = subprocess.run(
        [analyze, "--user", "verify", str(DEPLOY_UNIT)],
        env={**client_env(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "knocker.service" not in result.stdout + result.stderr  # no warnings
