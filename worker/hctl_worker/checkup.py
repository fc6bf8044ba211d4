"""The capability check of one trial: the original model and the edited one, side by side.

`hctl-worker evaluate --job-dir DIR --trial K` (and, with `evaluate_after_export`, every export)
measures on the same loaded model, with and without the trial's edit:

- cross-entropy and perplexity on held-out harmless text (`perplexity.py`),
- every scorer that can run on the evaluation prompts (the job's own, and the others it did not
  choose: markers, KL, multi-token KL, harmless refusals, the classifier when one is set),
- the named lm-eval tasks (`benchmarks`), when `lm_eval` is installed.

The result goes to `results/evaluation-trial-K.json`, an `evaluation` event (which the
controller shows in `hctl results`) and the exported model's card.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hctl_worker.ablation import AblationParams, Ablator
from hctl_worker.benchmarks import INSTALL_HINT, lm_eval_installed, run_benchmarks
from hctl_worker.direction_cache import load_cached_directions
from hctl_worker.events import EvaluationEvent, Measure
from hctl_worker.job_directory import (
    JobPaths,
    existing_job_directory,
    find_trial,
    finished_trials,
    stored_settings,
    write_evaluation,
)
from hctl_worker.job_prompts import load_job_prompts
from hctl_worker.perplexity import cross_entropy, read_passages
from hctl_worker.prompts import PromptSets
from hctl_worker.reporter import Listener, Reporter, guarded
from hctl_worker.scorers import SCORERS
from hctl_worker.settings import WorkerSettings
from hctl_worker.trials import Direction, Trial, describe_scores
from hctl_worker.workbench import load, score_baseline

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

DEFAULT_BATCH_SIZE = 16


def every_scorer(settings: WorkerSettings) -> list[tuple[str, Direction]]:
    """The job's scorers, then every other one that can run with these settings (reported)."""
    choices: list[tuple[str, Direction]] = [(c.name, c.optimization) for c in settings.scorers]
    chosen = {name for name, _ in choices}
    for name in SCORERS:
        if name in chosen or (
            name == "RefusalClassifier" and not settings.refusal_classifier.model
        ):
            continue
        choices.append((name, "report"))
    return choices


def capability_check(
    settings: WorkerSettings,
    paths: JobPaths,
    reporter: Reporter,
    loaded: LoadedModel,
    ablator: Ablator,
    trial: Trial,
    batch_size: int | None = None,
) -> EvaluationEvent:
    """Measure the trial against the original; report it as an event and a results file."""
    batch_size = batch_size or settings.batch_size or DEFAULT_BATCH_SIZE
    params = AblationParams.from_dict(trial.ablation)
    started = time.monotonic()
    with reporter.stage("evaluate", f"trial {trial.number} against the original") as stage:
        measures, notes = _held_out_text(settings, loaded, ablator, params, batch_size)
        stage.progress(1, 3, "held-out text")
        measures += _scores(settings, paths, loaded, ablator, params, batch_size, reporter)
        stage.progress(2, 3, "scorers")
        if settings.benchmarks:
            found, missing = _benchmarks(settings, loaded, ablator, params, batch_size)
            measures += found
            notes += missing
        event = EvaluationEvent(
            trial=trial.number,
            measures=measures,
            notes=notes,
            seconds=round(time.monotonic() - started, 3),
        )
        write_evaluation(paths, trial.number, event.model_dump(mode="json"))
        reporter.emit(event)
        stage.result = f"{len(measures)} measures"
    return event


def _held_out_text(settings, loaded, ablator, params, batch_size) -> tuple[list[Measure], list]:
    passages = read_passages(settings.evaluation_text)
    original = cross_entropy(loaded, passages, batch_size=max(1, batch_size // 4))
    with ablator.applied(params):
        edited = cross_entropy(loaded, passages, batch_size=max(1, batch_size // 4))
    where = Path(settings.evaluation_text).name if settings.evaluation_text else "held-out text"
    return [
        Measure(
            name=f"cross-entropy, {where} (nats/token)",
            original=original.nats,
            edited=edited.nats,
            better="lower",
        ),
        Measure(
            name=f"perplexity, {where}",
            original=original.perplexity,
            edited=edited.perplexity,
            better="lower",
        ),
    ], [f"{len(passages)} passages, {original.tokens} tokens predicted"]


def _scores(settings, paths, loaded, ablator, params, batch_size, reporter) -> list[Measure]:
    tables = ("good_evaluation_prompts", "bad_evaluation_prompts")
    found = load_job_prompts(
        settings, tables, paths.root, lambda note: reporter.log(note, level="warning")
    )
    prompts = PromptSets(
        good=[],
        bad=[],
        good_evaluation=found["good_evaluation_prompts"],
        bad_evaluation=found["bad_evaluation_prompts"],
    )
    scoring, evaluator, original = score_baseline(
        settings, loaded, prompts, batch_size, reporter, scorers=every_scorer(settings)
    )
    with ablator.applied(params):
        edited = scoring.score(evaluator.evaluate())
    return [
        Measure(
            name=name,
            original=original[name].value,
            edited=edited[name].value,
            of=edited[name].of,
            better="higher" if edited[name].direction == "maximize" else "lower",
        )
        for name in scoring.names
    ]


def _benchmarks(settings, loaded, ablator, params, batch_size) -> tuple[list[Measure], list]:
    tasks = ", ".join(settings.benchmarks)
    if not lm_eval_installed():
        return [], [f"lm-eval tasks not run ({tasks}): lm_eval is not installed ({INSTALL_HINT})"]
    try:
        original = run_benchmarks(
            loaded, settings.benchmarks, limit=settings.benchmark_limit, batch_size=batch_size
        )
        with ablator.applied(params):
            edited = run_benchmarks(
                loaded, settings.benchmarks, limit=settings.benchmark_limit, batch_size=batch_size
            )
    except Exception as error:  # lm-eval raises many kinds (unknown task, offline hub...)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [], [f"lm-eval tasks failed ({tasks}): {first}"]
    return [
        Measure(name=f"lm-eval {name}", original=original[name], edited=edited.get(name))
        for name in original
    ], []


def evaluate_job(job_dir: Path, number: int, listeners: Sequence[Listener] = ()) -> EvaluationEvent:
    """`hctl-worker evaluate`: the capability check of trial `number` of a job."""
    paths = existing_job_directory(job_dir)
    reporter = Reporter(paths, listeners)
    try:
        return guarded(reporter, lambda: _evaluate(paths, reporter, number))
    finally:
        reporter.close()


def _evaluate(paths: JobPaths, reporter: Reporter, number: int) -> EvaluationEvent:
    settings = stored_settings(paths)
    trial = find_trial(finished_trials(paths), number, paths.job_id)
    directions = load_cached_directions(paths)
    loaded = load(settings, reporter)
    ablator = Ablator(loaded, directions, row_normalization=settings.row_normalization)
    reporter.log(f"trial {trial.number}: {describe_scores(trial)}")
    return capability_check(settings, paths, reporter, loaded, ablator, trial)


__all__ = ["capability_check", "evaluate_job", "every_scorer"]
