"""One job, start to end: settings → workbench (prompts, model, batch size, directions, baseline) →
search (`job_search.py`) → Pareto front → the chosen trial, checked and optionally exported. The
export of a finished job's trial later is `job_export.py` (behind `hctl-worker export`).

Running the same job directory again resumes the search, and a larger `n_trials` adds trials (see
`job_directory.py` and `study.py`). Every failure is reported once as an `error` event.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hctl_worker import __version__
from hctl_worker import study as studies
from hctl_worker.checkup import capability_check
from hctl_worker.errors import SettingsError, WorkerError
from hctl_worker.events import DoneEvent, StartEvent
from hctl_worker.export import check_save_directory, export_trial
from hctl_worker.job_directory import (
    JobPaths,
    find_trial,
    job_storage,
    open_job_directory,
    reconcile_settings,
    worker_slot,
    write_chosen,
)
from hctl_worker.job_search import match_reports_to_events, run_search
from hctl_worker.provenance import measurement_notes
from hctl_worker.reporter import Listener, Reporter, guarded, report_error
from hctl_worker.settings import WorkerSettings
from hctl_worker.storage import redact
from hctl_worker.teamwork import Teamwork
from hctl_worker.trials import Trial, choose, describe_scores, pareto_front
from hctl_worker.workbench import Workbench, prepare


@dataclass
class JobOutcome:
    results_dir: Path
    front: list[Trial] = field(default_factory=list)
    chosen: Trial | None = None
    model_dir: Path | None = None
    uploaded_repo: str | None = None


def run_job(
    settings: WorkerSettings,
    job_dir: Path,
    listeners: Sequence[Listener] = (),
    *,
    storage_url: str | None = None,
    worker: str | None = None,
) -> JobOutcome:
    """Run (or continue, or join) a job. Every failure is reported as an `error` event, then
    raised. Several workers may run one job at once: on one job directory (its journal), or each
    on its own with the study in the database at `storage_url`."""
    paths = open_job_directory(job_dir)
    with contextlib.ExitStack() as stack:
        try:
            name = stack.enter_context(worker_slot(paths, worker))
        except WorkerError as error:  # a bad or taken name: still an event, then the error
            reporter = Reporter(paths, listeners, worker=worker or "")
            report_error(reporter, error)
            reporter.close()
            raise
        reporter = Reporter(paths, listeners, worker=name)
        try:
            return guarded(
                reporter, lambda: _pipeline(settings, paths, reporter, storage_url, name)
            )
        except WorkerError as error:
            report_error(reporter, error)
            raise
        finally:
            reporter.close()


def _pipeline(
    settings: WorkerSettings,
    paths: JobPaths,
    reporter: Reporter,
    storage_url: str | None,
    name: str,
) -> JobOutcome:
    started = time.monotonic()
    warnings = settings.warnings
    settings = reconcile_settings(paths, settings)
    assert settings.model is not None and settings.seed is not None
    storage = job_storage(paths, storage_url)
    try:
        study = studies.open_study(
            storage,
            seed=settings.seed,
            n_startup_trials=settings.n_startup_trials,
            directions=[c.optimization for c in settings.scorers if c.optimization != "report"],
            seed_offset=0 if name == "1" else zlib.crc32(name.encode()) % 1_000_003,
        )
        resumed = studies.finished_trials(study)
        reporter.emit(
            StartEvent(
                job_id=paths.job_id,
                model=settings.model,
                n_trials=settings.n_trials,
                worker_version=__version__,
                resumed_trials=len(resumed),
                device=_device_name(),
                pid=os.getpid(),
                storage=storage.description if storage_url else "",
            )
        )
        for warning in warnings:
            reporter.log(warning, level="warning")
        if storage_url and redact(storage_url) != storage_url:
            reporter.log(
                "the database password is in the --storage URL, where other users of this "
                "machine can read it: give it in PGPASSWORD instead",
                level="warning",
            )
        _check_trial_can_exist(settings, len(resumed), paths.job_id)
        if settings.save_directory:  # before the search, not after it
            check_save_directory(settings.save_directory, settings.model, paths.root)
        if not storage_url:
            match_reports_to_events(paths, study)
        # A worker joining a search that has ended loads nothing.
        prompt_record = studies.StudyPromptRecord(study)
        bench = (
            prepare(settings, paths, reporter, first_run=not resumed, shared=prompt_record)
            if len(resumed) < settings.n_trials
            else None
        )
        team = Teamwork(
            name=name,
            owner=f"{socket.gethostname()}:{paths.root}:{name}",
            heartbeat_s=settings.heartbeat_seconds,
            stale_after_s=settings.stale_after_seconds,
        )
        finished = run_search(settings, paths, reporter, study, bench, team)
        outcome = JobOutcome(results_dir=paths.results, front=pareto_front(finished))
        if settings.trial is not None or settings.save_directory or settings.upload_repo:
            bench = bench or prepare(settings, paths, reporter, shared=prompt_record)
            _choose_and_export(settings, paths, reporter, bench, finished, outcome)
    finally:
        storage.close()
    reporter.emit(
        DoneEvent(
            results_dir=str(paths.results),
            chosen_trial=outcome.chosen.number if outcome.chosen else None,
            model_dir=str(outcome.model_dir) if outcome.model_dir else None,
            uploaded_repo=outcome.uploaded_repo,
            seconds=round(time.monotonic() - started, 3),
        )
    )
    return outcome


def _check_trial_can_exist(settings: WorkerSettings, finished: int, job_id: str) -> None:
    """Refuse a trial number the search will never reach before the model is even loaded."""
    last = max(finished, settings.n_trials)  # trials are numbered 1, 2, 3... as they finish
    if settings.trial is not None and settings.trial > last:
        raise SettingsError(
            f"job {job_id} will have trials 1-{last}, so it has no trial {settings.trial}",
            f"Set trial to a number from 1 to {last} (or raise n_trials), or leave it unset to "
            "choose the best automatically.",
        )


def _choose_and_export(
    settings: WorkerSettings,
    paths: JobPaths,
    reporter: Reporter,
    bench: Workbench,
    finished: Sequence[Trial],
    outcome: JobOutcome,
) -> None:
    """Take trial number `trial` (else the automatic choice of the front), check it on harmless
    prompts, save / upload it."""
    if settings.trial is not None:
        chosen = find_trial(finished, settings.trial, paths.job_id)
    else:
        chosen = choose(outcome.front)
        if chosen is None:
            raise SettingsError(
                "no trial to choose: every trial's refusals were skipped for a high KL, or "
                "refused more harmless prompts than harmless_refusal_margin allows",
                "Raise kl_skip_threshold (or set it to 0) or harmless_refusal_margin, or name a "
                "trial (trial = K; hctl-worker pareto lists them), then run the job again.",
            )
    outcome.chosen = chosen
    reporter.log(f"chose trial {chosen.number}: {describe_scores(chosen)}")
    write_chosen(paths, chosen, automatic=settings.trial is None)
    if not (settings.save_directory or settings.upload_repo):
        return
    check = None
    if settings.evaluate_after_export:
        check = capability_check(
            settings,
            paths,
            reporter,
            bench.loaded,
            bench.ablator,
            chosen,
            batch_size=bench.evaluator.batch_size,
        )
    with reporter.stage("export", f"trial {chosen.number}") as stage:
        exported = export_trial(
            bench.loaded,
            bench.ablator,
            chosen,
            settings,
            baseline=bench.baseline,
            evaluation=check,
            measured_on=measurement_notes(settings, paths.root),
            on_message=reporter.log,
        )
        outcome.model_dir, outcome.uploaded_repo = exported.directory, exported.repo
        stage.result = exported.summary()


def _device_name() -> str:
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return "cpu"
