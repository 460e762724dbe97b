"""A real `knocker serve` inside the lab's protected namespace, reached from the client one.

NetnsKnocker is the lead's KnockerProcess (tests/serverproc.py) with two changes: the
process runs under `ip netns exec <protected>` with the lab's private bus in
DBUS_SYSTEM_BUS_ADDRESS, and every HTTP request goes through the client namespace's
agent, over the veth, from a chosen client address - so Knocker sees the real client
address and firewalld's zone sees the real traffic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.serverproc import KnockerProcess, base_config

from .lab import CL4, FW4, FW6, NET4, NET6, Lab

KNOCKER_PORT = 8400  # inside the protected namespace: nothing else listens there


def firewalld_section(version: str, **overrides: Any) -> dict[str, Any]:
    """The lab's firewalld settings: ports 2222 and 2224 monitored, the client ranges as
    sources. zone_target ACCEPT: the clients must still reach Knocker itself and other
    ports."""
    section: dict[str, Any] = {
        "enabled": True,
        "zone_name": "knocker",
        "zone_priority": -100 if version.startswith("2.") else None,
        "zone_target": "ACCEPT",
        "default_action": "drop",
        "monitored_ports": [
            {"port": Lab.MONITORED, "protocol": "tcp"},
            {"port": Lab.SECOND, "protocol": "tcp"},
        ],
        "monitored_ips": [NET4, NET6],
    }
    section.update(overrides)
    return section


OPS_KEY = "ops-key-fwlab-0123456789abcdefghijklmnopqrstuv"
PORT_KEY = "port-key-fwlab-0123456789abcdefghijklmnopqrstu"  # scoped to Lab.MONITORED


class NetnsKnocker(KnockerProcess):
    def __init__(
        self,
        lab: Lab,
        directory: Path,
        firewalld: dict[str, Any],
        *,
        workers: int = 2,
        threads: int = 4,
        port: int = KNOCKER_PORT,
    ) -> None:
        config = base_config(
            directory,
            firewalld=firewalld,
            whitelist={
                "storage_path": str(directory / "whitelist.json"),
                "cleanup_interval_seconds": 1,
            },
            logging={"level": "INFO"},
        )
        # An admin key for the grants API (DELETE /grants/{entry}).
        config["api_keys"].append({"name": "ops", "key": OPS_KEY, "max_ttl": 600, "admin": True})
        if any(p["port"] == Lab.MONITORED for p in firewalld.get("monitored_ports", [])):
            config["api_keys"].append(
                {
                    "name": "port-only",
                    "key": PORT_KEY,
                    "max_ttl": 600,
                    "ports": [f"{Lab.MONITORED}/tcp"],
                }
            )
        super().__init__(
            directory,
            config,
            workers=workers,
            threads=threads,
            host="::",  # dual-stack: IPv4 clients arrive as ::ffff:a.b.c.d
            port=port,
            prefix=lab.ns.exec_prefix(lab.ns.fw),
            env={"DBUS_SYSTEM_BUS_ADDRESS": lab.bus.address},
        )
        self.lab = lab

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        source: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request from `source` (a client-namespace address, default CL4) to Knocker
        at the protected host's address of the same family."""
        assert self.lab.agent is not None
        source = source or CL4
        answer = self.lab.agent.ask(
            op="http",
            method=method,
            host=FW6 if ":" in source else FW4,
            port=self.port,
            path=path,
            headers=headers or {},
            body=body.decode() if body is not None else None,
            timeout=timeout,
            source=source,
        )
        if "error" in answer:
            raise OSError(answer["error"])
        return answer["status"], answer["headers"], answer["body"].encode()
