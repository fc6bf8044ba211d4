"""Following a job's policies, apart from its reading loop: the budget warns once and stops at
the cap; a job whose launcher is gone counts as ended only after two empty polls."""

from __future__ import annotations

from hctl.services.budget import Meter
from hctl.services.follow import Poll
from hctl.services.follow_policies import BudgetWatch, Liveness
from hctl.services.progress import JobProgress
from hctl.services.view import Money
from hctl_worker.events import LogEvent, StartEvent


def money(projected: float) -> Money:
    return Money(price_per_hour=1.0, spent=0.1, projected=projected, max_cost=1.0)


def test_the_budget_warns_once_when_the_pace_passes_the_cap_and_stops_at_it() -> None:
    watch = BudgetWatch(max_cost=1.0)
    assert watch.warning(money(0.5)) is None
    note = watch.warning(money(1.5))
    assert note is not None and "$1.50" in note and "$1.00 cap" in note
    assert watch.warning(money(2.0)) is None  # once
    meter = Meter(price_per_hour=3600.0, started_at=0.0)  # $1 a second
    assert not watch.reached(meter, now=0.5) and watch.reached(meter, now=1.0)
    assert BudgetWatch(max_cost=None).warning(money(10**6)) is None
    assert not BudgetWatch(max_cost=None).reached(meter, now=10**6)


def test_a_gone_launcher_is_believed_after_two_empty_polls() -> None:
    progress = JobProgress()
    liveness = Liveness()
    assert not liveness.ended_early(Poll(worker_alive=None), progress)  # not started yet
    progress.apply(StartEvent(job_id="j", model="m", n_trials=3, worker_version="0"))
    assert not liveness.ended_early(Poll(worker_alive=False), progress)
    # The last events landed just before the launcher exited: not an empty poll.
    assert not liveness.ended_early(
        Poll(events=[LogEvent(message="x")], worker_alive=False), progress
    )
    assert not liveness.ended_early(Poll(worker_alive=False), progress)
    assert liveness.ended_early(Poll(worker_alive=False), progress)
    assert not Liveness().ended_early(Poll(worker_alive=True), progress)
