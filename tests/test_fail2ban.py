"""deploy/fail2ban: the filter matches exactly the refused knocks in a real Knocker log.

A real `knocker serve` is knocked with wrong keys (and right ones) from several loopback
addresses; Debian's fail2ban-regex then reads the log it wrote with our filter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.serverproc import TEST_KEY, KnockerProcess, base_config

FILTER = Path(__file__).resolve().parents[1] / "deploy" / "fail2ban" / "filter.d" / "knocker.conf"
JAIL = FILTER.parents[1] / "jail.d" / "knocker.local"


def fail2ban_regex() -> str:
    found = shutil.which("fail2ban-regex")
    if found is None:
        message = "Debian's fail2ban is needed (tests/tools/install-test-deps.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_filter(log: Path) -> str:
    result = subprocess.run(
        [fail2ban_regex(), "--print-all-matched", "--print-all-missed", str(log), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.server
def test_filter_matches_each_refused_knock_with_its_client_and_nothing_else(tmp_path: Path) -> None:
    """Each wrong-key knock is one match for its client; grants, rate-limited knocks and
    every other line of the log stay unmatched."""
    config = base_config(
        tmp_path,
        security={
            "knock_rate_limit": {
                "window_seconds": 60,
                "failed_requests": 3,
                "successful_requests": 0,
            }
        },
    )
    refused = {"127.0.0.2": 3, "127.0.0.3": 1}
    with KnockerProcess(tmp_path, config, workers=2) as server:
        for source, count in refused.items():
            for _ in range(count):
                assert server.knock("wrong-key-" + source, source=source)[0] == 401
        assert server.knock("wrong-key", source="127.0.0.2")[0] == 429  # budget spent
        assert server.knock(TEST_KEY, source="127.0.0.4")[0] == 200
        assert server.knock(TEST_KEY, {"ip_address": "10.9.8.7"}, source="127.0.0.5")[0] == 403
    log = server.log_path
    text = log.read_text()
    assert "wrong-key" not in text  # never a key, wrong ones included
    output = run_filter(log)
    total = re.search(r"^Failregex: (\d+) total", output, re.M)
    assert total is not None, output
    assert int(total.group(1)) == sum(refused.values()) + 1  # + the 403
    matched_section = output.split("|- Matched line(s):", 1)[1].split("`-", 1)[0]
    matched_ips = re.findall(r"client=(\S+)", matched_section)
    assert sorted(matched_ips) == sorted(
        [ip for ip, count in refused.items() for _ in range(count)] + ["127.0.0.5"]
    )


def test_filter_never_matches_an_unresolved_client_or_a_forged_field(tmp_path: Path) -> None:
    """client=- (unresolved, peer named) and a `client=` later on the line do not match."""
    log = tmp_path / "knocker.log"
    prefix = "[2026-01-01 12:00:00 +0000] [42] [INFO] knocker.audit:"
    log.write_text(
        f"{prefix} event=knock_failed client=- key=- result=401 peer=10.0.0.1 reason=x\n"
        f"{prefix} event=grant client=192.0.2.1 key=phone entry=192.0.2.1 result=200\n"
        f'{prefix} event=knock_failed client=- key="a client=192.0.2.9 " result=401\n'
        f"{prefix} event=knock_failed client=192.0.2.7 key=- result=401 reason=x\n"
    )
    output = run_filter(log)
    assert re.search(r"^Failregex: 1 total", output, re.M), output
    assert "192.0.2.7" in output.split("|- Matched line(s):", 1)[1]


def test_jail_example_names_the_filter() -> None:
    """The example jail enables the shipped filter by its file name."""
    text = JAIL.read_text()
    assert re.search(r"^filter\s*=\s*knocker$", text, re.M)
    assert re.search(r"^enabled\s*=\s*true$", text, re.M)
