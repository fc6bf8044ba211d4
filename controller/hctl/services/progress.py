"""A job's progress as the controller understands it, rebuilt from the worker's events alone.

The same state serves the live view, `hctl jobs`, `hctl results`, the ETA, and the budget: feed
it the events in order (each one once) and read it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from hctl_worker.events import (
    BaselineEvent,
    DoneEvent,
    ErrorEvent,
    EvaluationEvent,
    ParetoEvent,
    StageEvent,
    StartEvent,
    TrialEvent,
)
from hctl_worker.trials import DEFAULT_KL_LIMIT, Trial, best_within, pareto_front


@dataclass
class JobProgress:
    """What the events so far say about a job."""

    n_trials: int = 0
    model: str = ""
    stage: str = "starting"
    stage_message: str = ""
    stage_current: int | None = None
    stage_total: int | None = None
    baseline: BaselineEvent | None = None
    trials: dict[int, TrialEvent] = field(default_factory=dict)
    pareto: list[Trial] = field(default_factory=list)
    done: DoneEvent | None = None
    error: ErrorEvent | None = None
    evaluation: EvaluationEvent | None = None  # the latest capability check
    starts: int = 0
    # The workers seen (several may share one search), and those started and not yet ended.
    workers: set[str] = field(default_factory=set)
    expected_workers: int = 1  # how many the job was started with
    running: set[str] = field(default_factory=set)
    resumed_trials: int = 0
    last_seq: int = -1
    events_seen: int = 0

    def apply(self, event: object) -> None:
        """Take one event into account; unknown event types are counted and otherwise ignored."""
        self.events_seen += 1
        self.last_seq = max(self.last_seq, getattr(event, "seq", -1))
        if isinstance(event, StartEvent):
            self.starts += 1
            self.n_trials = event.n_trials
            self.model = event.model
            self.resumed_trials = event.resumed_trials
            if not self.running:  # a new run of the job, not one more worker joining this one
                self.error = None
                self.done = None
            self.workers.add(event.worker)
            self.running.add(event.worker)
        elif isinstance(event, StageEvent):
            self.stage = event.stage
            self.stage_message = event.message
            self.stage_current = event.current
            self.stage_total = event.total
        elif isinstance(event, BaselineEvent):
            self.baseline = event
        elif isinstance(event, TrialEvent):
            self.trials[event.number] = event
            self.n_trials = max(self.n_trials, event.n_trials)
            self.stage = "search"
        elif isinstance(event, ParetoEvent):
            self.pareto = list(event.trials)
        elif isinstance(event, EvaluationEvent):
            self.evaluation = event
        elif isinstance(event, DoneEvent):
            self.done = event
            self.stage = "done"
            self.running.discard(event.worker)
        elif isinstance(event, ErrorEvent):
            self.error = event
            self.stage = "failed"
            self.running.discard(event.worker)

    @property
    def finished(self) -> bool:
        """Every worker that started has ended (done or failed)."""
        return (self.done is not None or self.error is not None) and not self.running

    @property
    def several_workers(self) -> bool:
        return self.expected_workers > 1 or len(self.workers) > 1

    @property
    def trials_done(self) -> int:
        return len(self.trials)

    @property
    def latest(self) -> TrialEvent | None:
        if not self.trials:
            return None
        return self.trials[max(self.trials)]

    def best(self, kl_limit: float = DEFAULT_KL_LIMIT) -> TrialEvent | None:
        """Fewest refusals with KL under the limit, then the lowest KL."""
        return best_within(self.trials.values(), kl_limit)

    def front(self) -> list[Trial]:
        """The Pareto front of the trials seen (one front, whichever workers ran them); a
        worker's latest pareto event where no trial event was seen."""
        return pareto_front(self.trials.values()) or list(self.pareto)

    def seconds_per_trial(self) -> float | None:
        durations = [trial.seconds for trial in self.trials.values() if trial.seconds > 0]
        return statistics.median(durations) if durations else None

    def remaining_seconds(self, *, fallback_per_trial: float, export_seconds: float = 0) -> float:
        """Seconds left: the remaining trials at the median pace so far, plus the export."""
        if self.finished:
            return 0.0
        per_trial = self.seconds_per_trial() or fallback_per_trial
        remaining = max(0, self.n_trials - self.trials_done)
        return remaining * per_trial + export_seconds
