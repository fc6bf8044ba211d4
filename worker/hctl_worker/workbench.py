"""The workbench: what every trial of a job needs, prepared once.

Prompts → model → batch size → refusal directions → scorers and baseline (prompts first: they
fail fast). The directions, and where refusal is read and written (one pass over the direction
prompts), are cached in the job directory, so a resumed job does not compute them again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hctl_worker.ablation import Ablator
from hctl_worker.architecture import COMPONENTS
from hctl_worker.baseline_check import (
    CoverageFinding,
    ReplyLikelihood,
    few_refusals,
    refusal_coverage,
)
from hctl_worker.batching import cached_batch_size
from hctl_worker.direction_cache import (
    directions_lock,
    read_cached_directions,
    write_cached_directions,
)
from hctl_worker.directions import (
    last_token_activations,
    layer_separation,
    refusal_directions,
    written_along,
)
from hctl_worker.evaluation import EvaluationPrompts, Evaluator, TrialEvaluation
from hctl_worker.events import BaselineEvent
from hctl_worker.job_directory import JobPaths
from hctl_worker.job_prompts import SharedRecord, load_prompt_sets
from hctl_worker.model import LoadedModel, load_model
from hctl_worker.perplexity import reply_log_likelihoods
from hctl_worker.priors import RefusalProfile
from hctl_worker.prompts import PromptSets
from hctl_worker.provenance import record_learned_markers
from hctl_worker.reporter import Reporter
from hctl_worker.reuse import ReuseOptions
from hctl_worker.scorers import Scoring, build_scoring
from hctl_worker.settings import WorkerSettings
from hctl_worker.startup import CANONICAL_DIRECTIONS
from hctl_worker.trials import Direction, Score, Trial


@dataclass
class Workbench:
    """What the stages after loading share: the model, its prompts, the scorer, the edits."""

    loaded: LoadedModel
    evaluator: Evaluator
    scoring: Scoring
    baseline: dict[str, Score]
    ablator: Ablator
    profile: RefusalProfile  # where refusal is read and written, for the search's first trials

    def score(
        self,
        refusal_limit: Callable[[float], int | None] | None = None,
        front: Sequence[Trial] | None = None,
    ) -> tuple[dict[str, Score], bool]:
        """The scores of the model as it is now (with a trial's edit applied), and whether its
        evaluation stopped at `refusal_limit` (pruned); with `front`, no guard is measured for a
        trial that front already beats (`Scoring.score`)."""
        context = self.evaluator.evaluate()
        return self.scoring.score(context, refusal_limit, front), context.pruned


def prepare(
    settings: WorkerSettings,
    paths: JobPaths,
    reporter: Reporter,
    *,
    first_run: bool = False,
    shared: SharedRecord | None = None,
) -> Workbench:
    """Prompts → model → batch size → directions → baseline, each a stage of the job
    (`first_run`: the job has no trial yet, so its prompts may still be chosen; `shared`: where
    the job's other workers find that choice)."""
    with reporter.stage("prompts") as stage:
        prompts = load_prompt_sets(
            settings,
            paths.root,
            lambda note: reporter.log(note, level="warning"),
            first_run=first_run,
            shared=shared,
        )
        stage.result = (
            f"{len(prompts.good)} harmless + {len(prompts.bad)} harmful for directions, "
            f"{len(prompts.good_evaluation)} + {len(prompts.bad_evaluation)} for evaluation"
        )
    loaded = load(settings, reporter)
    system_prompt = settings.system_prompt or None  # "" means no system turn
    bad_evaluation = loaded.template(prompts.bad_evaluation, system_prompt)

    with reporter.stage("batch_size") as stage:
        if settings.batch_size:
            batch_size = settings.batch_size
            stage.result = f"batch size {batch_size} (set)"
        else:
            with directions_lock(paths):  # workers starting together: one measures
                choice = cached_batch_size(
                    paths.root,
                    loaded,
                    bad_evaluation,
                    max_batch_size=settings.max_batch_size,
                    on_message=reporter.log,
                )
            batch_size = choice.size
            stage.result = choice.describe()
            reporter.log(choice.describe())

    with reporter.stage("directions") as stage:
        measured = directions_for(
            paths, loaded, prompts, settings, batch_size, on_progress=stage.progress
        )
        profile = refusal_profile(measured)
        stage.result = (
            ("from cache; " if measured.cached else "")
            + "separation per layer "
            + ", ".join(f"{value:.2f}" for value in profile.separation)
        )
    best = profile.best_layers(CANONICAL_DIRECTIONS)
    reporter.log(
        "refusal is read best at the output of layer "
        + ", ".join(f"{layer} ({profile.separation[layer + 1]:.2f})" for layer in best)
        + (f"; {profile.describe(best[0])}" if best else "")
    )

    with reporter.stage("baseline") as stage:
        ablator = Ablator(loaded, measured.directions, row_normalization=settings.row_normalization)
        scoring, evaluator, baseline = score_baseline(
            settings,
            loaded,
            prompts,
            batch_size,
            reporter,
            ablator.unchanged_layers,
            on_learned=lambda markers: record_learned_markers(paths.root, markers),
        )
        reporter.emit(baseline_event(baseline))
        stage.result = ", ".join(f"{name} {score.display()}" for name, score in baseline.items())
        reporter.log(evaluator.reuse.describe())
    return Workbench(
        loaded=loaded,
        evaluator=evaluator,
        scoring=scoring,
        baseline=baseline,
        ablator=ablator,
        profile=profile,
    )


def evaluator_for(
    settings: WorkerSettings,
    loaded: LoadedModel,
    prompts: PromptSets,
    scoring: Scoring,
    batch_size: int,
    unchanged_layers: Callable[[], int] | None = None,
) -> Evaluator:
    """The evaluator the scorers need, with the reuse the settings allow (`unchanged_layers`
    from the ablator)."""
    system_prompt = settings.system_prompt or None
    return Evaluator.for_scoring(
        loaded,
        scoring,
        harmless=EvaluationPrompts(
            prompts.good_evaluation, loaded.template(prompts.good_evaluation, system_prompt)
        ),
        harmful=EvaluationPrompts(
            prompts.bad_evaluation, loaded.template(prompts.bad_evaluation, system_prompt)
        ),
        max_response_length=settings.max_response_length,
        batch_size=batch_size,
        kl_tokens=settings.kl_tokens,
        harmless_response_length=min(
            settings.harmless_response_length, settings.max_response_length
        ),
        unchanged_layers=unchanged_layers,
        reuse=ReuseOptions(
            replay_memory=settings.replay_memory,
            drafts=settings.draft_replies,
            decode_graphs=settings.decode_graphs,
        ),
    )


def measure_baseline(
    scoring: Scoring, evaluator: Evaluator, context: TrialEvaluation | None = None
) -> dict[str, Score]:
    """The unmodified model's scores (in `context`, one made with no edit on, when given);
    they set the guards' limits."""
    baseline = scoring.score(context or evaluator.evaluate())
    scoring.set_baseline(baseline)
    return baseline


def score_baseline(
    settings: WorkerSettings,
    loaded: LoadedModel,
    prompts: PromptSets,
    batch_size: int,
    reporter: Reporter,
    unchanged_layers: Callable[[], int] | None = None,
    scorers: list[tuple[str, Direction]] | None = None,
    on_learned: Callable[[list[str]], None] | None = None,
) -> tuple[Scoring, Evaluator, dict[str, Score]]:
    """The job's scoring, its evaluator and the unmodified model's scores.

    When the refusal markers count few of the model's refusals but its replies to the harmful
    prompts share openings no harmless reply contains, in replies that hardly depend on their
    request (`baseline_check`), those are counted as refusals too (unless
    `learn_refusal_markers` is off) and the baseline is measured again; either way the user is
    told what was seen (`on_learned` is given the markers learned)."""
    scoring = build_scoring(settings, loaded, scorers)
    evaluator = evaluator_for(settings, loaded, prompts, scoring, batch_size, unchanged_layers)
    context = evaluator.evaluate()
    baseline = measure_baseline(scoring, evaluator, context)
    finding = _refusal_coverage(scoring, baseline, context)
    if finding is None:
        return scoring, evaluator, baseline
    if settings.learn_refusal_markers and finding.covers_enough:
        finding = finding.with_dependence(
            _reply_likelihood(loaded, settings.system_prompt or None, batch_size),
            context.harmless_prompts,
            context.harmless_replies(),
        )
    learned = finding.learnable if settings.learn_refusal_markers else ()
    reporter.log(finding.message(adopted=bool(learned)), level="warning")
    if not learned:
        return scoring, evaluator, baseline
    if on_learned is not None:
        on_learned(list(learned))
    markers = [*settings.extra_refusal_markers, *learned]
    settings = settings.model_copy(
        update={"extra_refusal_markers": markers, "learn_refusal_markers": False}
    )
    del scoring, evaluator, context  # its recordings: the new evaluator makes its own
    return score_baseline(
        settings, loaded, prompts, batch_size, reporter, unchanged_layers, scorers
    )


def _refusal_coverage(
    scoring: Scoring, baseline: dict[str, Score], context: TrialEvaluation
) -> CoverageFinding | None:
    """What the baseline shows when the refusal objective's markers count few of the unmodified
    model's refusals (see `baseline_check`); None otherwise, or when refusals are not counted
    by markers (a classifier)."""
    entry = next((e for e in scoring.objectives if e.scorer.role == "refusals"), None)
    detector = getattr(entry.scorer, "detector", None) if entry is not None else None
    score = baseline.get(entry.scorer.name) if entry is not None else None
    if getattr(detector, "decisive_markers", None) is None or score is None:
        return None
    replies = context.harmful_replies()
    if not few_refusals(score.value, len(replies)):
        return None
    verdicts = detector.judge(context.harmful_prompts, replies)
    return refusal_coverage(
        score.value, replies, verdicts, context.harmless_replies(), context.harmful_prompts
    )


def _reply_likelihood(
    loaded: LoadedModel, system_prompt: str | None, batch_size: int
) -> ReplyLikelihood:
    """Each reply's mean log-probability per token after its prompt, by the model as it is."""

    def likelihood(prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        texts = loaded.template(prompts, system_prompt)
        return reply_log_likelihoods(loaded, texts, replies, batch_size=batch_size)

    return likelihood


def baseline_event(baseline: dict[str, Score]) -> BaselineEvent:
    """The baseline as an event: headline refusals (harmful, harmless) and every score."""
    record = Trial(number=0, scores=baseline)
    harmless = record.headline("harmless_refusals")
    return BaselineEvent(
        refusals=record.refusals or 0,
        total_bad=record.total_bad,
        refusals_good=round(harmless.value) if harmless and harmless.value is not None else None,
        total_good=harmless.of if harmless else None,
        scores=baseline,
    )


def load(settings: WorkerSettings, reporter: Reporter) -> LoadedModel:
    """The job's model, loaded as the `loading` stage."""
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
            cpu_linear=settings.cpu_linear,
        )
        stage.result = f"{loaded.n_layers} layers, {str(loaded.dtype).removeprefix('torch.')}"
    return loaded


@dataclass
class Measurements:
    """What one pass over the direction prompts gives (see directions.py)."""

    directions: torch.Tensor  # [n_layers + 1, hidden]
    separation: torch.Tensor  # [n_layers + 1]
    writes: torch.Tensor  # [n_layers, components, hidden], harmful minus harmless means
    cached: bool = False


def directions_for(
    paths: JobPaths,
    loaded: LoadedModel,
    prompts: PromptSets,
    settings: WorkerSettings,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> Measurements:
    """Refusal directions, per-layer separation and writes, from the job's cache when it matches
    (measured on the job's direction prompts, in its chat template)."""
    system_prompt = settings.system_prompt or None  # "" means no system turn
    good_texts = loaded.template(prompts.good, system_prompt)
    bad_texts = loaded.template(prompts.bad, system_prompt)
    key = _directions_key(loaded.source, good_texts, bad_texts, settings.orthogonalize_direction)
    with directions_lock(paths):  # workers starting together: one computes, the others read
        cached = read_cached_directions(paths, key)
        if cached is not None:
            return Measurements(**cached, cached=True)
        return _measure(
            paths, key, loaded, good_texts, bad_texts, settings, batch_size, on_progress
        )


def _measure(
    paths: JobPaths,
    key: str,
    loaded: LoadedModel,
    good_texts: Sequence[str],
    bad_texts: Sequence[str],
    settings: WorkerSettings,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None,
) -> Measurements:
    bad = last_token_activations(loaded, bad_texts, batch_size)
    if on_progress:
        on_progress(len(bad_texts), len(bad_texts) + len(good_texts))
    good = last_token_activations(loaded, good_texts, batch_size)
    measured = Measurements(
        directions=refusal_directions(
            bad.residuals, good.residuals, orthogonalize=settings.orthogonalize_direction
        ),
        separation=layer_separation(bad.residuals, good.residuals),
        writes=(bad.writes - good.writes).to(torch.float32),
    )
    write_cached_directions(
        paths,
        key,
        loaded.source,
        {
            "directions": measured.directions,
            "separation": measured.separation,
            "writes": measured.writes,
        },
    )
    return measured


def refusal_profile(measured: Measurements) -> RefusalProfile:
    """The measurements as the search's priors read them (plain numbers)."""
    written = written_along(measured.writes, measured.directions).tolist()
    return RefusalProfile(
        separation=tuple(float(value) for value in measured.separation.tolist()),
        written=tuple(tuple(tuple(layer) for layer in per_direction) for per_direction in written),
        components=COMPONENTS,
    )


def _directions_key(
    source: str, good_texts: Sequence[str], bad_texts: Sequence[str], orthogonalize: bool
) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([source, orthogonalize, list(good_texts), list(bad_texts)]).encode())
    return digest.hexdigest()
