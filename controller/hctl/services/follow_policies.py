"""What following a job decides after each poll, apart from the reading loop itself.

`runs.follow_job` reads the job's new events and hands each poll to these policies:

- `mirror`: the events and journal lines go home first, byte-exact, before anything is shown
  (the local copies' sizes are the offsets to continue from);
- `BudgetWatch`: warn once when the pace projects past the cap; stop once the money spent
  reaches it (only right after a trial was reported, so no trial is cut short for it);
- `Liveness`: a job whose workers have all ended (their launcher is gone) without the events
  saying so has ended early; it is believed after two empty polls in a row, since the last
  events may land just before the launcher exits.
"""

from __future__ import annotations

from dataclasses import dataclass

from hctl.services.budget import Meter
from hctl.services.estimate import format_money
from hctl.services.follow import Poll
from hctl.services.jobs import JobRecord, JobStore
from hctl.services.progress import JobProgress
from hctl.services.view import Money

DEAD_POLLS = 2  # empty polls with no live launcher before the job counts as ended early


def mirror(store: JobStore, record: JobRecord, poll: Poll) -> None:
    """Append what the poll brought to the job's copies at home (journal first)."""
    store.append_journal(record.job_id, poll.journal_raw)
    store.append_events(record.job_id, poll.raw)


@dataclass
class BudgetWatch:
    """The job's cap on money (None: no cap)."""

    max_cost: float | None
    warned: bool = False

    def warning(self, money: Money) -> str | None:
        """A note the first time the pace projects past the cap; None otherwise."""
        if self.warned or self.max_cost is None or money.projected <= self.max_cost:
            return None
        self.warned = True
        return (
            f"at this pace the job would cost {format_money(money.projected)}, above the "
            f"{format_money(self.max_cost)} cap: it will stop after the trial that reaches the cap"
        )

    def reached(self, meter: Meter, now: float) -> bool:
        return meter.cap_reached(now, self.max_cost)


@dataclass
class Liveness:
    """Whether the job's workers ended without saying so."""

    dead_polls: int = 0

    def launcher_gone(self, poll: Poll, progress: JobProgress) -> bool:
        """No live launcher (or no job directory at all: a pod whose volume is gone) after the
        workers had started, and nothing new to read."""
        ended = poll.worker_alive is False or (poll.worker_alive is None and progress.starts > 0)
        return ended and not poll.events

    def ended_early(self, poll: Poll, progress: JobProgress) -> bool:
        """Count this poll; True once the launcher has been gone for `DEAD_POLLS` polls."""
        if not self.launcher_gone(poll, progress):
            self.dead_polls = 0
            return False
        self.dead_polls += 1
        return self.dead_polls >= DEAD_POLLS
