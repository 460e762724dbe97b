"""The firewalld test lab: a real firewalld (Debian 12's 1.3.3 or Debian 13's 2.3.x) in
network namespaces of its own, on a private system bus, with real TCP traffic.

Prerequisites: root, `tests/fwlab/prepare.sh` (apt packages + trixie's firewalld in the
cache). See lab.py for the topology and hygiene rules.
"""

from __future__ import annotations

from .lab import (
    CL4,
    CL6,
    FW4,
    FW6,
    NET4,
    NET6,
    OTHER4,
    OTHER6,
    VERSIONS,
    BusProbe,
    Lab,
    cleanup_stale_namespaces,
    fetch_v2_if_possible,
    missing_prerequisites,
)

__all__ = [
    "CL4",
    "CL6",
    "FW4",
    "FW6",
    "NET4",
    "NET6",
    "OTHER4",
    "OTHER6",
    "VERSIONS",
    "BusProbe",
    "Lab",
    "cleanup_stale_namespaces",
    "fetch_v2_if_possible",
    "missing_prerequisites",
]
