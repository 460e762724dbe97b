"""Edge: one entry's firewall plan (grant_format.firewall_plan) put in place through the
Firewall seam; shared by both backends.

Owns the mapping of a plan onto firewall targets (the entry for every monitored port, or
one target per port: docs/firewalld.md#port-scoped-keys) and the three ways a store
applies one: a knock's all-or-nothing step, the best-effort settling after a change, and
the targets that entries() hands out for a restore or a re-apply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from ..firewall import Firewall
from .grant_format import Grant, Plan, firewall_plan, port_target

log = logging.getLogger("knocker.store")


def plan_targets(entry: str, plan: Plan) -> dict[str, int]:
    """A plan as firewall targets (firewall.py): the entry, or one target per port."""
    return {
        entry if port == "" else port_target(entry, port): expiry for port, expiry in plan.items()
    }


class PlanFirewall:
    """The firewall, seen one entry's plan at a time."""

    def __init__(self, firewall: Firewall, ports: tuple[str, ...]) -> None:
        self.firewall = firewall
        self.ports = ports  # the monitored ports, spelled "22/tcp"

    def plan(self, unscoped: int | None, grants: Iterable[Grant], now: float) -> Plan:
        """firewall_plan over this firewall's monitored ports."""
        return firewall_plan(unscoped, grants, self.ports, now)

    def open(self, entry: str, plan: Plan, now: float) -> None:
        """Make the firewall hold `plan` for `entry`; FirewallError from a grant."""
        if not plan:
            self.firewall.revoke([entry])
            return
        if "" in plan:
            self.firewall.grant(entry, max(1, math.ceil(plan[""] - now)))
            return
        # Ports on their own: first close the monitored ports the plan leaves out.
        closed = [port_target(entry, port) for port in self.ports if port not in plan]
        if closed:
            self.firewall.revoke(closed)
        for target, expiry in plan_targets(entry, plan).items():
            self.firewall.grant(target, max(1, math.ceil(expiry - now)))

    def open_all_or_nothing(self, entry: str, plan: Plan, before: Plan, now: float) -> None:
        """A knock's firewall step: `plan` in place, or `before` back and raise."""
        try:
            self.open(entry, plan, now)
        except Exception:
            if len(plan) > 1:  # one port's grant may have gone through
                self.settle_to(entry, before, now)
            raise

    def settle_to(self, entry: str, plan: Plan, now: float) -> None:
        """Best effort (a failure is logged): the firewall back to `plan` for `entry`."""
        try:
            self.open(entry, plan, now)
        except Exception as error:  # the caller's outcome stands either way
            log.error("could not put the firewall grant of %s back: %s", entry, error)
