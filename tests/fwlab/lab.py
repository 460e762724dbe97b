"""A real firewalld (1.3.3 or 2.3.x) in network namespaces the lab creates, on a private bus.

Topology (all of it inside two namespaces named knk-fw-<pid>-<n> and knk-cl-<pid>-<n>;
the machine's own network namespace and /etc are never changed):

    knk-cl  vcl 10.231.0.2-15  fd42:4b4e::2-f     the client: probes and knocks, from
      |  veth                                       one address of its own per test
    knk-fw  vfw 10.231.0.1     fd42:4b4e::1       the protected host: dbus-daemon,
                                                   firewalld, listeners, knocker

firewalld runs with --system-config on a copy of its configuration, in its own mount
namespace with a private tmpfs on /run (it writes /run/firewalld/temp.* even with the
nftables backend, and must not reach the machine's real bus). Every process is stopped
by the PID we started; namespaces left by a killed earlier run (their creator PID is
dead) are emptied and deleted at the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from jeepney import DBusAddress, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

HERE = Path(__file__).resolve().parent
PREPARE = HERE / "prepare.sh"
PROBE = HERE / "probe.py"
CACHE = Path(os.environ.get("KNOCKER_FWLAB_CACHE", "/var/cache/knocker-tests"))
V2_ROOT = CACHE / "firewalld-trixie" / "root"
SYSTEM_PYTHON = "/usr/bin/python3"  # firewalld needs Debian's python3-dbus, -gi, -nftables

FW4, CL4, OTHER4 = "10.231.0.1", "10.231.0.2", "10.231.0.3"
FW6, CL6, OTHER6 = "fd42:4b4e::1", "fd42:4b4e::2", "fd42:4b4e::3"
NET4, NET6 = "10.231.0.0/24", "fd42:4b4e::/64"
CLIENT_HOSTS = range(2, 16)  # the client namespace has .2-.15 and ::2-::f


def client4(n: int) -> str:
    """The n-th IPv4 address of the client namespace (2..15)."""
    assert n in CLIENT_HOSTS
    return f"10.231.0.{n}"


def client6(n: int) -> str:
    assert n in CLIENT_HOSTS
    return f"fd42:4b4e::{n:x}"


NETNS_PREFIX = "knk-"
_NETNS_NAME = re.compile(r"^knk-(?:fw|cl)-(\d+)-\d+$")
BUS_NAME = "org.fedoraproject.FirewallD1"
FW_PATH = "/org/fedoraproject/FirewallD1"

VERSIONS = {"1.3": "Debian 12 (bookworm) firewalld", "2.3": "Debian 13 (trixie) firewalld"}


# ----------------------------------------------------------------------- prerequisites


def missing_prerequisites(version: str) -> list[str]:
    """What this machine lacks to run `version` ("1.3" or "2.3"); empty when ready."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, firewalld)")
    for command in ("ip", "dbus-daemon", "unshare", "nft"):
        if shutil.which(command) is None and not Path("/usr/sbin", command).exists():
            missing.append(command)
    if not Path("/usr/sbin/firewalld").exists():
        missing.append("firewalld (apt-get install firewalld)")
    elif subprocess.run(
        [SYSTEM_PYTHON, "-c", "import firewall, dbus, gi, nftables"], capture_output=True
    ).returncode:
        missing.append("firewalld's Python modules (python3-firewall, -dbus, -gi, -nftables)")
    if version == "2.3" and not (V2_ROOT / "usr/sbin/firewalld").exists():
        missing.append(f"firewalld 2.3 from trixie in {V2_ROOT} (run {PREPARE})")
    return missing


def fetch_v2_if_possible() -> None:
    """Fetch trixie's firewalld into the cache (a few seconds) when root and missing."""
    if os.geteuid() == 0 and not (V2_ROOT / "usr/sbin/firewalld").exists():
        subprocess.run(["bash", str(PREPARE), "--no-install"], check=False)


# ----------------------------------------------------------------------- processes


class Daemon:
    """A background process we started; stopped by its PID only (never by name)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as log:
            # every link of the chain (ip netns exec, unshare, sh) execs: our PID is the daemon
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> float:
        """SIGTERM, wait, SIGKILL if needed; returns the seconds it took."""
        started = time.monotonic()
        if self.process is None or self.process.poll() is not None:
            return 0.0
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        return time.monotonic() - started

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def base_env() -> dict[str, str]:
    """A clean environment for system programs: no venv, no PYTHONPATH of ours."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


# ----------------------------------------------------------------------- namespaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _empty_and_delete(netns: str) -> None:
    """Stop what still runs inside one of OUR namespaces (only our own processes can be
    in it), then delete it."""
    pids = [int(p) for p in run("ip", "netns", "pids", netns).split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_pid_alive(pid) for pid in pids):
            time.sleep(0.05)
        pids = [pid for pid in pids if _pid_alive(pid)]
        if not pids:
            break
    subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


def cleanup_stale_namespaces() -> list[str]:
    """Namespaces with our prefix whose creating test process is gone: a killed run."""
    removed = []
    for line in run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NETNS_NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _empty_and_delete(name)
            removed.append(name)
    return removed


class Namespaces:
    _counter = 0

    def __init__(self) -> None:
        Namespaces._counter += 1
        tag = f"{os.getpid()}-{Namespaces._counter}"
        self.fw = f"{NETNS_PREFIX}fw-{tag}"
        self.cl = f"{NETNS_PREFIX}cl-{tag}"
        self.created = False

    def create(self) -> None:
        cleanup_stale_namespaces()
        self.created = True
        run("ip", "netns", "add", self.fw)
        run("ip", "netns", "add", self.cl)
        # Both ends are created directly inside the namespaces: nothing ever appears in
        # the machine's own namespace, so the names cannot clash with anything there.
        run(
            "ip",
            "link",
            "add",
            "vfw",
            "netns",
            self.fw,
            "type",
            "veth",
            "peer",
            "name",
            "vcl",
            "netns",
            self.cl,
        )
        clients = [client4(n) for n in CLIENT_HOSTS] + [client6(n) for n in CLIENT_HOSTS]
        for netns, dev, addresses in ((self.fw, "vfw", (FW4, FW6)), (self.cl, "vcl", clients)):
            for address in addresses:
                prefix = "64" if ":" in address else "24"
                # nodad: without it IPv6 addresses stay "tentative" for 1-2 s
                extra = ["nodad"] if ":" in address else []
                run("ip", "-n", netns, "addr", "add", f"{address}/{prefix}", "dev", dev, *extra)
            run("ip", "-n", netns, "link", "set", "lo", "up")
            run("ip", "-n", netns, "link", "set", dev, "up")

    def exec_prefix(self, netns: str) -> list[str]:
        return ["ip", "netns", "exec", netns]

    def delete(self) -> None:
        if self.created:
            for netns in (self.fw, self.cl):
                _empty_and_delete(netns)
            self.created = False


# ----------------------------------------------------------------------- D-Bus


BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <!-- a private "system" bus for one test lab -->
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow own="*"/>
    <allow send_destination="*"/>
  </policy>
  <!-- firewalld's own policy (FirewallD.conf); no servicedir: nothing is bus-activated,
       so without polkit firewalld falls back to "the caller must be uid 0" -->
  <includedir>/usr/share/dbus-1/system.d</includedir>
</busconfig>
"""


class PrivateBus:
    def __init__(self, workdir: Path, namespaces: Namespaces) -> None:
        self.dir = workdir / "bus"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        config = self.dir / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket))
        self.daemon = Daemon(
            "dbus-daemon",
            [
                *namespaces.exec_prefix(namespaces.fw),
                "dbus-daemon",
                f"--config-file={config}",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
            ],
            workdir / "dbus-daemon.log",
            base_env(),
        )

    def start(self) -> None:
        if self.socket.exists():
            self.socket.unlink()
        self.daemon.start()
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if not self.daemon.running() or time.monotonic() > deadline:
                raise RuntimeError("dbus-daemon did not start:\n" + self.daemon.log())
            time.sleep(0.02)

    def stop(self) -> None:
        self.daemon.stop()


class BusProbe:
    """Independent look at firewalld for assertions (plain jeepney, a connection per call,
    not Knocker's own client)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str | None = None,
        body: tuple[Any, ...] = (),
        bus_name: str = BUS_NAME,
        timeout: float = 30.0,
    ) -> tuple[Any, ...]:
        message = new_method_call(DBusAddress(path, bus_name, interface), member, signature, body)
        with open_dbus_connection(bus=self.address) as conn:
            reply = conn.send_and_get_reply(message, timeout=timeout)
        if reply.header.message_type is MessageType.error:
            raise RuntimeError(f"{member}: {reply.body}")
        return tuple(reply.body)

    def has_owner(self) -> bool:
        with open_dbus_connection(bus=self.address) as conn:
            reply = conn.send_and_get_reply(message_bus.NameHasOwner(BUS_NAME), timeout=5)
        return bool(reply.body[0])

    def prop(self, name: str) -> Any:
        value = self.call(
            FW_PATH,
            "org.freedesktop.DBus.Properties",
            "Get",
            "ss",
            ("org.fedoraproject.FirewallD1", name),
        )[0]
        return value[1]

    def wait_running(self, timeout: float = 30.0) -> float:
        started = time.monotonic()
        while True:
            try:
                if self.has_owner() and self.prop("state") == "RUNNING":
                    return time.monotonic() - started
            except (OSError, RuntimeError, TimeoutError):
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"firewalld not RUNNING after {timeout} s")
            time.sleep(0.05)

    def reload(self) -> None:
        self.call(FW_PATH, "org.fedoraproject.FirewallD1", "reload")

    def query_rich_rule(self, zone: str, rule: str) -> bool:
        zone_if = "org.fedoraproject.FirewallD1.zone"
        return bool(self.call(FW_PATH, zone_if, "queryRichRule", "ss", (zone, rule))[0])

    def rich_rules(self, zone: str) -> list[str]:
        zone_if = "org.fedoraproject.FirewallD1.zone"
        return list(self.call(FW_PATH, zone_if, "getRichRules", "s", (zone,))[0])

    def add_rich_rule(self, zone: str, rule: str, timeout: int = 0) -> None:
        zone_if = "org.fedoraproject.FirewallD1.zone"
        self.call(FW_PATH, zone_if, "addRichRule", "ssi", (zone, rule, timeout))

    def active_zones(self) -> dict[str, Any]:
        zone_if = "org.fedoraproject.FirewallD1.zone"
        return dict(self.call(FW_PATH, zone_if, "getActiveZones")[0])

    def permanent_zone(self, zone: str) -> dict[str, Any] | None:
        config = FW_PATH + "/config"
        if zone not in self.call(config, "org.fedoraproject.FirewallD1.config", "getZoneNames")[0]:
            return None
        path = self.call(
            config, "org.fedoraproject.FirewallD1.config", "getZoneByName", "s", (zone,)
        )[0]
        settings = self.call(path, "org.fedoraproject.FirewallD1.config.zone", "getSettings2")[0]
        return {key: value[1] for key, value in settings.items()}


# ----------------------------------------------------------------------- firewalld


class Firewalld:
    """One firewalld daemon of either version, restartable, on the lab's private bus."""

    def __init__(self, version: str, workdir: Path, namespaces: Namespaces, bus: PrivateBus):
        self.version = version
        self.workdir = workdir
        self.config_dir = workdir / "firewalld-etc"
        self.bus = bus
        self.probe = BusProbe(bus.address)
        self.log_path = workdir / "firewalld.log"
        private_run = 'mount -t tmpfs -o size=16m,mode=0755 knk-run /run && exec "$@"'
        wrapper = [
            *namespaces.exec_prefix(namespaces.fw),
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            private_run,
            "sh",
        ]
        common = [
            "--nofork",
            "--nopid",
            "--system-config",
            str(self.config_dir),
            "--log-target",
            "console",
        ]
        self.env = {**base_env(), "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
        if version == "1.3":
            self.pristine = Path("/etc/firewalld")
            self.argv = [*wrapper, "/usr/sbin/firewalld", *common]
        elif version == "2.3":
            # trixie's pure-Python firewalld run by bookworm's python3 and its libraries
            self.pristine = V2_ROOT / "etc/firewalld"
            self.env["PYTHONPATH"] = str(V2_ROOT / "usr/lib/python3/dist-packages")
            self.argv = [
                *wrapper,
                SYSTEM_PYTHON,
                str(V2_ROOT / "usr/sbin/firewalld"),
                *common,
                "--default-config",
                str(V2_ROOT / "usr/lib/firewalld"),
            ]
        else:
            raise ValueError(version)
        self.daemon: Daemon | None = None

    def fresh_config(self) -> None:
        """Back to the package's configuration: no knocker zone, nothing of earlier runs."""
        shutil.rmtree(self.config_dir, ignore_errors=True)
        shutil.copytree(self.pristine, self.config_dir, symlinks=True)

    def start(self, fresh: bool = False) -> float:
        """Start and wait for RUNNING; returns the seconds that took."""
        if fresh or not self.config_dir.exists():
            self.fresh_config()
        self.daemon = Daemon("firewalld", self.argv, self.log_path, self.env).start()
        try:
            return self.probe.wait_running()
        except TimeoutError as exc:
            raise RuntimeError(f"firewalld did not start:\n{self.daemon.log()[-4000:]}") from exc

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def restart(self, fresh: bool = False) -> None:
        self.stop()
        self.start(fresh)

    def running_version(self) -> str:
        return str(self.probe.prop("version"))


# ----------------------------------------------------------------------- traffic


class Agent:
    """probe.py agent in the client namespace: connection attempts and HTTP requests."""

    def __init__(self, namespaces: Namespaces, log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115 - the agent's stderr, closed in close()
        self.process = subprocess.Popen(
            [*namespaces.exec_prefix(namespaces.cl), SYSTEM_PYTHON, "-u", str(PROBE), "agent"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=base_env(),
            text=True,
            start_new_session=True,
        )
        first = self._read()
        assert first.get("ready"), first

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("probe agent died")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def connect(self, host: str, port: int, timeout: float = 1.0, source: str | None = None) -> str:
        """'connected', 'timeout' (drop), 'unreachable' (reject), 'refused' (no listener)."""
        result: str = self.ask(op="connect", host=host, port=port, timeout=timeout, source=source)[
            "result"
        ]
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask(op="quit")
            except (OSError, RuntimeError, ValueError):
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


class Lab:
    """Namespaces + private bus + listeners + firewalld of one version + client agent."""

    MONITORED = 2222
    UNMONITORED = 2223
    SECOND = 2224  # monitored too: what a key scoped to MONITORED alone must not open
    host_ruleset_before = ""  # the machine's own nft ruleset hash, for a hygiene check

    def __init__(self, version: str, workdir: Path) -> None:
        self.version = version
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ns = Namespaces()
        self.bus = PrivateBus(workdir, self.ns)
        self.firewalld = Firewalld(version, workdir, self.ns, self.bus)
        self.probe = self.firewalld.probe
        self.listener = Daemon(
            "listener",
            [
                *self.ns.exec_prefix(self.ns.fw),
                SYSTEM_PYTHON,
                "-u",
                str(PROBE),
                "serve",
                str(self.MONITORED),
                str(self.UNMONITORED),
                str(self.SECOND),
            ],
            workdir / "listener.log",
            base_env(),
        )
        self.agent: Agent | None = None

    def start(self) -> Lab:
        try:
            self.ns.create()
            self.bus.start()
            self.listener.start()
            deadline = time.monotonic() + 10
            while "LISTENING" not in self.listener.log():
                if not self.listener.running() or time.monotonic() > deadline:
                    raise RuntimeError("listener did not start:\n" + self.listener.log())
                time.sleep(0.02)
            self.firewalld.start(fresh=True)
            self.agent = Agent(self.ns, self.workdir / "agent.log")
        except BaseException:
            self.close()
            raise
        return self

    def connect(
        self, port: int, family: int = 4, timeout: float = 1.0, source: str | None = None
    ) -> str:
        assert self.agent is not None
        host = FW4 if family == 4 else FW6
        if source is None:
            source = CL4 if family == 4 else CL6
        return self.agent.connect(host, port, timeout, source)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        self.firewalld.stop()
        self.listener.stop()
        self.bus.stop()
        self.ns.delete()
