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
    LogEvent,
    ParetoEvent,
    StageEvent,
    StartEvent,
    TrialEvent,
    _Event,
)
from hctl_worker.trials import Trial

SHOWN_TRIALS = 8
SHOWN_MESSAGES = 3


def pareto_table(trials: Sequence[Trial], title: str = "Pareto front") -> Table:
    """Trial number (what `--trial` chooses), refusals and KL, best trade-offs first, and which
    trials were canonical (classic abliteration, run before the search proper)."""
    table = Table(title=title, title_justify="left")
    table.add_column("trial", justify="right")
    table.add_column("refusals", justify="right")
    table.add_column("KL", justify="right")
    table.add_column("origin")
    for trial in trials:
        refusals = trial.refusals or 0
        share = refusals / trial.total_bad if trial.total_bad else 0.0
        table.add_row(
            str(trial.number),
            f"{refusals}/{trial.total_bad} ({share:.0%})",
            f"{trial.kl:.4f}",
            trial.origin or "",
        )
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
            refusals = (
                "skipped" if event.refusals is None else f"{event.refusals}/{event.total_bad}"
            )
            origin = f" [{event.origin}]" if event.origin else ""
            return (
                f"trial {event.number}/{event.n_trials}: refusals {refusals}, "
                f"KL {event.kl:.4f} ({event.seconds:.1f} s){origin}"
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
            table = Table(title="latest trials", title_justify="left")
            for column in ("trial", "refusals", "KL", "seconds"):
                table.add_column(column, justify="right")
            for trial in self.trials[-SHOWN_TRIALS:]:
                refusals = (
                    "skipped" if trial.refusals is None else f"{trial.refusals}/{trial.total_bad}"
                )
                table.add_row(
                    f"{trial.number}/{trial.n_trials}",
                    refusals,
                    f"{trial.kl:.4f}",
                    f"{trial.seconds:.1f}",
                )
            parts.append(table)
        if self.front:
            parts.append(pareto_table(self.front))
        return Group(*parts)
