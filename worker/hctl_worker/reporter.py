"""What a job tells: events to its events file and listeners, lines to its log, and every failure
reported exactly once, as an `error` event a person can act on.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hctl_worker.errors import OutOfMemoryError, WorkerError, disk_error
from hctl_worker.events import ErrorEvent, EventWriter, LogEvent, StageEvent, _Event
from hctl_worker.job_directory import JobPaths

Listener = Callable[[_Event], None]
Result = TypeVar("Result")


class Reporter:
    """Sends events to the job's events file first, then to the listeners (stdout, progress view)."""

    def __init__(
        self, paths: JobPaths, listeners: Sequence[Listener] = (), worker: str = ""
    ) -> None:
        self.paths = paths
        self.worker = worker
        self.writer = EventWriter(paths.events, worker)
        self.listeners = list(listeners)

    def emit(self, event: _Event) -> _Event:
        self.writer.emit(event)
        for listener in self.listeners:
            listener(event)
        return event

    def log(self, message: str, level: str = "info") -> None:
        self.write_log(message)
        self.emit(LogEvent(level=level, message=message))

    def write_log(self, text: str) -> None:
        # Workers sharing a job directory share its log: each line says whose it is.
        who = f"[worker {self.worker}] " if self.worker else ""
        with self.paths.log.open("a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {who}{text.rstrip()}\n")

    @contextlib.contextmanager
    def stage(self, name: str, message: str = "") -> Iterator[Stage]:
        started = time.monotonic()
        self.emit(StageEvent(stage=name, state="start", message=message))
        stage = Stage(self, name)
        yield stage
        self.emit(
            StageEvent(
                stage=name,
                state="end",
                message=stage.result,
                seconds=round(time.monotonic() - started, 3),
            )
        )

    def close(self) -> None:
        self.writer.close()


@dataclass
class Stage:
    reporter: Reporter
    name: str
    result: str = ""

    def progress(self, current: int, total: int | None = None, message: str = "") -> None:
        self.reporter.emit(
            StageEvent(
                stage=self.name, state="progress", current=current, total=total, message=message
            )
        )


def guarded(reporter: Reporter, body: Callable[[], Result]) -> Result:
    """Run `body`, turning out-of-memory into OutOfMemoryError and reporting every failure once."""
    try:
        return body()
    except WorkerError as error:
        report_error(reporter, error)
        raise
    except KeyboardInterrupt:
        reporter.emit(
            ErrorEvent(
                message="the worker was stopped",
                hint="Run the same command again to continue the search where it stopped.",
                kind="Interrupted",
            )
        )
        raise
    except OSError as error:
        refused = disk_error(error, reporter.paths.root)
        if refused is None:
            raise _internal(reporter, error) from error
        with contextlib.suppress(OSError):  # the event may not fit on the full disk either
            report_error(reporter, refused)
        raise refused from None
    except Exception as error:
        if _is_out_of_memory(error):
            translated = OutOfMemoryError(f"out of memory: {str(error).splitlines()[0]}")
            report_error(reporter, translated)
            raise translated from None
        raise _internal(reporter, error) from error


def _internal(reporter: Reporter, error: Exception) -> WorkerError:
    """An error no one expected, reported as a bug with its traceback in the log."""
    reporter.write_log("".join(traceback.format_exception(error)))
    internal = WorkerError(
        f"internal error: {type(error).__name__}: {error}",
        f"This is a bug; the traceback is in {reporter.paths.log}.",
    )
    report_error(reporter, internal)
    return internal


def report_error(reporter: Reporter, error: WorkerError) -> None:
    """Write the error to the log and as an `error` event, once: a reported error is marked."""
    if getattr(error, "reported", False):
        return
    reporter.write_log(f"error: {error.message} (hint: {error.hint})")
    reporter.emit(ErrorEvent(message=error.message, hint=error.hint, kind=type(error).__name__))
    error.reported = True  # type: ignore[attr-defined]


def _is_out_of_memory(error: BaseException) -> bool:
    # Imported here: model_errors needs torch, and this module is used before torch is needed.
    try:
        from hctl_worker.model_errors import is_out_of_memory
    except ImportError:  # pragma: no cover - the engine is always there in a full install
        return False
    return is_out_of_memory(error)
