"""The event protocol: the only thing the worker tells the controller.

The worker appends one JSON object per line to `<job dir>/events.jsonl` and flushes after each one.
The controller reads that file by byte offset: it asks for the bytes after the last complete line it
has seen, so a reader that reconnects loses nothing and sees nothing twice.

Every event carries the schema version `v`, a timestamp `ts` (seconds since the epoch), a sequence
number `seq` (0, 1, 2... within one events file, across workers and restarts), the `worker` that
wrote it and a `type`. This module is torch-free on purpose: the controller imports it too.

Several workers may share one job directory (one search on several GPUs): they append to the
same events file, each line under a file lock, taking the sequence number from the file's last
line under that lock. So the file stays one stream of whole lines in the order they were
written, which the controller reads by byte offset as for a single worker. Workers on several
machines (a study in a database) each write the events file of their own job directory.

The files of a job directory are named here as well, so both halves agree on them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from hctl_worker.line_log import append_lines
from hctl_worker.locks import FileLock
from hctl_worker.trials import Score, Trial

SCHEMA_VERSION = 1

# The files of a job directory, `<volume>/hctl/jobs/<job id>/`.
EVENTS_FILE = "events.jsonl"
SETTINGS_FILE = "settings.toml"  # the settings the worker ran with
LOG_FILE = "worker.log"
JOURNAL_FILE = "study.journal"  # the Optuna journal: the search resumes from it
RESULTS_DIR = "results"
WORKERS_DIR = "workers"  # workers/<name>.pid: the process of each worker working on the job
STORAGE_FILE = "storage.url"  # the study's database URL (no password), when it has one


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: int = SCHEMA_VERSION
    ts: float = Field(default_factory=time.time)
    seq: int = 0
    worker: str = ""  # the worker that wrote it ("" from workers before several could share a job)


class StartEvent(_Event):
    """The worker started (or restarted) on a job."""

    type: Literal["start"] = "start"
    job_id: str
    model: str
    n_trials: int
    worker_version: str
    resumed_trials: int = 0
    device: str = ""
    pid: int = 0
    storage: str = (
        ""  # where the study is: "" for the job's journal, else the database (no password)
    )


class StageEvent(_Event):
    """A stage began, progressed or ended: loading, prompts, directions, baseline, search, export."""

    type: Literal["stage"] = "stage"
    stage: str
    state: Literal["start", "progress", "end"] = "start"
    current: int | None = None
    total: int | None = None
    message: str = ""
    seconds: float | None = None


class BaselineEvent(_Event):
    """How the unmodified model scores: refusals on harmful prompts (and on harmless ones), and
    every scorer's value by name."""

    type: Literal["baseline"] = "baseline"
    refusals: int
    total_bad: int
    refusals_good: int | None = None
    total_good: int | None = None
    scores: dict[str, Score] = Field(default_factory=dict)


class TrialEvent(Trial, _Event):
    """One finished trial of the search."""

    type: Literal["trial"] = "trial"
    n_trials: int
    refusal_skipped: bool = False

    @classmethod
    def of(cls, trial: Trial, n_trials: int) -> TrialEvent:
        """The event that reports `trial` (seconds rounded to the millisecond)."""
        return cls(
            **trial.model_dump(exclude={"seconds"}),
            seconds=round(trial.seconds, 3),
            n_trials=n_trials,
            refusal_skipped=trial.refusals is None,
        )


class Measure(BaseModel):
    """One row of a capability check: the original model's value and the edited one's."""

    name: str  # "perplexity", a scorer's name, "lm-eval piqa acc"...
    original: float | None
    edited: float | None
    of: int | None = None  # a count: out of how many
    better: Literal["lower", "higher", ""] = ""

    def display(self, value: float | None) -> str:
        """`3/96` for a count, four significant decimals otherwise, `—` when not measured."""
        return Score(value=value, of=self.of).display()

    def rows(self) -> tuple[str, str, str]:
        """Name, original, edited: one line of a before/after table."""
        arrow = {"lower": " ↓", "higher": " ↑"}.get(self.better, "")
        return self.name + arrow, self.display(self.original), self.display(self.edited)


class EvaluationEvent(_Event):
    """A capability check of one trial against the original model (`hctl-worker evaluate`)."""

    type: Literal["evaluation"] = "evaluation"
    trial: int
    measures: list[Measure]
    notes: list[str] = Field(default_factory=list)  # what was not measured, and why
    seconds: float | None = None


class ParetoEvent(_Event):
    """The Pareto front so far, in the order of its objectives (by default fewest refusals first,
    then lowest KL); trials over a guard's limit are left out."""

    type: Literal["pareto"] = "pareto"
    trials: list[Trial]


class LogEvent(_Event):
    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str


class DoneEvent(_Event):
    """The job finished: where its results are."""

    type: Literal["done"] = "done"
    results_dir: str
    chosen_trial: int | None = None
    model_dir: str | None = None
    uploaded_repo: str | None = None
    seconds: float | None = None


class ErrorEvent(_Event):
    """The job failed; the message and hint are what a person should read."""

    type: Literal["error"] = "error"
    message: str
    hint: str = ""
    kind: str = ""


Event = Annotated[
    StartEvent
    | StageEvent
    | BaselineEvent
    | TrialEvent
    | ParetoEvent
    | LogEvent
    | DoneEvent
    | ErrorEvent
    | EvaluationEvent,
    Field(discriminator="type"),
]

_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


class UnknownEvent(BaseModel):
    """An event this reader does not know (a newer worker); kept so nothing is silently lost."""

    model_config = ConfigDict(extra="allow")
    type: str = "unknown"
    v: int = SCHEMA_VERSION
    seq: int = 0


def encode(event: BaseModel) -> str:
    """One event as one line of JSON, without the newline."""
    return event.model_dump_json()


def decode(line: str | bytes) -> Event | UnknownEvent:
    """Parse one line. Unknown types or newer schema versions come back as `UnknownEvent`."""
    raw = json.loads(line)
    try:
        return _EVENT_ADAPTER.validate_python(raw)
    except ValueError:
        return UnknownEvent.model_validate(raw)


def split_complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """The complete lines in `data` and how many bytes they span.

    A line the worker is still writing has no newline yet; it is left for the next read, so the
    reader's offset only ever advances past whole events.
    """
    end = data.rfind(b"\n")
    if end < 0:
        return [], 0
    lines = [line for line in data[: end + 1].split(b"\n") if line.strip()]
    return lines, end + 1


def read_events(path: Path, offset: int = 0) -> tuple[list[Event | UnknownEvent], int]:
    """Read the complete events after byte `offset`; returns them and the new offset."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    lines, consumed = split_complete_lines(data)
    return [decode(line) for line in lines], offset + consumed


class EventWriter:
    """Appends events to a job's events file, one flushed line each, under the file's lock.

    Sequence numbers continue from the last event in the file (its own or another worker's), so
    a restarted worker's events follow its predecessor's and no two events of a file share one.
    Every event is stamped with the writer's `worker` name.
    """

    def __init__(self, path: Path, worker: str = "") -> None:
        self.path = path
        self.worker = worker
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(path.with_name(path.name + ".lock"))
        self._end = 0  # the file's size after this writer's last line
        self._next_seq = 0

    def emit(self, event: _Event) -> _Event:
        event.worker = self.worker
        with self._lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size != self._end:  # others wrote since: continue from their last sequence number
                written, _ = read_events(self.path, min(self._end, size))
                if written:
                    self._next_seq = max(previous.seq for previous in written) + 1
            event.seq = self._next_seq
            self._end = append_lines(self.path, (encode(event) + "\n").encode("utf-8"))
        self._next_seq += 1
        return event

    def close(self) -> None:
        """Nothing stays open between events; kept so a writer can be used as a context."""

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
