"""The worker's own progress view (when it is not asked for `--events`): stages, trials, the front.

It is an event listener like any other: it only reads the events the job emits, so what a person
sees here is what the controller sees in `events.jsonl`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hctl_worker.events import (
    BaselineEvent,
    DoneEvent,
    ErrorEvent,
    EvaluationEvent,
    LogEvent,
    ParetoEvent,
    StageEvent,
    StartEvent,
    TrialEvent,
    _Event,
)
from hctl_worker.trials import Trial, describe_scores, score_names

SHOWN_TRIALS = 8
SHOWN_MESSAGES = 3


def pareto_table(trials: Sequence[Trial], title: str = "Pareto front") -> Table:
    """Trial number (what `--trial` chooses) and every score, best trade-offs first; an
    objective's column says which way is better; which trials were canonical (classic
    abliteration, run before the search proper)."""
    names = score_names(trials)
    table = Table(title=title, title_justify="left")
    table.add_column("trial", justify="right")
    for name in names:
        table.add_column(_header(name, trials), justify="right")
    table.add_column("origin")
    for trial in trials:
        table.add_row(
            str(trial.number),
            *(trial.scores[name].display() if name in trial.scores else "" for name in names),
            trial.origin or "",
        )
    return table


def _header(name: str, trials: Sequence[Trial]) -> str:
    direction = next((t.scores[name].direction for t in trials if name in t.scores), "report")
    return name + {"minimize": " ↓", "maximize": " ↑"}.get(direction, "")


def evaluation_table(event: EvaluationEvent) -> Table:
    """The capability check: each measure for the original model and for the trial."""
    table = Table(title=f"Trial {event.trial} against the original model", title_justify="left")
    table.add_column("measure")
    table.add_column("original", justify="right")
    table.add_column(f"trial {event.trial}", justify="right")
    for measure in event.measures:
        table.add_row(*measure.rows())
    return table


class ProgressView:
    """A live rich view; on a non-terminal it prints one line per stage and trial instead."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(soft_wrap=True)
        self.status = ""
        self.baseline = ""
        self.trials: list[TrialEvent] = []
        self.front: list[Trial] = []
        self.messages: list[str] = []
        self.live: Live | None = None

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(None, None, None)
            self.live = None

    def __call__(self, event: _Event) -> None:
        line = self._apply(event)
        if self.live is not None:
            self.live.update(self._render())
        elif line:
            self.console.print(line, highlight=False)

    def _apply(self, event: _Event) -> str:
        if isinstance(event, StartEvent):
            resumed = (
                f", continuing after {event.resumed_trials} trials" if event.resumed_trials else ""
            )
            self.status = f"{event.model} on {event.device}{resumed}"
            return f"job {event.job_id}: {self.status}"
        if isinstance(event, StageEvent):
            if event.state == "start":
                self.status = f"{event.stage}…"
                return f"{event.stage}: started {event.message}".rstrip()
            if event.state == "end":
                self.status = f"{event.stage} done ({event.seconds:.1f} s) {event.message}"
                return f"{event.stage}: done in {event.seconds:.1f} s {event.message}".rstrip()
            if event.total:
                self.status = f"{event.stage} {event.current}/{event.total}"
            return ""
        if isinstance(event, BaselineEvent):
            self.baseline = f"original model: {event.refusals}/{event.total_bad} refusals"
            if event.total_good:
                self.baseline += f" (harmless: {event.refusals_good}/{event.total_good})"
            return self.baseline
        if isinstance(event, TrialEvent):
            self.trials.append(event)
            origin = f" [{event.origin}]" if event.origin else ""
            return (
                f"trial {event.number}/{event.n_trials}: {describe_scores(event)} "
                f"({event.seconds:.1f} s){origin}"
            )
        if isinstance(event, ParetoEvent):
            self.front = list(event.trials)
            return ""
        if isinstance(event, LogEvent):
            line = f"{event.level}: {event.message}" if event.level != "info" else event.message
            self.messages = [*self.messages, line][-SHOWN_MESSAGES:]
            return line
        if isinstance(event, DoneEvent):
            self.status = f"done: results in {event.results_dir}"
            where = f", model in {event.model_dir}" if event.model_dir else ""
            return f"done: results in {event.results_dir}{where}"
        if isinstance(event, ErrorEvent):
            self.status = f"failed: {event.message}"
            return ""  # the command line prints the error and its hint itself
        return ""

    def _render(self) -> Group:
        parts: list = [Text(self.status, style="bold")]
        parts += [Text(message, style="dim") for message in self.messages]
        if self.baseline:
            parts.append(Text(self.baseline))
        if self.trials:
            latest = self.trials[-SHOWN_TRIALS:]
            names = score_names(latest)
            table = Table(title="latest trials", title_justify="left")
            for column in ("trial", *names, "seconds"):
                table.add_column(column, justify="right")
            for trial in latest:
                table.add_row(
                    f"{trial.number}/{trial.n_trials}",
                    *(trial.scores[n].display() if n in trial.scores else "" for n in names),
                    f"{trial.seconds:.1f}",
                )
            parts.append(table)
        if self.front:
            parts.append(pareto_table(self.front))
        return Group(*parts)
