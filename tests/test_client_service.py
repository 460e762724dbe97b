"""The systemd user unit deploy/systemd/knocker-watch.service."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.clientsupport import client_env
from tests.serverproc import KNOCKER


def test_watch_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """deploy/systemd/knocker-watch.service is a valid user unit running `knocker watch`,
    reading the Go CLI's environment file, stopped by SIGTERM."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze (Debian package systemd) is needed")
        pytest.skip("systemd-analyze not installed")
    unit = Path(__file__).resolve().parent.parent / "deploy/systemd/knocker-watch.service"
    text = unit.read_text()
    assert "ExecStart=%h/.local/bin/knocker watch\n" in text
    assert "EnvironmentFile=-%h/.config/knocker/env\n" in text
    assert "KillSignal=SIGTERM\n" in text and "WantedBy=default.target\n" in text
    # %h is the user's home: give the unit one where ~/.local/bin/knocker exists.
    (tmp_path / ".local/bin").mkdir(parents=True)
    (tmp_path / ".local/bin/knocker").symlink_to(KNOCKER)
    (tmp_path / "run").mkdir(mode=0o700)
    result = subprocess.run(
        [analyze, "--user", "verify", str(unit)],
        env={**client_env(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "knocker-watch.service" not in result.stdout + result.stderr  # no warnings
