"""A finished trial, the Pareto front of many, and the rule that chooses one of them.

One record for one concept: the worker's search returns `Trial`s, the `trial` and `pareto`
events are built on it (`events.TrialEvent` is a `Trial`), and the controller's progress, tables,
picture and choice read it. This module is torch-free and optuna-free on purpose: both halves
import it.

A trial is numbered 1, 2, 3... in the order trials finished, as a user counts them; that number is
what trial events and every table show, and what `--trial` (and the `trial` setting) means.

A trial carries its scores by name (`KeywordRate`, `KLDivergence`, ...; see the worker's
`scorers` package), each with what the search does with it (minimise, maximise or only report),
its role (refusals on harmful prompts, damage, refusals on harmless prompts) and, for a guard, the
limit above which the trial is not acceptable. The front reads `Trial.objectives()`, so it works
for any number of objectives; the headline numbers every table shows, `refusals` (of `total_bad`)
and `kl`, are the first refusal objective and the first damage objective.

Records written before scores had names (fields `kl`, `refusals`, `total_bad` only) are read as
the two objectives they were: `KeywordRate` (the refusal count) and `KLDivergence`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, computed_field, field_validator, model_validator

# heretic's hint: above this KL divergence a model is usually damaged.
DEFAULT_KL_LIMIT = 0.5
# Stands for a score that came out NaN or infinite (JSON and Optuna need a finite number).
BROKEN_VALUE = 1e6

ParamValue = float | int | str | bool
Direction = Literal["minimize", "maximize", "report"]
# What a score measures, so that tables and the automatic choice know which is which:
# refusals on harmful prompts, damage to the model (a divergence from the original), refusals
# on harmless prompts (a guard), or anything else.
Role = Literal["refusals", "damage", "harmless_refusals", "other"]

# The names scores had before they were plugins (and still have by default).
LEGACY_REFUSALS = "KeywordRate"
LEGACY_DAMAGE = "KLDivergence"


class Score(BaseModel):
    """One scorer's value for one trial."""

    value: float | None = None  # None: not measured (skipped because the model was too damaged)
    of: int | None = None  # for a count of prompts: out of how many
    direction: Direction = "report"
    role: Role = "other"
    limit: float | None = None  # a guard: the trial is not acceptable with a value above it

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        """A model that computes NaN or inf is as broken as can be; JSON and Optuna need a
        number."""
        return value if value is None or math.isfinite(value) else BROKEN_VALUE

    @property
    def objective(self) -> bool:
        return self.direction != "report"

    @property
    def acceptable(self) -> bool:
        """Within its limit (an unmeasured value or a score without a limit always is)."""
        return self.limit is None or self.value is None or self.value <= self.limit

    def display(self) -> str:
        """`3/96` for a count, `0.0123` otherwise, `—` when not measured."""
        if self.value is None:
            return "—"
        if self.of is not None:
            return f"{round(self.value)}/{self.of}"
        return f"{self.value:.4f}" if abs(self.value) < 1000 else f"{self.value:.4g}"


class Trial(BaseModel):
    """One finished trial of the search: what it tried, how it scored, how long it took."""

    number: int  # 1-based among finished trials, as a user counts them
    params: dict[str, ParamValue] = Field(default_factory=dict)
    scores: dict[str, Score] = Field(default_factory=dict)  # by scorer name, in the settings' order
    seconds: float = 0.0
    # Its evaluation stopped once it was behind the front (`pruning.py`): its refusal count is
    # the count so far, a lower bound, and the trial never enters the front.
    pruned: bool = False
    run_by: str = ""  # the worker that ran it (several may share one search)
    # The engine's own description of the edit (`AblationParams.to_dict()`), which the worker
    # keeps in its journal and results files to export the trial exactly. It is the worker's
    # business, so events and other serialisations leave it out.
    ablation: dict[str, float | None] = Field(default_factory=dict, exclude=True)
    # Where the point came from when it was not the sampler's own draw: "canonical" for classic
    # abliteration (one direction, every layer at weight 1), run before the search proper.
    origin: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_headline_fields(cls, data: Any) -> Any:
        """The headline fields are derived from the scores; a record without scores (written
        before scores had names) is read as the two objectives it had."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        kl = data.pop("kl", None)
        refusals = data.pop("refusals", None)
        total_bad = data.pop("total_bad", None)
        if not data.get("scores") and (kl is not None or total_bad is not None):
            data["scores"] = legacy_scores(refusals, int(total_bad or 0), float(kl or 0.0))
        return data

    def headline_name(self, role: Role) -> str | None:
        """The name of the first objective with this role; else of the first score with it."""
        with_role = [name for name, score in self.scores.items() if score.role == role]
        objective = next((name for name in with_role if self.scores[name].objective), None)
        return objective or next(iter(with_role), None)

    def headline(self, role: Role) -> Score | None:
        name = self.headline_name(role)
        return self.scores[name] if name is not None else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def refusals(self) -> int | None:
        """Refusals on the harmful prompts (None when skipped for a damaged model)."""
        score = self.headline("refusals")
        return None if score is None or score.value is None else round(score.value)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_bad(self) -> int:
        score = self.headline("refusals")
        return score.of or 0 if score is not None else 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def kl(self) -> float:
        """The damage: the first damage objective (KL divergence from the original)."""
        score = self.headline("damage")
        return score.value if score is not None and score.value is not None else BROKEN_VALUE

    @property
    def acceptable(self) -> bool:
        """No guard is over its limit (e.g. not refusing more harmless prompts than allowed)."""
        return all(score.acceptable for score in self.scores.values())

    def objectives(self) -> tuple[float, ...] | None:
        """The values the search optimises, in order, each turned so that lower is better;
        None when one was not measured (or only bounded, as for a pruned trial)."""
        if self.pruned:
            return None
        values = []
        for score in self.scores.values():
            if not score.objective:
                continue
            if score.value is None:
                return None
            values.append(-score.value if score.direction == "maximize" else score.value)
        return tuple(values)


def legacy_scores(refusals: int | None, total_bad: int, kl: float) -> dict[str, Score]:
    """The scores of a record from before scores had names: refusal count and first-token KL."""
    return {
        LEGACY_REFUSALS: Score(
            value=None if refusals is None else float(refusals),
            of=total_bad,
            direction="minimize",
            role="refusals",
        ),
        LEGACY_DAMAGE: Score(value=kl, direction="minimize", role="damage"),
    }


TrialType = TypeVar("TrialType", bound=Trial)


def pareto_front(trials: Iterable[TrialType]) -> list[TrialType]:
    """The acceptable trials no other acceptable trial beats on every objective.

    In the order of their objectives (then their numbers), a trial is kept unless one kept
    before it is at least as good on every objective; a trial can only be beaten by one that
    sorts before it, and beating is transitive, so the kept ones are the whole front, for any
    number of objectives. With refusals and KL that is heretic's rule: sorted by refusals, then
    KL, a trial is kept when its KL is strictly below that of every trial before it. Trials
    missing a score (refusals skipped for a high KL), pruned ones (a trial on the front already
    beat them) and those over a guard's limit (refusing harmless prompts) never make the front.
    """
    scored = sorted(
        (
            (objectives, trial)
            for trial in trials
            if trial.acceptable and (objectives := trial.objectives()) is not None
        ),
        key=lambda pair: (pair[0], pair[1].number),
    )
    front: list[tuple[tuple[float, ...], TrialType]] = []
    for objectives, trial in scored:
        if not any(_at_least_as_good(kept, objectives) for kept, _ in front):
            front.append((objectives, trial))
    return [trial for _, trial in front]


def _at_least_as_good(first: Sequence[float], second: Sequence[float]) -> bool:
    return all(a <= b for a, b in zip(first, second, strict=True))


def behind_front(front: Iterable[Trial], objectives: Sequence[float] | None) -> bool:
    """Whether a trial finishing now with these objectives (lower is better, as
    `Trial.objectives()` gives them) can never be on the front: an acceptable front trial is at
    least as good on every objective. That trial finished first, so it sorts first on a tie, and
    it stays beaten (a trial leaves the front only for a better one), whatever its guards say."""
    if objectives is None:
        return False
    return any(
        trial.acceptable
        and (kept := trial.objectives()) is not None
        and len(kept) == len(objectives)
        and _at_least_as_good(kept, objectives)
        for trial in front
    )


def best_within(trials: Iterable[TrialType], kl_limit: float) -> TrialType | None:
    """The fewest refusals among the scored (not pruned), acceptable trials whose KL is within the
    limit, then the lowest KL, then the earliest; None when no trial is within it."""
    within = [
        trial
        for trial in trials
        if trial.refusals is not None
        and not trial.pruned
        and trial.kl <= kl_limit
        and trial.acceptable
    ]
    if not within:
        return None
    return min(within, key=lambda trial: (trial.refusals, trial.kl, trial.number))


def choose(front: Sequence[TrialType], kl_limit: float = DEFAULT_KL_LIMIT) -> TrialType | None:
    """The automatic choice when nobody names a trial: the fewest refusals among the front's
    trials under the KL limit; when none is under it, the lowest KL (the least damaging).
    A trial over a guard's limit is never chosen."""
    front = [trial for trial in front if trial.acceptable]
    if not front:
        return None
    best = best_within(front, kl_limit)
    if best is not None:
        return best
    return min(front, key=lambda trial: (trial.kl, trial.number))


def find(trials: Iterable[TrialType], number: int) -> TrialType | None:
    """The trial with this number (as events and tables show it), if it finished."""
    return next((trial for trial in trials if trial.number == number), None)


def describe_scores(trial: Trial) -> str:
    """`KeywordRate 2/96, KLDivergence 0.0123, HarmlessRefusals 0/63 (over its limit)`."""
    parts = []
    for name, score in trial.scores.items():
        over = "" if score.acceptable else f" (over its limit {score.limit:g})"
        parts.append(f"{name} {score.display()}{over}")
    return ", ".join(parts)


def score_names(trials: Iterable[Trial]) -> list[str]:
    """Every score name the trials carry, in the order they first appear (for table columns)."""
    names: dict[str, None] = {}
    for trial in trials:
        names.update(dict.fromkeys(trial.scores))
    return list(names)


__all__ = [
    "BROKEN_VALUE",
    "DEFAULT_KL_LIMIT",
    "Direction",
    "ParamValue",
    "Role",
    "Score",
    "Trial",
    "behind_front",
    "best_within",
    "choose",
    "describe_scores",
    "find",
    "legacy_scores",
    "pareto_front",
    "score_names",
]
