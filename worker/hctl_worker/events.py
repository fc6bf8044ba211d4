"""The event protocol: the only thing the worker tells the controller.

The worker appends one JSON object per line to `<job dir>/events.jsonl` and flushes after each one.
The controller reads that file by byte offset: it asks for the bytes after the last complete line it
has seen, so a reader that reconnects loses nothing and sees nothing twice.

Every event carries the schema version `v`, a timestamp `ts` (seconds since the epoch), a sequence
number `seq` (0, 1, 2... within one job, across worker restarts) and a `type`. This module is
torch-free on purpose: the controller imports it too.

The files of a job directory are named here as well, so both halves agree on them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from hctl_worker.trials import Trial

SCHEMA_VERSION = 1

# The files of a job directory, `<volume>/hctl/jobs/<job id>/`.
EVENTS_FILE = "events.jsonl"
SETTINGS_FILE = "settings.toml"  # the settings the worker ran with
LOG_FILE = "worker.log"
JOURNAL_FILE = "study.journal"  # the Optuna journal: the search resumes from it
RESULTS_DIR = "results"
PID_FILE = "worker.pid"


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: int = SCHEMA_VERSION
    ts: float = Field(default_factory=time.time)
    seq: int = 0


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
    """How the unmodified model scores: refusals on harmful prompts (and on harmless ones)."""

    type: Literal["baseline"] = "baseline"
    refusals: int
    total_bad: int
    refusals_good: int | None = None
    total_good: int | None = None


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


class ParetoEvent(_Event):
    """The Pareto front so far, best trade-offs first (fewest refusals, then lowest KL)."""

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
    | ErrorEvent,
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
    """Appends events to a job's events file, one flushed line each.

    Sequence numbers continue from the events already in the file, so a restarted worker's
    events follow its predecessor's. One writer at a time: the writer holds an exclusive lock on
    the file (where the system has `flock`; the system releases it when the process ends, however
    it ends), taken before the sequence is read, so a second worker on the same job directory is
    refused before it writes anything and no two events share a sequence number.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", encoding="utf-8")
        try:
            _lock_exclusively(self._handle, path)
        except BaseException:
            self._handle.close()
            raise
        existing, _ = read_events(path)
        self._next_seq = (max((event.seq for event in existing), default=-1) + 1) if existing else 0

    def emit(self, event: _Event) -> _Event:
        event.seq = self._next_seq
        self._next_seq += 1
        line = encode(event)
        self._handle.write(line + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return event

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _lock_exclusively(handle: TextIO, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: the worker's pid file is the only guard there
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        from hctl_worker.errors import JobDirectoryError

        pid_path = path.with_name(PID_FILE)
        owner = pid_path.read_text().strip() if pid_path.is_file() else "unknown"
        raise JobDirectoryError(
            f"another worker (process {owner}) is running the job in {path.parent}",
            "Wait for it to finish, or stop it, before starting another worker on this job "
            "directory; a different search needs a different job directory.",
        ) from None
