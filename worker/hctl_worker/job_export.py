"""Exporting a trial of a finished job later (`hctl-worker export`): the job's stored settings
and cached directions, the model reloaded, the edit merged, saved and/or uploaded."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hctl_worker.ablation import Ablator
from hctl_worker.checkup import capability_check
from hctl_worker.direction_cache import load_cached_directions
from hctl_worker.errors import SettingsError
from hctl_worker.events import DoneEvent
from hctl_worker.export import check_save_directory, export_trial
from hctl_worker.job_directory import (
    JobPaths,
    existing_job_directory,
    find_trial,
    finished_trials,
    stored_settings,
)
from hctl_worker.job_prompts import load_prompt_sets
from hctl_worker.pipeline import JobOutcome
from hctl_worker.provenance import measurement_notes
from hctl_worker.reporter import Listener, Reporter, guarded
from hctl_worker.workbench import directions_for, load

if TYPE_CHECKING:
    import torch

    from hctl_worker.model import LoadedModel
    from hctl_worker.settings import WorkerSettings

# The batch for directions measured at export (the search's own size is not kept): the
# batch changes only the rounding of the activations.
EXPORT_DIRECTIONS_BATCH = 8


def export_job(
    job_dir: Path,
    number: int,
    *,
    save_directory: str | None = None,
    upload_repo: str | None = None,
    upload_private: bool | None = None,
    listeners: Sequence[Listener] = (),
) -> JobOutcome:
    """Export trial `number` of a job: reload the model, merge the edit, save and/or upload.

    Uses the job's stored settings and cached directions, so nothing is recomputed; the export
    stage and a `done` event go to the job's events file.
    """
    paths = existing_job_directory(job_dir)
    reporter = Reporter(paths, listeners)
    try:
        return guarded(
            reporter,
            lambda: _export(paths, reporter, number, save_directory, upload_repo, upload_private),
        )
    finally:
        reporter.close()


def _export(
    paths: JobPaths,
    reporter: Reporter,
    number: int,
    save_directory: str | None,
    upload_repo: str | None,
    upload_private: bool | None,
) -> JobOutcome:
    started = time.monotonic()
    settings = stored_settings(paths)
    chosen = find_trial(finished_trials(paths), number, paths.job_id)
    if not (save_directory or settings.save_directory or upload_repo or settings.upload_repo):
        raise SettingsError(
            "nothing to export to", "Give --save-directory DIR and/or --upload-repo USER/NAME."
        )
    if save_directory or settings.save_directory:
        assert settings.model is not None  # a stored job's settings name its model
        check_save_directory(save_directory or settings.save_directory, settings.model, paths.root)
    loaded = load(settings, reporter)
    directions = _directions(settings, paths, reporter, loaded)
    ablator = Ablator(loaded, directions, row_normalization=settings.row_normalization)
    check = None
    if settings.evaluate_after_export:
        check = capability_check(settings, paths, reporter, loaded, ablator, chosen)
    with reporter.stage("export", f"trial {chosen.number}") as stage:
        exported = export_trial(
            loaded,
            ablator,
            chosen,
            settings,
            save_directory=save_directory,
            upload_repo=upload_repo,
            upload_private=upload_private,
            evaluation=check,
            measured_on=measurement_notes(settings, paths.root),
            on_message=reporter.log,
        )
        stage.result = exported.summary()
    reporter.emit(
        DoneEvent(
            results_dir=str(paths.results),
            chosen_trial=chosen.number,
            model_dir=str(exported.directory) if exported.directory else None,
            uploaded_repo=exported.repo,
            seconds=round(time.monotonic() - started, 3),
        )
    )
    return JobOutcome(
        results_dir=paths.results,
        chosen=chosen,
        model_dir=exported.directory,
        uploaded_repo=exported.repo,
    )


def _directions(
    settings: WorkerSettings, paths: JobPaths, reporter: Reporter, loaded: LoadedModel
) -> torch.Tensor:
    """The job's directions: from its cache, else measured again from its prompts, as its
    search did (a search that ended on a pod that went away leaves none on the next pod)."""
    if paths.directions.exists():
        return load_cached_directions(paths)
    prompts = load_prompt_sets(
        settings, paths.root, lambda note: reporter.log(note, level="warning")
    )
    batch_size = settings.batch_size or EXPORT_DIRECTIONS_BATCH
    with reporter.stage("directions", "measured again for the export") as stage:
        measured = directions_for(
            paths, loaded, prompts, settings, batch_size, on_progress=stage.progress
        )
        stage.result = "measured again: this job directory had none"
    return measured.directions


__all__ = ["export_job"]
