"""The job directory: everything needed to resume or inspect a job, in one folder.

```
<job dir>/
  settings.toml            the settings the job runs with (the seed drawn for it included)
  events.jsonl             every event, appended and flushed (see events.py)
  worker.log               messages and, for unexpected failures, the traceback (every worker's)
  workers/<name>.pid       the process of each worker working on the job now
  study.journal            the Optuna journal: the search resumes from it (see study.py)
  storage.url              instead, the database the study is in (no password), when it is in one
  directions.safetensors   refusal directions, where refusal is read and written, computed once
  results/pareto.json      the Pareto front (scores, parameters) after the last trial
  results/chosen.json      the chosen trial, when one was chosen
  results/evaluation-trial-K.json   the capability check of trial K (hctl-worker evaluate)
```

The names the controller reads too are constants in `events.py` (the shared contract); the rest
are the worker's own, here. A job directory that exists already is continued, never wiped:
settings that change what the search measures (model, prompts, markers...) cannot change under
an existing study; that is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from hctl_worker import study as studies
from hctl_worker.errors import JobDirectoryError, SettingsError
from hctl_worker.events import (
    EVENTS_FILE,
    JOURNAL_FILE,
    LOG_FILE,
    RESULTS_DIR,
    SETTINGS_FILE,
    STORAGE_FILE,
    WORKERS_DIR,
)
from hctl_worker.locks import FileLock
from hctl_worker.settings import WorkerSettings, read_config_file
from hctl_worker.storage import StudyStorage, open_storage, without_password
from hctl_worker.trials import Trial, find, pareto_front

DIRECTIONS_FILE = "directions.safetensors"
PARETO_FILE = "pareto.json"
CHOSEN_FILE = "chosen.json"


@dataclass(frozen=True)
class JobPaths:
    root: Path

    @property
    def job_id(self) -> str:
        return self.root.name

    @property
    def events(self) -> Path:
        return self.root / EVENTS_FILE

    @property
    def settings(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL_FILE

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def workers(self) -> Path:
        return self.root / WORKERS_DIR

    def pid(self, worker: str) -> Path:
        return self.workers / f"{worker}.pid"

    @property
    def storage_url(self) -> Path:
        return self.root / STORAGE_FILE

    @property
    def directions(self) -> Path:
        return self.root / DIRECTIONS_FILE

    @property
    def results(self) -> Path:
        return self.root / RESULTS_DIR


def open_job_directory(job_dir: Path) -> JobPaths:
    """The job directory, created when missing. Nothing in it is ever removed."""
    job_dir = job_dir.expanduser().absolute()
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise JobDirectoryError(
            f"cannot create job directory {job_dir}: {error.strerror}",
            "Choose a job directory on a writable volume (--job-dir).",
        ) from None
    if not job_dir.is_dir():
        raise JobDirectoryError(f"{job_dir} is not a directory", "Choose another --job-dir.")
    return JobPaths(job_dir)


def existing_job_directory(job_dir: Path) -> JobPaths:
    """A job directory a search ran in (it has its settings file); an error otherwise."""
    paths = JobPaths(job_dir.expanduser().absolute())
    if not paths.settings.exists():
        raise JobDirectoryError(
            f"{job_dir} is not a job directory ({SETTINGS_FILE} is missing)",
            "Give the --job-dir a search ran in.",
        )
    return paths


# ----------------------------------------------------------------------------------------------
# Settings.


def reconcile_settings(paths: JobPaths, settings: WorkerSettings) -> WorkerSettings:
    """Check the settings against those the job already ran with, fill in the seed, save them.

    A new job draws its seed here (when none is set) so that a restart uses the same one.
    Workers starting together on one job take turns here, so they all run with one seed.
    """
    with FileLock(paths.root / "settings.lock"):
        return _reconcile_settings(paths, settings)


def _reconcile_settings(paths: JobPaths, settings: WorkerSettings) -> WorkerSettings:
    if paths.settings.exists():
        stored = _read_settings_file(paths)
        changed = [
            key
            for key, value in settings.search_fingerprint().items()
            if stored.search_fingerprint()[key] != value
        ]
        if changed:
            raise SettingsError(
                f"job {paths.job_id} ran with other values for: {', '.join(changed)}",
                "Use a new --job-dir for a different search, or the same settings to continue this one.",
            )
        if settings.seed is None:
            settings.seed = stored.seed
    if settings.seed is None:
        settings.seed = random.SystemRandom().randrange(2**31)
    if settings.model is None:
        raise SettingsError(
            "no model given", "Set model in the config file or pass --model (a hub id or a folder)."
        )
    _replace_text(
        paths.settings,
        "# The settings this job runs with (written by hctl-worker).\n"
        + tomli_w.dumps(settings.to_toml_dict()),
    )
    return settings


def stored_settings(paths: JobPaths) -> WorkerSettings:
    if not paths.settings.exists():
        raise JobDirectoryError(
            f"{paths.root} is not a job directory ({SETTINGS_FILE} is missing)",
            "Give the --job-dir a search ran in.",
        )
    return _read_settings_file(paths)


def _read_settings_file(paths: JobPaths) -> WorkerSettings:
    """The settings a job ran with, exactly as stored (no environment, no defaults file)."""
    try:
        return WorkerSettings.model_validate(read_config_file(paths.settings))
    except ValidationError as error:
        raise SettingsError(
            f"{paths.settings} is damaged: {error.errors()[0]['msg']}",
            "Restore the file, or start a new job with a new --job-dir.",
        ) from None


# ----------------------------------------------------------------------------------------------
# The worker working on the job.


WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


@contextlib.contextmanager
def worker_slot(paths: JobPaths, name: str | None = None) -> Iterator[str]:
    """Claim a worker name in the job for this process (its pid file); yields the name.

    Several workers may work on one job at once, each under its own name; without one, a worker
    takes the lowest number no live worker of the job holds (so a worker started again takes
    its predecessor's name, and the study knows that predecessor is gone). A live worker
    holding the name asked for is an error.
    """
    if name is not None and not WORKER_NAME.fullmatch(name):
        raise JobDirectoryError(
            f"{name!r} is not a worker name",
            "Use up to 32 letters, digits, '.', '_' or '-' (e.g. --worker 2).",
        )
    paths.workers.mkdir(parents=True, exist_ok=True)
    with FileLock(paths.workers / ".lock"):
        if name is None:
            name = next(str(n) for n in range(1, 10_000) if _holder(paths, str(n)) is None)
        other = _holder(paths, name)
        if other is not None:
            raise JobDirectoryError(
                f"worker {name} (process {other}) is already running job {paths.job_id}",
                f"Give this worker another name (--worker NAME), or stop process {other} first.",
            )
        paths.pid(name).write_text(f"{os.getpid()}\n")
    try:
        yield name
    finally:
        with contextlib.suppress(OSError, ValueError):
            if int(paths.pid(name).read_text().strip()) == os.getpid():
                paths.pid(name).unlink()


def _holder(paths: JobPaths, name: str) -> int | None:
    """The live process holding a worker name, if any."""
    with contextlib.suppress(ValueError, OSError):
        pid = int(paths.pid(name).read_text().strip())
        if pid != os.getpid() and _process_alive(pid):
            return pid
    return None


def _process_alive(pid: int) -> bool:
    """Whether `pid` is a live worker. After a machine restart pids are reused, so where /proc
    shows the command line, another program with that pid does not count."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"hctl-worker" in command_line or b"hctl_worker" in command_line


# ----------------------------------------------------------------------------------------------
# The trials: the journal is the record of what was done; the results files are copies for people.


def job_storage(paths: JobPaths, url: str | None = None) -> StudyStorage:
    """The job's study storage: the database `url`, else the one the job recorded, else its
    journal. A URL given is recorded (without a password) for the commands that come later."""
    recorded = None
    if paths.storage_url.is_file():
        recorded = paths.storage_url.read_text(encoding="utf-8").strip()
    storage = open_storage(paths.journal, url or recorded, studies.STUDY_NAME)
    if url:  # recorded once it worked: a wrong URL leaves the job directory as it was
        paths.storage_url.write_text(without_password(url) + "\n", encoding="utf-8")
    return storage


def finished_trials(paths: JobPaths) -> list[Trial]:
    """The job's finished trials, from its study (the journal, or the database it recorded)."""
    if not paths.journal.exists() and not paths.storage_url.exists():
        raise JobDirectoryError(
            f"{paths.root} has no search yet ({JOURNAL_FILE} is missing)",
            "Check --job-dir, or start the search with hctl-worker run.",
        )
    storage = job_storage(paths)
    try:
        return studies.load_trials(storage)
    finally:
        storage.close()


def read_front(paths: JobPaths) -> list[Trial]:
    """The job's Pareto front, from its journal (the source of truth)."""
    return pareto_front(finished_trials(paths))


def find_trial(trials: Sequence[Trial], number: int, job_id: str) -> Trial:
    """The finished trial with this number (as trial events and the Pareto table show it)."""
    found = find(trials, number)
    if found is None:
        if not trials:
            raise SettingsError(
                f"job {job_id} has no finished trial yet (trial {number} was asked for)",
                "Run its search first: hctl-worker run --job-dir DIR continues it.",
            )
        numbers = sorted(trial.number for trial in trials)
        gaps = len(numbers) != numbers[-1] - numbers[0] + 1  # failed or unfinished trials
        have = f"{len(numbers)} finished, numbered" if gaps else "trials"
        raise SettingsError(
            f"job {job_id} has no finished trial {number} (it has {have} "
            f"{numbers[0]}-{numbers[-1]})",
            "hctl-worker pareto --job-dir DIR lists the best trials and their numbers.",
        )
    return found


def _result_record(result: Trial) -> dict[str, Any]:
    return {
        "number": result.number,
        "refusals": result.refusals,
        "total_bad": result.total_bad,
        "kl": result.kl,
        "acceptable": result.acceptable,
        "scores": {name: score.model_dump() for name, score in result.scores.items()},
        "seconds": result.seconds,
        "params": result.params,
        "ablation": result.ablation,
    }


def write_results(paths: JobPaths, front: Sequence[Trial]) -> None:
    _write_json(paths.results / PARETO_FILE, [_result_record(result) for result in front])


def write_chosen(paths: JobPaths, chosen: Trial, *, automatic: bool) -> None:
    record = {**_result_record(chosen), "automatic": automatic}  # chosen by the rule, or by number
    _write_json(paths.results / CHOSEN_FILE, record)


def evaluation_file(paths: JobPaths, number: int) -> Path:
    return paths.results / f"evaluation-trial-{number}.json"


def write_evaluation(paths: JobPaths, number: int, record: Any) -> Path:
    path = evaluation_file(paths, number)
    _write_json(path, record)
    return path


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_text(path, json.dumps(value, indent=2) + "\n")


def partial_path(path: Path) -> Path:
    """A file to write before it replaces `path`; its own per process, as several workers of
    a job may write the same file at once (each one whole: a reader sees one or the other)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _replace_text(path: Path, text: str) -> None:
    partial = partial_path(path)
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
