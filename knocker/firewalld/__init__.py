"""firewalld over D-Bus with jeepney: Knocker's zone, timed accept rules, staying correct.

Owns nothing itself: FirewalldFirewall (backend.py) is the package's face and the only
name the rest of Knocker imports. Pure, bus-free modules: rules.py (rule text, zone
settings), messages.py (D-Bus messages), failures.py (what an error means),
schedule.py (the watcher's timetable). Edges: bus.py (the only code on the bus),
calls.py (call sequences), coordination.py (lock and status files), docker.py,
watcher.py, backend.py. The traps worked around are numbered as in docs/firewalld.md.
"""

from __future__ import annotations

from .backend import FirewalldFirewall

__all__ = ["FirewalldFirewall"]
