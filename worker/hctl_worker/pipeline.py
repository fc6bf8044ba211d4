"""One job, start to end: settings → workbench (prompts, model, batch size, directions, baseline) →
search → Pareto front → the chosen trial, checked and optionally exported; and the export of any
finished trial of a job later (`export_job`, behind `hctl-worker export`).

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

import optuna
import torch

from hctl_worker import __version__
from hctl_worker import study as studies
from hctl_worker.ablation import Ablator
from hctl_worker.architecture import COMPONENTS
from hctl_worker.checkup import capability_check
from hctl_worker.errors import SettingsError, WorkerError
from hctl_worker.events import DoneEvent, ParetoEvent, StartEvent, TrialEvent, read_events
from hctl_worker.export import export_trial
from hctl_worker.job_directory import (
    JobPaths,
    existing_job_directory,
    find_trial,
    finished_trials,
    job_storage,
    load_cached_directions,
    open_job_directory,
    reconcile_settings,
    stored_settings,
    worker_slot,
    write_chosen,
    write_results,
)
from hctl_worker.pruning import PruningBar
from hctl_worker.reporter import Listener, Reporter, guarded, report_error
from hctl_worker.search_space import SearchSpace, to_ablation_params
from hctl_worker.settings import WorkerSettings
from hctl_worker.startup import describe_plan, enqueue_once, plan_startup, superseded
from hctl_worker.storage import redact
from hctl_worker.teamwork import Teamwork, forget_reports, mark_reported, reported_numbers
from hctl_worker.trials import Trial, choose, describe_scores, pareto_front
from hctl_worker.workbench import Workbench, load, prepare


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
        if not storage_url:
            _match_reports_to_events(paths, study)
        # A worker joining a search that has ended loads nothing.
        bench = prepare(settings, paths, reporter) if len(resumed) < settings.n_trials else None
        team = Teamwork(
            name=name,
            owner=f"{socket.gethostname()}:{paths.root}:{name}",
            heartbeat_s=settings.heartbeat_seconds,
            stale_after_s=settings.stale_after_seconds,
        )
        finished = _search(settings, paths, reporter, study, bench, team)
        outcome = JobOutcome(results_dir=paths.results, front=pareto_front(finished))
        if settings.trial is not None or settings.save_directory or settings.upload_repo:
            bench = bench or prepare(settings, paths, reporter)
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


def search_space(settings: WorkerSettings, n_layers: int) -> SearchSpace:
    scopes = (
        ("global", "per_layer")
        if settings.direction_scope == "search"
        else (settings.direction_scope,)
    )
    if settings.search_ranges == "heretic":
        return SearchSpace.heretic(n_layers, COMPONENTS, scopes)
    return SearchSpace.whole(n_layers, COMPONENTS, scopes)


def _queue_first_trials(
    settings: WorkerSettings, reporter: Reporter, study: optuna.Study, bench: Workbench
) -> None:
    """The canonical trials and the measured startup points, queued once per study; heretic's
    ranges run exactly as heretic does (uniform startup trials, no canonical ones)."""
    if settings.search_ranges == "heretic":
        return
    assert settings.seed is not None
    space = search_space(settings, bench.profile.n_layers)
    plan = plan_startup(
        space, bench.profile, n_startup_trials=settings.n_startup_trials, seed=settings.seed
    )
    queued = enqueue_once(study, plan)
    reporter.log(describe_plan(plan) + ("" if queued else " (queued before)"))


def _search(
    settings: WorkerSettings,
    paths: JobPaths,
    reporter: Reporter,
    study: optuna.Study,
    bench: Workbench | None,
    team: Teamwork,
) -> list[Trial]:
    """Take part in the search until it has `n_trials` finished trials (this worker's and the
    others'); every trial numbered in this worker's turn is reported here: its event, the front,
    results/pareto.json. Returns every finished trial."""
    space = search_space(settings, bench.profile.n_layers) if bench is not None else None
    if space is not None and bench is not None:
        reporter.log(f"search space ({settings.search_ranges}): {space.describe()}")
        with studies.study_storage(study).exclusive():  # once per study, whichever worker
            _queue_first_trials(settings, reporter, study, bench)

    def evaluate(values: dict[str, float | str]) -> studies.Outcome:
        assert bench is not None
        limit = None
        if settings.prune_trials and bench.scoring.can_prune:
            harmful = len(bench.evaluator.prompts["harmful"].texts)
            finished = studies.finished_trials(study)
            limit = PruningBar.for_prompts(finished, harmful, settings.prune_margin).refusal_limit
        with bench.ablator.applied(to_ablation_params(values, COMPONENTS)):
            scores, pruned = bench.score(refusal_limit=limit)
        return studies.Outcome(scores=scores, pruned=pruned)

    ran: list[Trial] = []
    with reporter.stage("search", f"{settings.n_trials} trials") as stage:

        def report(result: Trial, finished: list[Trial]) -> None:
            front = pareto_front(finished)
            reporter.emit(TrialEvent.of(result, settings.n_trials))
            reporter.emit(ParetoEvent(trials=front))
            stage.progress(len(finished), settings.n_trials)
            write_results(paths, front)

        finished = studies.run_search(
            study,
            space,  # type: ignore[arg-type]  # never sampled once the search has all its trials
            evaluate,
            n_trials=settings.n_trials,
            on_trial=ran.append,
            report=report,
            describe=lambda values: to_ablation_params(values, COMPONENTS).to_dict(),
            team=team,
            skip=superseded,
        )
        front = pareto_front(finished)
        write_results(paths, front)
        if not ran:  # no trial of this run's own, so maybe no pareto event from it yet
            reporter.emit(ParetoEvent(trials=front))
        stage.result = (
            f"{len(finished)} trials ({len(ran)} run by worker {team.name}), "
            f"{len(front)} on the Pareto front"
        )
    return finished


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
            on_message=reporter.log,
        )
        outcome.model_dir, outcome.uploaded_repo = exported.directory, exported.repo
        stage.result = exported.summary()


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
    directions = load_cached_directions(paths)
    loaded = load(settings, reporter)
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


def _match_reports_to_events(paths: JobPaths, study: optuna.Study) -> None:
    """Make the study's marks of reported trials agree with the job's events file.

    On a journal, every worker of the job writes the same events file, which is the record of
    what was reported: a job directory restored from copies (a resume on a new machine), or a
    job from before the marks, may hold trials the marks miss or marks the file lacks. Trials
    whose events are missing are then reported in the next turn, once.
    """
    with studies.study_storage(study).exclusive():
        shown = {
            event.number for event in read_events(paths.events)[0] if isinstance(event, TrialEvent)
        }
        finished = {trial.number for trial in studies.finished_trials(study)}
        marked = reported_numbers(study)
        forget_reports(study, marked - shown)
        mark_reported(study, (shown & finished) - marked)


def _device_name() -> str:
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return "cpu"
