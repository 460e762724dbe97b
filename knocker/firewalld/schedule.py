"""Pure: when the watcher puts grants back, looks again, and says it is alive.

Owns: the watcher's timetable as a value driven by `now` (monotonic seconds): the reasons
waiting for a reconcile (a reload, a restart, a failed check), the retry after a failed
reconcile, the second look RECHECK_DELAY after a reconcile, the periodic look for lost
signals, and the heartbeat that keeps the shared status fresh. The watcher does the jobs;
this module only decides which one is due.
"""

from __future__ import annotations

from dataclasses import dataclass

HEARTBEAT = 2.0  # the watcher touches the status file this often; also the retry delay
RECHECK_DELAY = 2.0  # second look after a reload, for grants whose whitelist write was in flight
PERIODIC_CHECK = 30.0  # the watcher also looks for missing rules this often (a lost signal)

# The jobs next_job() hands out.
RECONCILE = "reconcile"  # put the zone and every grant back (its reason comes along)
RECHECK = "recheck"  # re-apply grants still missing after a reconcile
CHECK = "check"  # cheap periodic look: grants missing or the zone changed?


@dataclass(frozen=True)
class Job:
    kind: str
    reason: str = ""


class ReapplySchedule:
    """One watcher's timetable. `present`: firewalld owns its bus name right now."""

    def __init__(self, present: bool, now: float) -> None:
        self.present = present
        self.pending: set[str] = {"watcher started"} if present else set()
        self.retry_at = 0.0
        self.recheck_at = 0.0  # 0: no second look planned
        self.check_at = now + PERIODIC_CHECK
        self.last_beat = now

    def next_job(self, now: float) -> Job | None:
        """The job due at `now`, at most one, in order of urgency."""
        if self.pending and self.present and now >= self.retry_at:
            reason = ", ".join(sorted(self.pending))
            self.pending.clear()
            return Job(RECONCILE, reason)
        if self.recheck_at and now >= self.recheck_at:
            self.recheck_at = 0.0
            return Job(RECHECK)
        if self.present and not self.pending and now >= self.check_at:
            self.check_at = now + PERIODIC_CHECK
            return Job(CHECK)
        return None

    def reconciled(self, now: float) -> None:
        """The reconcile worked: look once more soon (a knock may have been in flight)."""
        self.recheck_at = now + RECHECK_DELAY
        self.last_beat = now

    def reconcile_failed(self, reason: str, now: float) -> None:
        """Try the same reconcile again after HEARTBEAT."""
        self.pending.add(reason)
        self.retry_at = now + HEARTBEAT
        self.last_beat = now

    def needs_reconcile(self, reason: str) -> None:
        self.pending.add(reason)

    def beat_due(self, now: float) -> bool:
        return now - self.last_beat >= HEARTBEAT

    def beat(self, now: float) -> None:
        self.last_beat = now

    def reloaded(self) -> None:
        self.pending.add("reloaded")

    def appeared(self) -> None:
        """firewalld took its bus name: a restart, so everything must be put back."""
        self.present = True
        self.pending.add("restarted")

    def vanished(self) -> None:
        """firewalld left the bus: nothing to do until it is back."""
        self.present = False
        self.pending.clear()
