"""Local job records: what hctl remembers about each job, under `data_dir()/jobs/<job id>/`.

```
jobs/<job id>/
    job.json         the record below (where the job runs, what it costs, how far it got)
    events.jsonl     a copy of the worker's events, appended as they are read
    pods/K.events.jsonl  a job on several pods: pod K's events (events.jsonl merges them)
    study.journal    a copy of the Optuna journal, refreshed after each trial (resume needs it)
    settings.toml    the worker settings the job runs with
    pareto.svg       the Pareto front as a picture, written when the job finishes
```

With these files a job can be inspected after its pod is gone, and resumed on a new one. A job
id names a folder, so only the characters hctl's ids use are accepted: `../x` or an absolute path
is refused, never read. Jobs kept by earlier versions under the config folder are still found.
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from hctl.errors import ConfigError, JobError
from hctl.settings import data_dir, hctl_home
from hctl_worker.events import EVENTS_FILE, JOURNAL_FILE, SETTINGS_FILE, read_events

RECORD_FILE = "job.json"
PARETO_PICTURE = "pareto.svg"
CALIBRATION_FILE = "calibration.json"
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

TargetKind = Literal["pod", "ssh", "local"]
JobStatus = Literal[
    "preparing",  # nothing started yet
    "running",  # the worker was launched
    "finished",  # a done event arrived
    "failed",  # an error event arrived, or the worker died without one
    "cancelled",  # `hctl cancel`
    "budget",  # stopped after the trial that reached --max-cost
    "interrupted",  # the machine went away mid-search: `hctl resume` continues it
]


def new_job_id(clock: float | None = None) -> str:
    """A short, sortable, unique id: `MMDD-HHMM-xxxx` (UTC)."""
    moment = time.gmtime(clock if clock is not None else time.time())
    return time.strftime("%m%d-%H%M", moment) + "-" + secrets.token_hex(2)


class PodMember(BaseModel):
    """One pod of a job on several pods (`hctl run --pods N`); the first holds the database."""

    pod_id: str
    remote_job_dir: str = ""  # its own job directory (its workers' events and log)
    first_worker: int = 1  # its workers are named first_worker, first_worker + 1, ...
    price_per_hour: float = 0.0
    lost: str = ""  # why it left the job mid-search (gone, stopped), if it did


class JobRecord(BaseModel):
    """Everything needed to find, follow, finish and resume a job."""

    job_id: str
    model: str  # as the user gave it
    worker_model: str  # what the worker loads: a repo id or a path on the machine
    n_trials: int
    target: TargetKind
    pod_id: str | None = None
    pod_created_here: bool = False
    pod_ids: list[str] = Field(default_factory=list)  # every pod created for this job
    lease_until: float | None = None  # the created pod's deadline (epoch s)
    lease_action: Literal["stop", "terminate"] = "terminate"
    address: str | None = None  # ssh://user@host:port for `--on ssh://`
    remote_job_dir: str  # the job directory on the machine
    worker_command: str = "hctl-worker"  # how the worker is run there
    worker_settings: dict = Field(default_factory=dict)  # before local paths were placed
    parameters: int | None = None  # the model's size, for estimates on resume
    estimated_seconds_per_trial: float = 0.0  # the ETA's pace until real trials are timed
    estimated_cost: float | None = None  # the estimate shown before the job started (USD)
    gpu_id: str | None = None
    gpu_count: int = 1  # GPUs of the pod
    workers: int = 1  # workers sharing the search in the job directory
    one_gpu_each: bool = False  # each worker sees one GPU of the pod (CUDA_VISIBLE_DEVICES)
    price_per_hour: float = 0.0  # every GPU of the pod
    max_cost: float | None = None
    after: Literal["stop", "terminate", "keep"] = "stop"
    status: JobStatus = "preparing"
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    started_at: float | None = None  # when the machine started billing for this job (epoch s)
    chosen_trial: int | None = None
    saved_model_dir: str | None = None  # on the machine
    downloaded_to: str | None = None
    uploaded_repo: str | None = None
    download_dir: str | None = None  # --download, remembered for attach/resume
    upload_repo: str | None = None  # --upload, remembered for attach/resume
    trial_choice: int | None = None  # --trial, remembered for attach/resume
    kl_limit: float | None = None
    spent_before: float = 0.0  # money spent on earlier machines of this job (before a resume)
    message: str = ""
    # Pods the job's end could not stop or terminate (the provider's API failed): still billing.
    unreleased_pods: list[str] = Field(default_factory=list)
    # --pods N: every pod of the job, the first (pod_id, remote_job_dir) holding the study's
    # PostgreSQL database in database_dir; the workers reach it at database_url (no password).
    members: list[PodMember] = Field(default_factory=list)
    database_dir: str | None = None
    database_url: str | None = None

    @property
    def all_workers(self) -> int:
        """The workers of the whole job (every pod's)."""
        return self.workers * max(1, len(self.members))


def failed_to_start(record: JobRecord, error: BaseException) -> JobRecord:
    """The record of a job that could not start, saying why (never left "preparing")."""
    if isinstance(error, KeyboardInterrupt):
        message = "interrupted (Ctrl-C) before the worker started"
    else:
        message = getattr(error, "message", None) or repr(error)
    return record.model_copy(update={"status": "failed", "message": message})


def check_job_id(job_id: str) -> str:
    """A job id as typed; anything that could name another folder is a ConfigError."""
    if not JOB_ID.fullmatch(job_id):
        raise ConfigError(
            f"{job_id!r} is not a job id.",
            "Job ids look like 0612-0930-a1b2; `hctl jobs` lists them.",
        )
    return job_id


class JobStore:
    """The local job records in one folder (the user's data folder by default).

    `legacy` is where earlier versions kept them (the config folder): its jobs are still listed
    and used where they are; new jobs go to `root`.
    """

    def __init__(self, root: Path | None = None, legacy: Path | None = None) -> None:
        self.root = root if root is not None else data_dir() / "jobs"
        if legacy is None and root is None:
            legacy = hctl_home() / "jobs"
        self.legacy = legacy if legacy is not None and legacy != self.root else None

    @property
    def calibration_path(self) -> Path:
        """This machine's measured speed (see `services.calibration`), beside the jobs."""
        return self.root.parent / CALIBRATION_FILE

    def folder(self, job_id: str) -> Path:
        check_job_id(job_id)
        in_legacy = self.legacy is not None and (self.legacy / job_id / RECORD_FILE).is_file()
        if in_legacy and not (self.root / job_id).exists():
            return self.legacy / job_id  # type: ignore[operator]
        return self.root / job_id

    def events_path(self, job_id: str) -> Path:
        return self.folder(job_id) / EVENTS_FILE

    def member_events_path(self, job_id: str, index: int) -> Path:
        """The copy of one pod's events (a job on several pods); `events.jsonl` merges them."""
        return self.folder(job_id) / "pods" / f"{index + 1}.{EVENTS_FILE}"

    def append_member_events(self, job_id: str, index: int, data: bytes) -> None:
        if not data:
            return
        path = self.member_events_path(job_id, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as handle:
            handle.write(data)

    def journal_path(self, job_id: str) -> Path:
        return self.folder(job_id) / JOURNAL_FILE

    def settings_path(self, job_id: str) -> Path:
        return self.folder(job_id) / SETTINGS_FILE

    def picture_path(self, job_id: str) -> Path:
        return self.folder(job_id) / PARETO_PICTURE

    def save(self, record: JobRecord) -> JobRecord:
        folder = self.folder(record.job_id)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / (RECORD_FILE + ".tmp")
        temporary.write_text(record.model_dump_json(indent=2), encoding="utf-8")
        # Replace atomically, so a controller killed mid-write never leaves half a record.
        temporary.replace(folder / RECORD_FILE)
        return record

    def load(self, job_id: str) -> JobRecord:
        path = self.folder(job_id) / RECORD_FILE
        if not path.is_file():
            known = [record.job_id for record in self.list()][-5:]
            hint = (
                f"Recent jobs: {', '.join(known)} (`hctl jobs` lists them)."
                if known
                else "No jobs yet: start one with `hctl run MODEL`."
            )
            raise JobError(f"No job {job_id!r} on this computer.", hint)
        try:
            return JobRecord.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ConfigError(f"The job record {path} is damaged: {error}") from None

    def update(self, job_id: str, **changes: object) -> JobRecord:
        record = self.load(job_id)
        return self.save(record.model_copy(update=changes))

    def list(self) -> list[JobRecord]:
        """Every job record, oldest first; damaged records are skipped."""
        folders = {
            folder.name: folder
            for root in (self.legacy, self.root)
            if root is not None and root.is_dir()
            for folder in root.iterdir()
        }
        records = []
        for name in sorted(folders):
            path = folders[name] / RECORD_FILE
            if not path.is_file():
                continue
            try:
                records.append(JobRecord.model_validate_json(path.read_text(encoding="utf-8")))
            except ValueError:
                continue
        return records

    def append_events(self, job_id: str, data: bytes) -> None:
        """Append complete event lines copied from the machine."""
        if not data:
            return
        with self.events_path(job_id).open("ab") as handle:
            handle.write(data)

    def append_journal(self, job_id: str, data: bytes) -> None:
        """Append complete journal lines copied from the machine."""
        if not data:
            return
        with self.journal_path(job_id).open("ab") as handle:
            handle.write(data)

    def journal_size(self, job_id: str) -> int:
        path = self.journal_path(job_id)
        return path.stat().st_size if path.is_file() else 0

    def events(self, job_id: str) -> list:
        events, _ = read_events(self.events_path(job_id))
        return events
