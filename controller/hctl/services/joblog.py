"""A job's log as a person reads it, and its raw events for scripts.

The worker runs with `--events`, so its log on the machine interleaves JSON events (one per line)
with whatever else it printed (warnings, a traceback). `readable_log` keeps the other lines as
they are and turns each event into the line the live view printed for it, with its time; events
the live view only shows in its panel (progress ticks) are left out. When the machine cannot be
reached, the events copied home tell the story instead. `raw_events` gives the events themselves,
one JSON object per line, from the copy at home.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from hctl.errors import HctlError
from hctl.services.jobs import JobRecord
from hctl.services.progress import JobProgress
from hctl.services.sync import sync_job, worker_log_tail
from hctl.services.toolkit import Toolkit
from hctl.services.view import event_line
from hctl_worker.events import decode


@dataclass
class Log:
    lines: list[str]
    from_machine: bool  # False: rebuilt from the events copied home (the machine was not reached)


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _key(event: object) -> tuple[str, int]:
    """An event's identity in the log: its worker and sequence number (workers on several pods
    number their events alike)."""
    return str(getattr(event, "worker", "")), int(getattr(event, "seq", -1))


def rendered_events(record: JobRecord, toolkit: Toolkit) -> dict[tuple[str, int], str]:
    """Each copied event's readable line by worker and sequence number (None-lines left out)."""
    progress = JobProgress(
        n_trials=record.n_trials, model=record.model, expected_workers=record.all_workers
    )
    rendered: dict[tuple[str, int], str] = {}
    for event in toolkit.store.events(record.job_id):
        progress.apply(event)
        line = event_line(event, progress)
        if line is not None:
            rendered[_key(event)] = f"{_stamp(getattr(event, 'ts', 0.0))} {line}"
    return rendered


def _event_of(line: str) -> object | None:
    if not line.startswith("{"):
        return None
    try:
        return decode(line)
    except (ValueError, json.JSONDecodeError):
        return None


def readable_log(record: JobRecord, toolkit: Toolkit, *, lines: int) -> Log:
    """The last `lines` lines of the job's log, events rendered (see the module docstring)."""
    sync_job(record, toolkit)
    rendered = rendered_events(record, toolkit)
    try:
        tail = worker_log_tail(record, toolkit, lines=lines).replace("\r", "")
    except HctlError:
        return Log(lines=list(rendered.values())[-lines:], from_machine=False)
    shown = []
    for line in tail.splitlines():
        event = _event_of(line)
        if event is None:
            shown.append(line)
        elif _key(event) in rendered:
            shown.append(rendered[_key(event)])
    return Log(lines=shown, from_machine=True)


def raw_events(record: JobRecord, toolkit: Toolkit, *, lines: int) -> list[str]:
    """The last `lines` events, as the JSON lines the worker wrote (after a sync)."""
    sync_job(record, toolkit)
    path = toolkit.store.events_path(record.job_id)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()][-lines:]
