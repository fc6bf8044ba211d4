"""The trials a study starts with, queued once per study.

Before the sampler draws anything itself, the study runs:

1. The canonical trials: classic abliteration (Arditi et al. 2024), the direction of one of the
   best-separating layers projected out of every layer's attention and MLP output at weight 1,
   one trial per direction. They are real trials (in the journal, the events and the front),
   marked with the origin "canonical", so if the classic edit removes the refusals the user has
   it, whatever the sampler does next.
2. Startup points drawn from priors (`priors.py`): half of the rest of the startup budget
   (`n_startup_trials`) from the measurements, a quarter from heretic's ranges. The last quarter
   is left to the sampler's own uniform draws over the whole space.

The points are queued with Optuna's `enqueue_trial`, each with a key. Queuing is idempotent: a
study that records the plan as queued (a study user attribute) is not queued again, and a point
whose key some trial already holds is skipped, so a resumed worker queues nothing twice. Two
workers starting on one study at the same moment may still both queue the plan; then each
duplicate is dropped when it is drawn (`superseded`), so every point runs once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from hctl_worker.priors import RefusalProfile, draw_heretic, draw_measured
from hctl_worker.search_space import SearchSpace

CANONICAL_DIRECTIONS = 3
CANONICAL = "canonical"

# Trial user attributes set on queued points (study.py reads ORIGIN into the trial record).
ORIGIN_ATTR = "origin"
KEY_ATTR = "planned"
# Study user attribute: the keys of the plan, once it was queued.
PLAN_ATTR = "startup_plan"


@dataclass(frozen=True)
class PlannedTrial:
    key: str  # unique in the study: "canonical:7", "measured:2", "heretic:0"
    params: dict[str, float | str]

    @property
    def source(self) -> str:
        return self.key.partition(":")[0]

    @property
    def user_attrs(self) -> dict[str, str]:
        attributes = {KEY_ATTR: self.key}
        if self.source == CANONICAL:
            attributes[ORIGIN_ATTR] = CANONICAL
        return attributes


def canonical_trials(space: SearchSpace, profile: RefusalProfile) -> list[PlannedTrial]:
    """Classic abliteration with the direction of each of the best-separating layers."""
    if "global" not in space.scopes:  # one direction for all layers is ruled out by settings
        points = [("per_layer", space.full_depth_point(None))]
    else:
        points = [
            (str(layer), space.full_depth_point(layer))
            for layer in profile.best_layers(CANONICAL_DIRECTIONS)
        ]
    return [
        PlannedTrial(f"{CANONICAL}:{name}", point)
        for name, point in points
        if space.contains(point)
    ]


def plan_startup(
    space: SearchSpace, profile: RefusalProfile, *, n_startup_trials: int, seed: int
) -> list[PlannedTrial]:
    """The canonical trials, then the startup points drawn from the priors (deterministic)."""
    plan = canonical_trials(space, profile)
    rest = max(0, n_startup_trials - len(plan))
    measured, heretic = (rest + 1) // 2, rest // 4
    rng = random.Random(seed)
    plan += [
        PlannedTrial(f"measured:{i}", draw_measured(profile, space, rng)) for i in range(measured)
    ]
    plan += [PlannedTrial(f"heretic:{i}", draw_heretic(space, rng)) for i in range(heretic)]
    return plan


def describe_plan(plan: list[PlannedTrial]) -> str:
    """One line for the log: what the study starts with."""
    canonical = [trial for trial in plan if trial.source == CANONICAL]
    directions = ", ".join(trial.key.partition(":")[2] for trial in canonical)
    counts = {
        source: sum(trial.source == source for trial in plan) for source in ("measured", "heretic")
    }
    return (
        f"first trials: {len(canonical)} canonical (classic abliteration at weight 1 on every "
        f"layer, direction of layer {directions or '-'}), {counts['measured']} drawn from the "
        f"measurements, {counts['heretic']} from heretic's ranges; then the sampler"
    )


def enqueue_once(study: optuna.Study, plan: list[PlannedTrial]) -> int:
    """Queue the planned trials the study does not hold yet; how many were queued."""
    if study.user_attrs.get(PLAN_ATTR) is not None:
        return 0
    held = {trial.user_attrs.get(KEY_ATTR) for trial in study.get_trials(deepcopy=False)} - {None}
    queued = 0
    for planned in plan:
        if planned.key in held:
            continue
        study.enqueue_trial(planned.params, user_attrs=planned.user_attrs)
        queued += 1
    study.set_user_attr(PLAN_ATTR, [planned.key for planned in plan])
    return queued


def superseded(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether this drawn trial repeats a planned point an earlier trial holds (queued twice by
    workers that started together); it is then dropped instead of run. An earlier trial that
    failed (its worker was stopped) does not count: its point is queued again and runs."""
    key = trial.user_attrs.get(KEY_ATTR)
    if key is None:
        return False
    return any(
        other.number < trial.number
        and other.user_attrs.get(KEY_ATTR) == key
        and other.state != TrialState.FAIL
        for other in study.get_trials(deepcopy=False)
    )


__all__ = [
    "CANONICAL",
    "PlannedTrial",
    "canonical_trials",
    "describe_plan",
    "enqueue_once",
    "plan_startup",
    "superseded",
]
