"""Test helpers: an evaluator and the job's scorers over plain prompt lists, as the worker builds
them (`build_scoring` from settings), and one call that scores the model as it is now."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hctl_worker.evaluation import EvaluationPrompts, Evaluator
from hctl_worker.model import LoadedModel
from hctl_worker.scorers import Scoring, build_scoring
from hctl_worker.settings import WorkerSettings
from hctl_worker.trials import Trial


def scoring_for(
    markers: Sequence[str] | None = None, *, kl_skip_threshold: float = 0.0, **settings: Any
) -> Scoring:
    """The scorers the settings choose (by default KeywordRate, KLDivergence, HarmlessRefusals)."""
    return build_scoring(
        WorkerSettings(
            refusal_markers=list(markers) if markers is not None else None,
            kl_skip_threshold=kl_skip_threshold,
            **settings,
        )
    )


def evaluator_for(
    loaded: LoadedModel,
    scoring: Scoring,
    *,
    good: Sequence[str],
    bad: Sequence[str],
    max_response_length: int,
    batch_size: int,
    **options: Any,
) -> Evaluator:
    """An evaluator for chat-templated texts (they stand for the user's words too)."""
    return Evaluator.for_scoring(
        loaded,
        scoring,
        harmless=EvaluationPrompts(list(good), list(good)),
        harmful=EvaluationPrompts(list(bad), list(bad)),
        max_response_length=max_response_length,
        batch_size=batch_size,
        **options,
    )


def scored(scoring: Scoring, evaluator: Evaluator) -> Trial:
    """The model as it is now, scored, as a trial record (number 0)."""
    return Trial(number=0, scores=scoring.score(evaluator.evaluate()))
