"""How a job looks on the terminal: the estimate table, the live view, the Pareto table.

The live view prints one permanent line per meaningful event (so a log or a pipe gets the
whole story) and, on a terminal, keeps a panel at the bottom with the stage, trial k/N, the best
trial, the Pareto front so far, the ETA and the money spent and projected.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from hctl.output import Cell, Column
from hctl.services.estimate import Estimate, format_duration, format_money
from hctl.services.progress import JobProgress
from hctl_worker.events import (
    BaselineEvent,
    DoneEvent,
    ErrorEvent,
    EvaluationEvent,
    LogEvent,
    StageEvent,
    StartEvent,
    TrialEvent,
)
from hctl_worker.trials import Trial, describe_scores, score_names

FRONT_ROWS_SHOWN = 6


@dataclass
class Money:
    """The money line of the live view."""

    price_per_hour: float
    spent: float
    projected: float
    max_cost: float | None = None
    eta_seconds: float | None = None


ESTIMATE_COLUMNS = [
    Column("GPU"),
    Column("memory", justify="right"),
    Column("$/hour", justify="right"),
    Column("s/trial", justify="right"),
    Column("duration", justify="right"),
    Column("total", justify="right", style="bold"),
    Column("note"),
]


def estimate_rows(estimates: list[Estimate]) -> list[list[Cell]]:
    """One row per GPU: its hourly price AND the total for this job (`ESTIMATE_COLUMNS`)."""
    return [
        [
            estimate.gpu_name + (" (spot)" if estimate.spot else ""),
            f"{estimate.memory_gb} GB" if estimate.memory_gb else "—",
            format_money(estimate.price_per_hour),
            f"{estimate.seconds_per_trial:.1f}",
            format_duration(estimate.total_seconds),
            format_money(estimate.total_cost),
            "" if estimate.fits else Text(f"does not fit: {estimate.fit_problem}", style="red"),
        ]
        for estimate in estimates
    ]


def estimate_data(estimate: Estimate) -> dict:
    """An estimate for `--json`, with its totals."""
    return {
        **estimate.model_dump(),
        "total_seconds": estimate.total_seconds,
        "total_cost": estimate.total_cost,
    }


def phases_line(estimate: Estimate) -> str:
    return ", ".join(
        f"{phase.name} {format_duration(phase.seconds)}"
        for phase in estimate.phases
        if phase.seconds >= 0.5
    )


def pareto_columns(front: list[Trial]) -> list[Column]:
    """The trial, one column per named score (an objective's says which way is better), the
    parameters and the chosen mark."""
    columns = [Column("trial", justify="right")]
    for name in score_names(front):
        direction = next(t.scores[name].direction for t in front if name in t.scores)
        arrow = {"minimize": " ↓", "maximize": " ↑"}.get(direction, "")
        columns.append(Column(name + arrow, justify="right"))
    return [*columns, Column("parameters"), Column("")]


def pareto_rows(front: list[Trial], *, chosen: int | None = None) -> list[list[Cell]]:
    """The Pareto front, one row per trial (`pareto_columns`); the chosen one is marked."""
    names = score_names(front)
    rows: list[list[Cell]] = []
    for trial in front:
        params = " ".join(
            ([trial.origin] if trial.origin else [])
            + [
                f"{name.rsplit('.', 1)[-1]}={value:.2f}" if isinstance(value, float) else f"{value}"
                for name, value in list(trial.params.items())[:3]
            ]
        )
        rows.append(
            [
                str(trial.number),
                *(trial.scores[name].display() if name in trial.scores else "" for name in names),
                params,
                Text("← chosen", style="bold green") if trial.number == chosen else "",
            ]
        )
    return rows


def evaluation_columns(event: EvaluationEvent) -> list[Column]:
    """A capability check: each measure for the original model and for the trial."""
    return [
        Column("measure"),
        Column("original", justify="right"),
        Column(f"trial {event.trial}", justify="right"),
    ]


def evaluation_rows(event: EvaluationEvent) -> list[list[Cell]]:
    return [list(measure.rows()) for measure in event.measures]


def event_line(event: object, progress: JobProgress, money: Money | None = None) -> str | None:
    """The permanent line an event earns in the view, or None for events shown only live."""
    line = _event_line(event, progress, money)
    worker = getattr(event, "worker", "")
    if isinstance(event, TrialEvent) and event.run_by:
        worker = event.run_by  # who ran it (another worker may report a dead one's trial)
    if line is not None and worker and progress.several_workers:
        return f"[worker {worker}] {line}"
    return line


def _event_line(event: object, progress: JobProgress, money: Money | None) -> str | None:
    if isinstance(event, StartEvent):
        resumed = f", {event.resumed_trials} already done" if event.resumed_trials else ""
        device = f" on {event.device}" if event.device else ""
        return f"worker {event.worker_version} started{device}: {event.model}, {event.n_trials} trials{resumed}"
    if isinstance(event, StageEvent):
        if event.state == "start":
            return f"stage {event.stage}" + (f": {event.message}" if event.message else "")
        if event.state == "end":
            took = f" in {event.seconds:.1f}s" if event.seconds is not None else ""
            return f"stage {event.stage} done{took}"
        return None
    if isinstance(event, BaselineEvent):
        good = (
            f", {event.refusals_good}/{event.total_good} on harmless ones"
            if event.refusals_good is not None
            else ""
        )
        return f"baseline: {event.refusals}/{event.total_bad} refusals on harmful prompts{good}"
    if isinstance(event, TrialEvent):
        if event.refusals is None:
            note = " (refusals skipped: KL too high)"
        elif event.pruned:
            note = f" (pruned at {event.refusals}/{event.total_bad} refusals: behind the front)"
        else:
            note = ""
        best = progress.best()
        best_text = (
            f" | best #{best.number} ({best.refusals}/{best.total_bad}, KL {best.kl:.4f})"
            if best
            else ""
        )
        money_text = ""
        if money is not None:
            money_text = f" | ETA {format_duration(money.eta_seconds or 0)} | spent {format_money(money.spent)}"
        origin = f" ({event.origin})" if event.origin else ""
        return (
            f"trial {event.number}/{event.n_trials}: {describe_scores(event)}{note}, "
            f"{event.seconds:.1f}s{origin}{best_text}{money_text}"
        )
    if isinstance(event, LogEvent):
        if event.level in {"warning", "error"}:
            return f"{event.level}: {event.message}"
        return None
    if isinstance(event, DoneEvent):
        took = f" in {format_duration(event.seconds)}" if event.seconds else ""
        return f"done{took}: results in {event.results_dir}"
    if isinstance(event, ErrorEvent):
        hint = f" (hint: {event.hint})" if event.hint else ""
        return f"worker error: {event.message}{hint}"
    return None


def live_panel(progress: JobProgress, money: Money | None, *, job_id: str, machine: str) -> Panel:
    """The bottom panel of the live view."""
    rows: list[RenderableType] = []
    stage = progress.stage + (f" — {progress.stage_message}" if progress.stage_message else "")
    rows.append(Text(f"job {job_id} on {machine} · stage: {stage}"))
    total = max(progress.n_trials, 1)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        Text(f"trial {progress.trials_done}/{progress.n_trials}"),
        ProgressBar(total=total, completed=progress.trials_done, width=40),
    )
    rows.append(bar)
    latest, best = progress.latest, progress.best()
    if latest is not None:
        rows.append(
            Text(
                f"latest #{latest.number}: {latest.refusals if latest.refusals is not None else '—'}"
                f"/{latest.total_bad} refusals, KL {latest.kl:.4f}"
            )
        )
    if best is not None:
        rows.append(
            Text(
                f"best   #{best.number}: {best.refusals}/{best.total_bad} refusals, KL {best.kl:.4f}"
            )
        )
    front = progress.front()
    if front:
        rows.append(
            Text(
                "front: "
                + "  ".join(
                    f"#{trial.number} ({trial.refusals}, {trial.kl:.3f})"
                    for trial in front[:FRONT_ROWS_SHOWN]
                )
            )
        )
    if money is not None:
        cap = f" of {format_money(money.max_cost)} cap" if money.max_cost is not None else ""
        rows.append(
            Text(
                f"ETA {format_duration(money.eta_seconds or 0)} · spent {format_money(money.spent)}"
                f"{cap} · projected {format_money(money.projected)} at "
                f"{format_money(money.price_per_hour)}/h"
            )
        )
    rows.append(Text("Ctrl-C detaches; the job keeps running.", style="dim"))
    return Panel(Group(*rows), title="hctl", title_align="left")


class LiveView:
    """Lines for every event; a live panel too when the console is a terminal."""

    def __init__(self, console: Console, *, job_id: str, machine: str) -> None:
        self.console = console
        self.job_id = job_id
        self.machine = machine
        self._live: Live | None = None
        self.lines: list[str] = []

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pause()

    def pause(self) -> None:
        """Take the live panel down (before asking a question); lines still print."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def note(self, message: str) -> None:
        self.lines.append(message)
        self.console.print(message, soft_wrap=True, markup=False)

    def event(self, event: object, progress: JobProgress, money: Money | None) -> None:
        """Print the line of one event, already applied to `progress`."""
        line = event_line(event, progress, money)
        if line is not None:
            self.note(line)

    def refresh(self, progress: JobProgress, money: Money | None) -> None:
        if self._live is not None:
            self._live.update(live_panel(progress, money, job_id=self.job_id, machine=self.machine))
