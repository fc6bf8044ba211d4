"""One job, start to end: load → prompts → directions → batch size → baseline → search → Pareto →
optional export, in a job directory that holds everything needed to resume or inspect it.

```
<job dir>/
  settings.toml            the settings the job runs with (the seed drawn for it included)
  events.jsonl             every event, appended and flushed (see events.py)
  worker.log               messages and, for unexpected failures, the traceback
  worker.pid               the process working on the job now
  study.journal            the Optuna journal: the search resumes from it
  directions.safetensors   refusal directions and per-layer separation, computed once
  results/pareto.json      the Pareto front (refusals, KL, parameters) after the last trial
  results/chosen.json      the chosen trial, when `trial` is set
```

A job directory that exists already is continued, never wiped: running the same command again
resumes the search, and a larger `n_trials` adds trials. Settings that change what the search
measures (model, prompts, markers...) cannot change under an existing study; that is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
from pydantic import ValidationError

from hctl_worker import __version__
from hctl_worker.errors import JobDirectoryError, OutOfMemoryError, SettingsError, WorkerError
from hctl_worker.events import (
    EVENTS_FILE,
    JOURNAL_FILE,
    LOG_FILE,
    PID_FILE,
    RESULTS_DIR,
    SETTINGS_FILE,
    BaselineEvent,
    DoneEvent,
    ErrorEvent,
    EventWriter,
    LogEvent,
    ParetoEvent,
    ParetoTrial,
    StageEvent,
    StartEvent,
    TrialEvent,
    _Event,
    read_events,
)
from hctl_worker.settings import WorkerSettings, read_config_file

if TYPE_CHECKING:
    import torch

    from hctl_worker.ablation import Ablator
    from hctl_worker.evaluation import Baseline, Evaluator
    from hctl_worker.model import LoadedModel
    from hctl_worker.search import TrialResult

DIRECTIONS_FILE = "directions.safetensors"
PARETO_FILE = "pareto.json"
CHOSEN_FILE = "chosen.json"

Listener = Callable[[_Event], None]


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
    def pid(self) -> Path:
        return self.root / PID_FILE

    @property
    def directions(self) -> Path:
        return self.root / DIRECTIONS_FILE

    @property
    def results(self) -> Path:
        return self.root / RESULTS_DIR


class Reporter:
    """Sends events to the job's events file first, then to the listeners (stdout, progress view)."""

    def __init__(self, paths: JobPaths, listeners: Sequence[Listener] = ()) -> None:
        self.paths = paths
        self.writer = EventWriter(paths.events)
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
        with self.paths.log.open("a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text.rstrip()}\n")

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


@dataclass
class JobOutcome:
    results_dir: Path
    front: list[TrialResult] = field(default_factory=list)
    chosen: TrialResult | None = None
    model_dir: Path | None = None
    uploaded_repo: str | None = None


# ----------------------------------------------------------------------------------------------
# The job directory.


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


def reconcile_settings(paths: JobPaths, settings: WorkerSettings) -> WorkerSettings:
    """Check the settings against those the job already ran with, fill in the seed, save them.

    A new job draws its seed here (when none is set) so that a restart uses the same one.
    """
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
    paths.settings.write_text(
        "# The settings this job runs with (written by hctl-worker).\n"
        + tomli_w.dumps(settings.to_toml_dict()),
        encoding="utf-8",
    )
    return settings


@contextlib.contextmanager
def pid_file(paths: JobPaths) -> Iterator[None]:
    """Claim the job for this process; another live worker on the same job is an error."""
    if paths.pid.exists():
        with contextlib.suppress(ValueError, OSError):
            other = int(paths.pid.read_text().strip())
            if other != os.getpid() and _process_alive(other):
                raise JobDirectoryError(
                    f"worker process {other} is already running job {paths.job_id}",
                    f"Wait for it, or stop it (kill {other}) before starting another.",
                )
    paths.pid.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if int(paths.pid.read_text().strip()) == os.getpid():
                paths.pid.unlink()


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
# The pipeline.


def run_job(
    settings: WorkerSettings, job_dir: Path, listeners: Sequence[Listener] = ()
) -> JobOutcome:
    """Run (or continue) a job. Every failure is reported as an `error` event, then raised."""
    paths = open_job_directory(job_dir)
    reporter = Reporter(paths, listeners)
    try:
        with pid_file(paths):
            return _guarded(reporter, lambda: _pipeline(settings, paths, reporter))
    except WorkerError as error:
        if not getattr(error, "reported", False):
            report_error(reporter, error)
        raise
    finally:
        reporter.close()


def _guarded(reporter: Reporter, body: Callable[[], Any]) -> Any:
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
    except Exception as error:
        if _is_out_of_memory(error):
            translated = OutOfMemoryError(f"out of memory: {str(error).splitlines()[0]}")
            report_error(reporter, translated)
            raise translated from None
        reporter.write_log("".join(traceback.format_exception(error)))
        internal = WorkerError(
            f"internal error: {type(error).__name__}: {error}",
            f"This is a bug; the traceback is in {reporter.paths.log}.",
        )
        report_error(reporter, internal)
        raise internal from error


def report_error(reporter: Reporter, error: WorkerError) -> None:
    reporter.write_log(f"error: {error.message} (hint: {error.hint})")
    reporter.emit(ErrorEvent(message=error.message, hint=error.hint, kind=type(error).__name__))
    error.reported = True  # type: ignore[attr-defined]


def _is_out_of_memory(error: BaseException) -> bool:
    try:
        from hctl_worker.model import is_out_of_memory
    except ImportError:  # pragma: no cover - the engine is always there in a full install
        return False
    return is_out_of_memory(error)


@dataclass
class Workbench:
    """What the stages after loading share: the model, its prompts, the scorer, the edits."""

    loaded: LoadedModel
    good_evaluation: list[str]
    evaluator: Evaluator
    baseline: Baseline
    ablator: Ablator
    separation: list[float]


def _pipeline(settings: WorkerSettings, paths: JobPaths, reporter: Reporter) -> JobOutcome:
    from hctl_worker import search

    started = time.monotonic()
    warnings = settings.warnings
    settings = reconcile_settings(paths, settings)
    assert settings.model is not None and settings.seed is not None
    study = search.open_study(
        paths.journal, seed=settings.seed, n_startup_trials=settings.n_startup_trials
    )
    reporter.emit(
        StartEvent(
            job_id=paths.job_id,
            model=settings.model,
            n_trials=settings.n_trials,
            worker_version=__version__,
            resumed_trials=len(search.finished_trials(study)),
            device=_device_name(),
            pid=os.getpid(),
        )
    )
    for warning in warnings:
        reporter.log(warning, level="warning")
    _report_unreported_trials(paths, reporter, search.finished_trials(study), settings.n_trials)
    bench = _prepare(settings, paths, reporter)
    outcome = JobOutcome(
        results_dir=paths.results, front=_search(settings, paths, reporter, study, bench)
    )
    if settings.trial is not None or settings.save_directory or settings.upload_repo:
        _choose_and_export(settings, paths, reporter, bench, outcome)
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


def _prepare(settings: WorkerSettings, paths: JobPaths, reporter: Reporter) -> Workbench:
    """Prompts → model → batch size → directions → baseline (prompts first: they fail fast)."""
    from hctl_worker.ablation import Ablator
    from hctl_worker.evaluation import Evaluator
    from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS
    from hctl_worker.prompts import load_prompt_sets

    with reporter.stage("prompts") as stage:
        prompts = load_prompt_sets(settings)
        stage.result = (
            f"{len(prompts.good)} harmless + {len(prompts.bad)} harmful for directions, "
            f"{len(prompts.good_evaluation)} + {len(prompts.bad_evaluation)} for evaluation"
        )
    loaded = load(settings, reporter)
    system_prompt = settings.system_prompt or None  # "" means no system turn
    good_evaluation = loaded.template(prompts.good_evaluation, system_prompt)
    bad_evaluation = loaded.template(prompts.bad_evaluation, system_prompt)

    with reporter.stage("batch_size") as stage:
        batch_size = settings.batch_size or _find_batch_size(
            loaded, bad_evaluation, settings, reporter
        )
        stage.result = f"batch size {batch_size}"

    with reporter.stage("directions") as stage:
        directions, separation, cached = directions_for(
            paths,
            loaded,
            loaded.template(prompts.good, system_prompt),
            loaded.template(prompts.bad, system_prompt),
            settings,
            batch_size,
            on_progress=stage.progress,
        )
        stage.result = (
            ("from cache; " if cached else "")
            + "separation per layer "
            + ", ".join(f"{value:.2f}" for value in separation.tolist())
        )

    with reporter.stage("baseline") as stage:
        evaluator = Evaluator(
            loaded,
            good_texts=good_evaluation,
            bad_texts=bad_evaluation,
            markers=settings.refusal_markers or list(DEFAULT_REFUSAL_MARKERS),
            max_response_length=settings.max_response_length,
            batch_size=batch_size,
            kl_skip_threshold=settings.kl_skip_threshold or None,
        )
        baseline = evaluator.baseline()
        reporter.emit(
            BaselineEvent(
                refusals=baseline.refusals,
                total_bad=baseline.total_bad,
                refusals_good=baseline.refusals_good,
                total_good=baseline.total_good,
            )
        )
        stage.result = f"{baseline.refusals}/{baseline.total_bad} refusals"
    return Workbench(
        loaded=loaded,
        good_evaluation=good_evaluation,
        evaluator=evaluator,
        baseline=baseline,
        ablator=Ablator(loaded, directions, row_normalization=settings.row_normalization),
        separation=separation.tolist(),
    )


def _search(
    settings: WorkerSettings, paths: JobPaths, reporter: Reporter, study: Any, bench: Workbench
) -> list[TrialResult]:
    """Run the trials still missing; events and results/pareto.json after every trial."""
    from hctl_worker import search
    from hctl_worker.architecture import COMPONENTS

    space = search_space(settings, bench.separation, COMPONENTS)
    reporter.log(f"search space: {space.describe()}")

    def evaluate(values: dict[str, float | str]) -> search.Outcome:
        with bench.ablator.applied(search.to_ablation_params(values, COMPONENTS)):
            score = bench.evaluator.score()
        return search.Outcome(kl=score.kl, refusals=score.refusals, total_bad=score.total_bad)

    with reporter.stage("search", f"{settings.n_trials} trials") as stage:
        recovered = search.recover_interrupted(study)
        if recovered:
            reporter.log(f"{recovered} trial(s) interrupted by a stop will run again")
        finished = search.finished_trials(study)
        resumed = len(finished)

        def on_trial(result: TrialResult) -> None:
            finished.append(result)
            front = search.pareto_front(finished)
            reporter.emit(trial_event(result, settings.n_trials))
            reporter.emit(pareto_event(front))
            stage.progress(result.number, settings.n_trials)
            write_results(paths, front)

        search.run_search(
            study,
            space,
            evaluate,
            n_trials=settings.n_trials,
            on_trial=on_trial,
            describe=lambda values: search.to_ablation_params(values, COMPONENTS).to_dict(),
        )
        front = search.pareto_front(finished)
        write_results(paths, front)
        if len(finished) == resumed:  # no new trial, so no pareto event yet from this run
            reporter.emit(pareto_event(front))
        stage.result = f"{len(finished)} trials, {len(front)} on the Pareto front"
    return front


def _choose_and_export(
    settings: WorkerSettings,
    paths: JobPaths,
    reporter: Reporter,
    bench: Workbench,
    outcome: JobOutcome,
) -> None:
    """Pick the `trial`-th of the front, check it on harmless prompts, save / upload it."""
    from hctl_worker import search
    from hctl_worker.architecture import COMPONENTS
    from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS, is_refusal

    index = settings.trial or 0
    chosen = outcome.chosen = choose_trial(outcome.front, index)
    markers = settings.refusal_markers or list(DEFAULT_REFUSAL_MARKERS)
    with bench.ablator.applied(search.to_ablation_params(chosen.params, COMPONENTS)):
        replies = bench.evaluator.responses(bench.good_evaluation, settings.max_response_length)
    refusals_good = sum(is_refusal(reply, markers) for reply in replies)
    reporter.log(
        f"chose trial {chosen.number}: {chosen.refusals}/{chosen.total_bad} refusals on harmful "
        f"prompts, {refusals_good}/{len(replies)} on harmless ones, KL {chosen.kl:.4f}"
    )
    write_chosen(paths, chosen, index, refusals_good, len(replies))
    if not (settings.save_directory or settings.upload_repo):
        return
    from hctl_worker.export import export_trial

    with reporter.stage("export", f"trial {chosen.number}") as stage:
        exported = export_trial(
            bench.loaded,
            bench.ablator,
            chosen,
            settings,
            baseline_refusals=(bench.baseline.refusals, bench.baseline.total_bad),
            on_message=reporter.log,
        )
        outcome.model_dir, outcome.uploaded_repo = exported.directory, exported.repo
        stage.result = exported.summary()


def load(settings: WorkerSettings, reporter: Reporter) -> LoadedModel:
    from hctl_worker.model import load_model

    assert settings.model is not None
    with reporter.stage("loading", settings.model) as stage:
        loaded = load_model(
            settings.model,
            dtypes=settings.dtypes,
            device_map=settings.device_map,
            max_memory=settings.max_memory,
            trust_remote_code=settings.trust_remote_code,
            revision=settings.model_commit,
            on_message=reporter.log,
        )
        stage.result = f"{loaded.n_layers} layers, {str(loaded.dtype).removeprefix('torch.')}"
    return loaded


def search_space(settings: WorkerSettings, separation: Sequence[float], components: Sequence[str]):
    from hctl_worker.search import SearchSpace

    scopes = (
        ("global", "per_layer")
        if settings.direction_scope == "search"
        else (settings.direction_scope,)
    )
    if settings.search_ranges == "heretic":
        return SearchSpace.heretic(len(separation) - 1, components, scopes)
    return SearchSpace.measured(separation, components, scopes)


def _find_batch_size(
    loaded: LoadedModel, texts: Sequence[str], settings: WorkerSettings, reporter: Reporter
) -> int:
    from hctl_worker.batching import find_batch_size

    return find_batch_size(
        loaded, texts, max_batch_size=settings.max_batch_size, on_message=reporter.log
    )


def directions_for(
    paths: JobPaths,
    loaded: LoadedModel,
    good_texts: Sequence[str],
    bad_texts: Sequence[str],
    settings: WorkerSettings,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Refusal directions and per-layer separation, from the job's cache when it matches."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hctl_worker.directions import last_token_residuals, layer_separation, refusal_directions

    key = _directions_key(loaded.source, good_texts, bad_texts, settings.orthogonalize_direction)
    if paths.directions.exists():
        # A damaged cache is recomputed, never trusted.
        with contextlib.suppress(Exception), safe_open(str(paths.directions), "pt") as handle:
            if (handle.metadata() or {}).get("key") == key:
                return handle.get_tensor("directions"), handle.get_tensor("separation"), True
    bad = last_token_residuals(loaded, bad_texts, batch_size)
    if on_progress:
        on_progress(len(bad_texts), len(bad_texts) + len(good_texts))
    good = last_token_residuals(loaded, good_texts, batch_size)
    directions = refusal_directions(bad, good, orthogonalize=settings.orthogonalize_direction)
    separation = layer_separation(bad, good)
    partial = paths.directions.with_suffix(".partial")
    save_file(
        {"directions": directions.contiguous(), "separation": separation.contiguous()},
        str(partial),
        metadata={"key": key, "model": loaded.source},
    )
    partial.replace(paths.directions)
    return directions, separation, False


def load_cached_directions(paths: JobPaths) -> torch.Tensor:
    """The job's directions for export; an error when the job never computed them."""
    from safetensors.torch import load_file

    if not paths.directions.exists():
        raise JobDirectoryError(
            f"job {paths.job_id} has no refusal directions yet",
            "Run the search first (hctl-worker run --job-dir ...).",
        )
    return load_file(str(paths.directions))["directions"]


def _directions_key(
    source: str, good_texts: Sequence[str], bad_texts: Sequence[str], orthogonalize: bool
) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([source, orthogonalize, list(good_texts), list(bad_texts)]).encode())
    return digest.hexdigest()


def _device_name() -> str:
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return "cpu"


# ----------------------------------------------------------------------------------------------
# Results.


def _report_unreported_trials(
    paths: JobPaths, reporter: Reporter, finished: Sequence[TrialResult], n_trials: int
) -> None:
    """Emit the trial events a killed worker recorded in the journal but never wrote out.

    A trial is told to the study (the journal) just before its event is written, so a worker
    killed in between, or a journal copied home a moment after the events, holds a finished trial
    no event reports. The journal is the record of what was done: report such trials now, once,
    so every trial is seen exactly once and none is redone.
    """
    reported = {
        event.number for event in read_events(paths.events)[0] if isinstance(event, TrialEvent)
    }
    for result in finished:
        if result.number not in reported:
            reporter.emit(trial_event(result, n_trials))


def trial_event(result: TrialResult, n_trials: int) -> TrialEvent:
    return TrialEvent(
        number=result.number,
        n_trials=n_trials,
        params=dict(result.params),
        kl=result.kl,
        refusals=result.refusals,
        total_bad=result.total_bad,
        refusal_skipped=result.refusal_skipped,
        seconds=round(result.seconds, 3),
    )


def pareto_event(front: Sequence[TrialResult]) -> ParetoEvent:
    return ParetoEvent(trials=[pareto_trial(result) for result in front])


def pareto_trial(result: TrialResult) -> ParetoTrial:
    assert result.refusals is not None
    return ParetoTrial(
        number=result.number,
        kl=result.kl,
        refusals=result.refusals,
        total_bad=result.total_bad,
        params=dict(result.params),
    )


def _result_record(result: TrialResult) -> dict[str, Any]:
    return {
        "number": result.number,
        "refusals": result.refusals,
        "total_bad": result.total_bad,
        "kl": result.kl,
        "seconds": result.seconds,
        "params": result.params,
        "ablation": result.ablation,
    }


def write_results(paths: JobPaths, front: Sequence[TrialResult]) -> None:
    _write_json(paths.results / PARETO_FILE, [_result_record(result) for result in front])


def write_chosen(
    paths: JobPaths, chosen: TrialResult, index: int, refusals_good: int, total_good: int
) -> None:
    record = {
        "index": index,
        **_result_record(chosen),
        "refusals_good": refusals_good,
        "total_good": total_good,
    }
    _write_json(paths.results / CHOSEN_FILE, record)


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)


def read_front(paths: JobPaths) -> list[TrialResult]:
    """The job's Pareto front, from its journal (the source of truth)."""
    from hctl_worker import search

    if not paths.journal.exists():
        raise JobDirectoryError(
            f"{paths.root} has no search yet ({JOURNAL_FILE} is missing)",
            "Check --job-dir, or start the search with hctl-worker run.",
        )
    study = search.open_study(paths.journal, seed=0, n_startup_trials=0)
    return search.pareto_front(search.finished_trials(study))


def choose_trial(front: Sequence[TrialResult], index: int) -> TrialResult:
    from hctl_worker.search import choose

    try:
        return choose(front, index)
    except IndexError as error:
        raise SettingsError(
            f"cannot choose trial: {error}",
            "Set trial to an index the Pareto front has (hctl-worker pareto --job-dir DIR lists it).",
        ) from None


def find_trial(paths: JobPaths, number: int) -> TrialResult:
    """A finished trial by its number (as trial events and the Pareto table show it)."""
    from hctl_worker import search

    if not paths.journal.exists():
        raise JobDirectoryError(
            f"{paths.root} has no search yet ({JOURNAL_FILE} is missing)",
            "Check --job-dir, or start the search with hctl-worker run.",
        )
    study = search.open_study(paths.journal, seed=0, n_startup_trials=0)
    finished = search.finished_trials(study)
    for result in finished:
        if result.number == number:
            return result
    raise SettingsError(
        f"job {paths.job_id} has no finished trial {number} (it has 1-{len(finished)})",
        "hctl-worker pareto --job-dir DIR lists the best trials.",
    )


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
    if not (job_dir / SETTINGS_FILE).exists():
        raise JobDirectoryError(
            f"{job_dir} is not a job directory ({SETTINGS_FILE} is missing)",
            "Give the --job-dir a search ran in.",
        )
    paths = JobPaths(job_dir.expanduser().absolute())
    reporter = Reporter(paths, listeners)
    try:
        return _guarded(
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
    from hctl_worker.ablation import Ablator
    from hctl_worker.export import export_trial

    started = time.monotonic()
    settings = stored_settings(paths)
    chosen = find_trial(paths, number)
    if not (save_directory or settings.save_directory or upload_repo or settings.upload_repo):
        raise SettingsError(
            "nothing to export to", "Give --save-directory DIR and/or --upload-repo USER/NAME."
        )
    directions = load_cached_directions(paths)
    loaded = load(settings, reporter)
    ablator = Ablator(loaded, directions, row_normalization=settings.row_normalization)
    with reporter.stage("export", f"trial {chosen.number}") as stage:
        exported = export_trial(
            loaded,
            ablator,
            chosen,
            settings,
            save_directory=save_directory,
            upload_repo=upload_repo,
            upload_private=upload_private,
            on_message=reporter.log,
        )
        stage.result = exported.summary()
    outcome = JobOutcome(
        results_dir=paths.results,
        chosen=chosen,
        model_dir=exported.directory,
        uploaded_repo=exported.repo,
    )
    reporter.emit(
        DoneEvent(
            results_dir=str(paths.results),
            chosen_trial=chosen.number,
            model_dir=str(exported.directory) if exported.directory else None,
            uploaded_repo=exported.repo,
            seconds=round(time.monotonic() - started, 3),
        )
    )
    return outcome
