"""A finished trial, the Pareto front of many, and the rule that chooses one of them.

One record for one concept: the worker's search returns `Trial`s, the `trial` and `pareto`
events are built on it (`events.TrialEvent` is a `Trial`), and the controller's progress, tables,
picture and choice read it. This module is torch-free and optuna-free on purpose: both halves
import it.

A trial is numbered 1, 2, 3... in the order trials finished, as a user counts them; that number is
what trial events and every table show, and what `--trial` (and the `trial` setting) means.

The front and the choice read a trial's scores through `Trial.objectives()`, the scores the
search minimises in order, so neither depends on which scores there are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from pydantic import BaseModel, Field

# heretic's hint: above this KL divergence a model is usually damaged.
DEFAULT_KL_LIMIT = 0.5

ParamValue = float | int | str | bool


class Trial(BaseModel):
    """One finished trial of the search: what it tried, how it scored, how long it took."""

    number: int  # 1-based among finished trials, as a user counts them
    params: dict[str, ParamValue] = Field(default_factory=dict)
    kl: float
    refusals: int | None  # None when refusal counting was skipped (the KL was already too high)
    total_bad: int
    seconds: float = 0.0
    # Its evaluation stopped once it was behind the front (`pruning.py`): `refusals` is the count
    # so far, a lower bound, and the trial never enters the front.
    pruned: bool = False
    # The engine's own description of the edit (`AblationParams.to_dict()`), which the worker
    # keeps in its journal and results files to export the trial exactly. It is the worker's
    # business, so events and other serialisations leave it out.
    ablation: dict[str, float | None] = Field(default_factory=dict, exclude=True)
    # Where the point came from when it was not the sampler's own draw: "canonical" for classic
    # abliteration (one direction, every layer at weight 1), run before the search proper.
    origin: str | None = None

    def objectives(self) -> tuple[float, ...] | None:
        """The scores the search minimises, most important first; None when one is missing (or
        only bounded, as for a pruned trial)."""
        if self.refusals is None or self.pruned:
            return None
        return (float(self.refusals), self.kl)


TrialType = TypeVar("TrialType", bound=Trial)


def pareto_front(trials: Iterable[TrialType]) -> list[TrialType]:
    """The trials no other trial beats on every objective: fewest refusals first.

    In the order of their objectives (then their numbers), a trial is kept unless one kept
    before it is at least as good on every objective. With refusals and KL that is heretic's
    rule: sorted by refusals, then KL, a trial is kept when its KL is strictly below that of every
    trial before it. Trials missing a score (refusals skipped for a high KL) never make the front,
    nor do pruned ones (a trial on the front already beat them).
    """
    scored = sorted(
        ((objectives, trial) for trial in trials if (objectives := trial.objectives()) is not None),
        key=lambda pair: (pair[0], pair[1].number),
    )
    front: list[tuple[tuple[float, ...], TrialType]] = []
    for objectives, trial in scored:
        if not any(_at_least_as_good(kept, objectives) for kept, _ in front):
            front.append((objectives, trial))
    return [trial for _, trial in front]


def _at_least_as_good(first: Sequence[float], second: Sequence[float]) -> bool:
    return all(a <= b for a, b in zip(first, second, strict=True))


def best_within(trials: Iterable[TrialType], kl_limit: float) -> TrialType | None:
    """The fewest refusals among the scored trials whose KL is within the limit, then the lowest
    KL, then the earliest; None when no trial is within it."""
    within = [
        trial
        for trial in trials
        if trial.refusals is not None and not trial.pruned and trial.kl <= kl_limit
    ]
    if not within:
        return None
    return min(within, key=lambda trial: (trial.refusals, trial.kl, trial.number))


def choose(front: Sequence[TrialType], kl_limit: float = DEFAULT_KL_LIMIT) -> TrialType | None:
    """The automatic choice when nobody names a trial: the fewest refusals among the front's
    trials under the KL limit; when none is under it, the lowest KL (the least damaging)."""
    if not front:
        return None
    best = best_within(front, kl_limit)
    if best is not None:
        return best
    return min(front, key=lambda trial: (trial.kl, trial.number))


def find(trials: Iterable[TrialType], number: int) -> TrialType | None:
    """The trial with this number (as events and tables show it), if it finished."""
    return next((trial for trial in trials if trial.number == number), None)


__all__ = [
    "DEFAULT_KL_LIMIT",
    "ParamValue",
    "Trial",
    "best_within",
    "choose",
    "find",
    "pareto_front",
]
