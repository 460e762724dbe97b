"""Knocker on a booted Debian 12 host: a rootfs from tests/tools/debian-rootfs.sh booted
with `systemd-nspawn --boot` (private network: only its own loopback), into which the
wheel built from this tree is installed with README's bare-metal steps. Inside it, for
real: the system unit (Type=notify start, knock/verify, reload, stop, restart,
`systemd-analyze security`), firewalld driven by the unprivileged user `knocker` through
the polkit rule, and the client's user unit `knocker.service` in a lingering user's
manager, read back with `journalctl --user -o json` the way the GNOME extension reads it.

One machine is booted for the whole module and the tests run in file order, each
building on the state the previous one left (like a person following the README).
Commands run inside the machine through `nsenter` on its PID 1: the host has no
systemd-machined (`machinectl`/`systemd-run -M` need one), so the machine is not
registered. Needs root; locally skipped without the prerequisites, a failure under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.systemd

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
URL = "http://127.0.0.1:8000"
KEY = "systemd-host-test-key-0123456789abcdef"
NEW_KEY = "systemd-host-test-key-after-reload-0001"
ZONE = "knocker"
REMOTE = "203.0.113.9"  # inside monitored_ips: firewalld mode adds rich rules for it
USER = "alice"  # the desktop user running the client's user unit
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLKIT_RULE = "/etc/polkit-1/rules.d/50-knocker-firewalld.rules"


def stage(name: str, started: float) -> None:
    """Stage durations, printed (pytest -s, or the captured output of a failure)."""
    print(f"[systemd host] {name}: {time.monotonic() - started:.1f} s", file=sys.stderr)


def require() -> None:
    missing = [tool for tool in ("systemd-nspawn", "nsenter", "tar") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if not missing:
        return
    message = f"a booted systemd host needs: {', '.join(missing)}"
    if IN_CI:
        pytest.fail(message + " (make test-deps must provide them in CI)")
    pytest.skip(message)


def server_config(**changes: Any) -> dict[str, Any]:
    """/etc/knocker/knocker.yaml as README tells a user to edit the example: a real key,
    the whitelist in the state directory."""
    config: dict[str, Any] = {
        "server": {"trusted_proxies": []},
        "api_keys": [
            {
                "name": "admin",
                "key": KEY,
                "max_ttl": 3600,
                "allow_remote_whitelist": True,
                "admin": True,
            }
        ],
        "whitelist": {"storage_path": "/var/lib/knocker/whitelist.json"},
    }
    config.update(changes)
    return config


FIREWALLD = {
    "enabled": True,
    "zone_name": ZONE,
    "zone_priority": None,  # firewalld 1.3 (Debian 12) has no zone priorities
    "zone_target": "ACCEPT",
    "default_action": "drop",
    "monitored_ports": [{"port": 2222, "protocol": "tcp"}],
    "monitored_ips": ["203.0.113.0/24"],
}


def scope_options() -> list[str]:
    """Under a booted systemd (sd_booted(3): /run/systemd/system exists) nspawn asks it for
    a scope of its own with a delegated cgroup; elsewhere (a container running the tests,
    no host systemd to ask) it stays in the cgroup it was started in."""
    return [] if Path("/run/systemd/system").is_dir() else ["--keep-unit"]


class Machine:
    """One booted systemd-nspawn container and the commands run inside it."""

    def __init__(self, name: str, root: Path, log: Path) -> None:
        self.name, self.root, self.log = name, root, log
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    f"--machine={self.name}",
                    "-D",
                    str(self.root),
                    "--private-network",
                    "--register=no",
                    *scope_options(),
                    "--console=read-only",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.leader = self._wait_for_leader()

    def _wait_for_leader(self) -> int:
        """PID (host view) of the machine's systemd: nspawn's child running systemd."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for _ in range(300):
            if self.process.poll() is not None:
                pytest.fail(f"systemd-nspawn exited {self.process.returncode}\n{self.output()}")
            for pid in children.read_text().split():
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    continue
                if comm == "systemd":
                    return int(pid)
            time.sleep(0.1)
        pytest.fail(f"no systemd inside the machine after 30 s\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def run(
        self,
        *command: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 120,
        env: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the machine, with a clean environment (not the test's)."""
        environment = [f"PATH={PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", *env]
        if user is None:
            prefix = ["env", "-i", "HOME=/root", *environment]
        else:
            uid = self.run("id", "-u", user).stdout.strip()
            prefix = [
                "runuser",
                "-u",
                user,
                "--",
                "env",
                "-i",
                f"HOME=/home/{user}",
                f"USER={user}",
                f"XDG_RUNTIME_DIR=/run/user/{uid}",
                *environment,
            ]
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", *prefix, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"inside the machine: {' '.join(command)} -> {result.returncode}\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-euc", script, **kwargs)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """A file inside the machine (through its root directory, as root)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        # `install -m 0640 -o root -g knocker` as README says; a rewrite keeps the mode.
        self.write("/root/knocker.yaml", text)
        self.run(
            "install",
            "-m",
            "0640",
            "-o",
            "root",
            "-g",
            "knocker",
            "/root/knocker.yaml",
            "/etc/knocker/knocker.yaml",
        )

    def journal(self, unit: str, since: str, user: str | None = None) -> str:
        flag = ["--user"] if user else []
        return self.run(
            "journalctl", *flag, "-u", unit, "--since", since, "-o", "cat", "--no-pager", user=user
        ).stdout

    def wait_for(self, what: str, probe: Any, seconds: float = 30) -> Any:
        deadline = time.monotonic() + seconds
        for _ in range(int(seconds * 5) + 1):
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        pytest.fail(f"timed out after {seconds} s waiting for {what}")

    def now(self) -> str:
        """The machine's clock, for `journalctl --since` (same kernel clock as the host)."""
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 1))

    def poweroff(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if self.leader:
            subprocess.run(
                [
                    "nsenter",
                    "-t",
                    str(self.leader),
                    "-a",
                    "--",
                    "systemctl",
                    "poweroff",
                    "--no-block",
                ],
                capture_output=True,
                timeout=30,
            )
        try:
            self.process.wait(timeout=60)
            return
        except subprocess.TimeoutExpired:
            pass
        # nspawn turns SIGTERM into an orderly shutdown of a booted container
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


def curl(
    machine: Machine,
    method: str,
    path: str,
    key: str | None = None,
    body: dict[str, Any] | None = None,
) -> tuple[int, str]:
    """HTTP status and body of a request to Knocker on the machine's loopback."""
    command = [
        "curl",
        "-s",
        "-o",
        "/dev/stdout",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
        "--max-time",
        "10",
    ]
    if key is not None:
        command += ["-H", f"X-Api-Key: {key}"]
    if body is not None:
        command += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    result = machine.run(*command, URL + path, check=False)
    text, _, status = result.stdout.rpartition("\n")
    return int(status or 0), text


def build_wheels(workdir: Path) -> list[Path]:
    """The wheel of this tree (`python -m build`, as `make dist` does) and its dependencies
    (`pip download`), for an offline install inside the machine."""
    dist = workdir / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("knocker-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--dest", str(dist), str(wheel)],
        check=True,
        capture_output=True,
    )
    return sorted(dist.iterdir())


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    require()
    started = time.monotonic()
    tarball = subprocess.run(
        [str(ROOT / "tests/tools/debian-rootfs.sh"), "systemd"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    stage("rootfs tarball", started)
    workdir = tmp_path_factory.mktemp("systemd-host")
    t = time.monotonic()
    wheels = build_wheels(workdir)
    stage("wheel + dependencies on the host", t)
    root = workdir / "root"
    root.mkdir()
    machine = Machine(f"knocker-test-{os.getpid()}", root, workdir / "console.log")
    try:
        t = time.monotonic()
        subprocess.run(["tar", "-C", str(root), "-xf", tarball], check=True)
        install = root / "root/install"
        (install / "wheels").mkdir(parents=True)
        for wheel in wheels:
            target = install if wheel.name.startswith("knocker-") else install / "wheels"
            shutil.copy(wheel, target)
        shutil.copytree(ROOT / "deploy", install / "deploy")
        stage("rootfs extracted", t)
        t = time.monotonic()
        machine.boot()
        state = machine.wait_for(
            "systemd's bus inside the machine",
            lambda: machine.run(
                "systemctl",
                "is-system-running",
                "--wait",
                check=False,
                timeout=120,
            ).stdout.strip(),
            seconds=60,
        )
        stage(f"boot ({state})", t)
        if state != "running":
            failed = machine.run("systemctl", "--failed", "--no-legend", check=False).stdout
            pytest.fail(f"the machine booted {state}: {failed}\n{machine.output()}")
        t = time.monotonic()
        install_knocker(machine)
        stage("README's bare-metal install", t)
        yield machine
    finally:
        t = time.monotonic()
        machine.poweroff()
        stage("poweroff", t)
        shutil.rmtree(root, ignore_errors=True)
        stage("whole machine", started)


def install_knocker(machine: Machine) -> None:
    """README, "systemd (bare metal)", up to `systemctl enable --now` (the first test's):
    the apt-get line is the rootfs's package list, and pip installs offline from the
    wheels downloaded on the host (the machine has no network)."""
    machine.sh(
        """
        cd /root/install
        useradd --system --home-dir /var/lib/knocker --no-create-home \
            --shell /usr/sbin/nologin knocker
        python3 -m venv /opt/knocker/venv
        /opt/knocker/venv/bin/pip install -q --no-index --find-links wheels knocker-*.whl
        install -d -m 0750 -o root -g knocker /etc/knocker
    """,
        env=["PIP_DISABLE_PIP_VERSION_CHECK=1"],
    )
    machine.write_config(server_config())
    machine.sh("""
        cd /root/install
        /opt/knocker/venv/bin/knocker check-config /etc/knocker/knocker.yaml
        install -m 0644 deploy/systemd/knocker.service /etc/systemd/system/knocker.service
        systemctl daemon-reload
    """)


def active(machine: Machine, unit: str = "knocker") -> str:
    return machine.run("systemctl", "is-active", unit, check=False).stdout.strip()


def show(machine: Machine, prop: str, unit: str = "knocker") -> str:
    return machine.run("systemctl", "show", "-P", prop, unit).stdout.strip()


# --- the system unit ------------------------------------------------------------------


def test_start_returns_only_once_knocker_listens(machine: Machine) -> None:
    """`systemctl enable --now knocker` (Type=notify) returns after gunicorn's READY=1:
    the very next request is answered, with no retry."""
    assert show(machine, "Type") == "notify"
    t = time.monotonic()
    machine.run("systemctl", "enable", "--now", "knocker")
    stage("systemctl enable --now knocker", t)
    status, body = curl(machine, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok", body
    assert active(machine) == "active"
    user = machine.run("ps", "-o", "user=", "-p", show(machine, "MainPID")).stdout.strip()
    assert user == "knocker"


def test_knock_then_verify_on_the_machines_loopback(machine: Machine) -> None:
    """An unknown address is refused; a knock whitelists it; verify then lets it through."""
    assert curl(machine, "GET", "/verify")[0] == 401
    assert curl(machine, "POST", "/knock", key="wrong-key")[0] == 401
    status, body = curl(machine, "POST", "/knock", key=KEY, body={"ttl": 3600})
    assert status == 200, body
    assert json.loads(body)["whitelisted_entry"] == "127.0.0.1"
    assert curl(machine, "GET", "/verify")[0] == 200


def test_reload_applies_a_valid_change(machine: Machine) -> None:
    """`systemctl reload knocker` re-reads knocker.yaml: a key added to it works after."""
    assert curl(machine, "POST", "/knock", key=NEW_KEY)[0] == 401
    keys = server_config()["api_keys"] + [{"name": "laptop", "key": NEW_KEY, "max_ttl": 600}]
    machine.write_config(server_config(api_keys=keys))
    machine.run("systemctl", "reload", "knocker")
    machine.wait_for(
        "the new key to be accepted", lambda: curl(machine, "POST", "/knock", key=NEW_KEY)[0] == 200
    )
    assert active(machine) == "active"


def test_reload_with_an_invalid_file_keeps_the_running_config(machine: Machine) -> None:
    """An invalid file on reload: the old config keeps serving and the journal says why."""
    since = machine.now()
    broken = server_config()
    broken["api_keys"][0]["max_ttl"] = "an hour"
    machine.write_config(broken)
    machine.run("systemctl", "reload", "knocker")
    log = machine.wait_for(
        "the refusal in journalctl -u knocker",
        lambda: "keeping the running config" in (j := machine.journal("knocker", since)) and j,
    )
    assert "max_ttl" in log
    assert KEY not in log
    assert active(machine) == "active"
    assert curl(machine, "POST", "/knock", key=NEW_KEY)[0] == 200  # still the old config
    machine.write_config(server_config())
    machine.run("systemctl", "reload", "knocker")
    machine.wait_for(
        "the valid file to be back", lambda: curl(machine, "POST", "/knock", key=NEW_KEY)[0] == 401
    )


def test_stop_is_clean_and_a_restart_keeps_the_grants(machine: Machine) -> None:
    """`systemctl stop` ends with status 0 and the whitelist on disk; after `start` the
    grant from before still lets 127.0.0.1 through."""
    machine.run("systemctl", "stop", "knocker")
    assert active(machine) == "inactive"
    assert show(machine, "Result") == "success"
    assert show(machine, "ExecMainStatus") == "0"
    stored = json.loads(machine.run("cat", "/var/lib/knocker/whitelist.json").stdout)
    assert "127.0.0.1" in json.dumps(stored)
    machine.run("systemctl", "start", "knocker")
    assert curl(machine, "GET", "/verify")[0] == 200


def test_systemd_analyze_security_rates_the_unit_ok(machine: Machine) -> None:
    """The booted machine's own `systemd-analyze security` rates knocker.service <= 2.0."""
    out = machine.run(
        "systemd-analyze", "security", "--no-pager", "knocker.service", check=False
    ).stdout
    match = re.search(r"Overall exposure level for knocker\.service: ([0-9.]+) (\w+)", out)
    assert match, out[-2000:]
    print(f"[systemd host] exposure {match.group(1)} {match.group(2)}", file=sys.stderr)
    assert float(match.group(1)) <= 2.0, out[-3000:]
    assert match.group(2) == "OK"


# --- firewalld as the unprivileged user `knocker` -------------------------------------


def test_firewalld_without_the_polkit_rule_startup_says_to_install_it(machine: Machine) -> None:
    """User `knocker` is not root: firewalld refuses it, and the start fails saying which
    polkit rule to install."""
    assert active(machine, "firewalld") == "active"
    machine.run(
        "install",
        "-D",
        "-m",
        "0644",
        "/root/install/deploy/systemd/knocker-firewalld.conf",
        "/etc/systemd/system/knocker.service.d/firewalld.conf",
    )
    machine.write_config(server_config(firewalld=FIREWALLD))
    machine.run("systemctl", "daemon-reload")
    since = machine.now()
    result = machine.run("systemctl", "restart", "knocker", check=False)
    assert result.returncode != 0
    assert active(machine) in ("failed", "activating")
    log = machine.wait_for(
        "the refusal in journalctl -u knocker",
        lambda: "50-knocker-firewalld.rules" in (j := machine.journal("knocker", since)) and j,
    )
    assert "not authorized" in log
    machine.run("systemctl", "stop", "knocker", check=False)  # no Restart= loop meanwhile


def test_firewalld_with_the_polkit_rule_the_knocker_user_manages_its_zone(machine: Machine) -> None:
    """With the polkit rule, Knocker running as `knocker` creates its zone and a knock for
    a monitored address adds the rich rules, visible to firewall-cmd."""
    machine.run(
        "install",
        "-m",
        "0644",
        "/root/install/deploy/polkit/50-knocker-firewalld.rules",
        POLKIT_RULE,
    )
    machine.run("systemctl", "reset-failed", "knocker", check=False)
    machine.run("systemctl", "start", "knocker")
    user = machine.run("ps", "-o", "user=", "-p", show(machine, "MainPID")).stdout.strip()
    assert user == "knocker"
    zones = machine.run("firewall-cmd", "--get-zones").stdout.split()
    assert ZONE in zones
    assert curl(machine, "GET", "/health")[0] == 200
    status, body = curl(machine, "POST", "/knock", key=KEY, body={"ip_address": REMOTE, "ttl": 600})
    assert status == 200, body
    rules = machine.run("firewall-cmd", f"--zone={ZONE}", "--list-rich-rules").stdout
    assert REMOTE in rules, rules
    assert "2222" in rules, rules


def test_firewalld_rules_are_timed_by_firewalld(machine: Machine) -> None:
    """The rich rules carry the grant's TTL as firewalld's own timeout: they vanish from
    firewalld when the grant ends, long before Knocker's next cleanup (60 s)."""
    short = "203.0.113.10"
    status, body = curl(machine, "POST", "/knock", key=KEY, body={"ip_address": short, "ttl": 2})
    assert status == 200, body

    def rules() -> str:
        return machine.run("firewall-cmd", f"--zone={ZONE}", "--list-rich-rules").stdout

    assert short in rules()
    machine.wait_for("firewalld to drop the 2 s rules", lambda: short not in rules(), seconds=20)
    assert REMOTE in rules()  # the 600 s grant is still there


# --- the desktop session: the client's user unit, as the GNOME extension drives it ----

GO_CLIENT_FIELDS = {
    "ServiceState": ("KNOCKER_SERVICE_STATE", "KNOCKER_VERSION"),
    "WhitelistApplied": ("KNOCKER_WHITELIST_IP", "KNOCKER_TTL_SEC", "KNOCKER_EXPIRES_UNIX"),
    "StatusSnapshot": (
        "KNOCKER_WHITELIST_IP",
        "KNOCKER_EXPIRES_UNIX",
        "KNOCKER_TTL_SEC",
        "KNOCKER_NEXT_AT_UNIX",
        "KNOCKER_CADENCE_SOURCE",
    ),
    "NextKnockUpdated": ("KNOCKER_NEXT_AT_UNIX", "KNOCKER_CADENCE_SOURCE"),
    "Error": ("KNOCKER_ERROR_CODE", "KNOCKER_ERROR_MSG", "KNOCKER_CONTEXT"),
}
WATCH_TTL = 10  # from ~/.config/knocker/env: watch knocks again after 9 s


def user_journal(machine: Machine) -> list[dict[str, Any]]:
    """What the extension reads at start: the last 100 entries, newest first, as JSON."""
    out = machine.run(
        "journalctl",
        "--user",
        "-u",
        "knocker.service",
        "-o",
        "json",
        "-n",
        "100",
        "--reverse",
        "--no-pager",
        user=USER,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def events(entries: list[dict[str, Any]], name: str, **fields: str) -> list[dict[str, Any]]:
    return [
        entry
        for entry in entries
        if entry.get("KNOCKER_EVENT") == name
        and all(entry.get(key) == value for key, value in fields.items())
    ]


def assert_extension_can_read(entry: dict[str, Any], priority: str) -> None:
    """One native entry with the Go client's common and per-event fields, all strings."""
    name = entry["KNOCKER_EVENT"]
    assert entry["_TRANSPORT"] == "journal", entry  # native protocol, not a stdout line
    assert entry["_SYSTEMD_USER_UNIT"] == "knocker.service", entry
    assert entry["SYSLOG_IDENTIFIER"] == "knocker", entry
    assert entry["KNOCKER_SCHEMA_VERSION"] == "1", entry
    assert entry["PRIORITY"] == priority, entry
    assert isinstance(entry["MESSAGE"], str) and entry["MESSAGE"], entry
    for field in GO_CLIENT_FIELDS[name]:
        assert isinstance(entry.get(field), str), (field, entry)
    assert KEY not in json.dumps(entry)


def test_desktop_user_unit_writes_the_journal_entries_the_extension_reads(
    machine: Machine,
) -> None:
    """A lingering user installs the client (a venv linked into ~/.local/bin, as pipx
    does), `knocker service install` writes knocker.service, `systemctl --user start`
    runs it, and journalctl --user -o json shows the extension's events and fields."""
    assert active(machine) == "active"  # the system unit: the server the client knocks
    # Earlier tests granted this loopback address for up to an hour; a knock keeps the
    # longer grant and reports the time actually left, so end them first: the watch's
    # own TTL (from the env file) is what this test reads back.
    assert curl(machine, "DELETE", "/grants/127.0.0.1", key=KEY)[0] in (200, 404)
    machine.run("useradd", "--create-home", USER)
    machine.run("loginctl", "enable-linger", USER)
    uid = machine.run("id", "-u", USER).stdout.strip()
    machine.wait_for(
        f"user@{uid}.service", lambda: active(machine, f"user@{uid}.service") == "active"
    )
    machine.run("cp", "-r", "/root/install", f"/home/{USER}/install")
    machine.run("chown", "-R", f"{USER}:{USER}", f"/home/{USER}/install")
    machine.sh(
        f"""
        cd ~/install
        python3 -m venv ~/.local/share/knocker/venv
        ~/.local/share/knocker/venv/bin/pip install -q --no-index --find-links wheels \\
            knocker-*.whl
        mkdir -p ~/.local/bin ~/.config/knocker
        ln -s ~/.local/share/knocker/venv/bin/knocker ~/.local/bin/knocker
        printf 'api_url: {URL}\\napi_key: "{KEY}"\\n' >~/.knocker.yaml
        chmod 600 ~/.knocker.yaml
        install -m 600 /dev/null ~/.config/knocker/env
        printf 'KNOCKER_TTL={WATCH_TTL}\\n' >>~/.config/knocker/env
        """,
        user=USER,
        env=["PIP_DISABLE_PIP_VERSION_CHECK=1"],
    )
    knocker = f"/home/{USER}/.local/bin/knocker"
    machine.run(knocker, "service", "install", user=USER)
    unit = machine.run("systemctl", "--user", "cat", "knocker.service", user=USER).stdout
    assert f"ExecStart={knocker} watch" in unit, unit

    machine.run("systemctl", "--user", "start", "knocker.service", user=USER)
    is_active = machine.run(
        "systemctl", "--user", "is-active", "knocker.service", user=USER, check=False
    )
    assert is_active.stdout == "active\n"

    wanted = ("ServiceState", "WhitelistApplied", "StatusSnapshot", "NextKnockUpdated")
    entries = machine.wait_for(
        "the first knock's entries",
        lambda: all(events(e := user_journal(machine), name) for name in wanted) and e,
    )
    version = machine.run(
        f"/home/{USER}/.local/share/knocker/venv/bin/python",
        "-c",
        "import knocker; print(knocker.__version__)",
        user=USER,
    ).stdout.strip()
    started = events(entries, "ServiceState", KNOCKER_SERVICE_STATE="started")
    assert started, entries
    assert_extension_can_read(started[0], "6")
    assert started[0]["KNOCKER_VERSION"] == version
    for name in wanted[1:]:
        assert_extension_can_read(events(entries, name)[0], "6")
    applied = events(entries, "WhitelistApplied")[0]
    assert applied["KNOCKER_WHITELIST_IP"] == "127.0.0.1"
    assert applied["KNOCKER_TTL_SEC"] == str(WATCH_TTL)  # the env file reached the unit
    assert int(applied["KNOCKER_EXPIRES_UNIX"]) > time.time()
    snapshot = events(entries, "StatusSnapshot")[0]
    assert int(snapshot["KNOCKER_NEXT_AT_UNIX"]) <= int(snapshot["KNOCKER_EXPIRES_UNIX"])
    assert curl(machine, "GET", "/verify")[0] == 200

    # The extension's "Knock now": only the exit status matters.
    assert machine.run(knocker, "knock", user=USER, check=False).returncode == 0
    status = machine.run(knocker, "service", "status", user=USER, check=False)
    assert status.stdout.strip() == "1"


def test_desktop_user_unit_reports_a_failed_knock_as_an_error_entry(machine: Machine) -> None:
    """With the server stopped, watch's next knock fails: an Error entry with PRIORITY 3;
    the unit stays active and recovers once the server is back."""
    machine.run("systemctl", "stop", "knocker")
    try:
        entries = machine.wait_for(
            "an Error entry",
            lambda: events(e := user_journal(machine), "Error") and e,
            seconds=WATCH_TTL * 3,
        )
        error = events(entries, "Error")[0]
        assert_extension_can_read(error, "3")
        assert error["KNOCKER_ERROR_CODE"] == "knock_failed"
        is_active = machine.run(
            "systemctl", "--user", "is-active", "knocker.service", user=USER, check=False
        )
        assert is_active.stdout == "active\n"
        knock = machine.run(f"/home/{USER}/.local/bin/knocker", "knock", user=USER, check=False)
        assert knock.returncode != 0
    finally:
        machine.run("systemctl", "start", "knocker")
    knock = machine.run(f"/home/{USER}/.local/bin/knocker", "knock", user=USER, check=False)
    assert knock.returncode == 0, knock.stderr
    machine.run("systemctl", "--user", "stop", "knocker.service", user=USER)
    stopping = events(user_journal(machine), "ServiceState", KNOCKER_SERVICE_STATE="stopping")
    assert stopping, "no ServiceState stopping entry"
    assert_extension_can_read(stopping[0], "5")
    is_active = machine.run(
        "systemctl", "--user", "is-active", "knocker.service", user=USER, check=False
    )
    assert is_active.stdout == "inactive\n"
