"""The Optuna search: which edits to try, the resumable study, and the Pareto front.

Two objectives, both minimised: the refusal count on the harmful evaluation prompts and the KL
divergence of the first-token distribution on the harmless ones (heretic HEAD's objectives, raw).
The sampler is multivariate TPE, with `n_startup_trials` random trials first.

The study lives in a JournalStorage file in the job directory. A worker that is killed and started
again on the same job directory continues the same study: finished trials are kept, a trial that
was running when the worker died is marked failed and its parameters are tried again, and `n_trials`
counts finished trials, so raising it adds trials to a finished study.

Where the search looks (`SearchSpace.measured`): heretic's fixed ranges put the direction in the
40-90 % band of the layers and the kernel's peak in the last 40 %, so the first layers are almost
never edited. Models that write their refusal early (small ones, and some large ones) then cannot be
abliterated. The measured space moves the lower ends of those ranges down to the first layer whose
harmful/harmless separation reaches half of its maximum (the "onset"), and lets the kernel reach
back to it; where the onset is inside heretic's ranges, heretic's ranges are kept unchanged.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from hctl_worker.ablation import AblationParams

STUDY_NAME = "hctl"
ONSET_FRACTION = 0.5
BROKEN_KL = 1e6  # stands for a KL that came out NaN or infinite  # a layer "separates" once it reaches this fraction of the best separation

Scope = Literal["global", "per_layer"]


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.high < self.low:
            raise ValueError(f"empty range [{self.low}, {self.high}]")


@dataclass(frozen=True)
class SearchSpace:
    """The parameter ranges of one model. Parameter names follow heretic's."""

    n_layers: int
    components: tuple[str, ...]
    scopes: tuple[Scope, ...]
    direction_index: Range
    max_weight: Mapping[str, Range]
    max_weight_position: Range
    min_weight_distance: Range
    onset: int | None = None  # the first layer that separates, when measured

    @classmethod
    def heretic(
        cls,
        n_layers: int,
        components: Sequence[str],
        scopes: Sequence[Scope] = ("global", "per_layer"),
    ) -> SearchSpace:
        """heretic's fixed ranges (spec section 3)."""
        last = max(n_layers - 1, 0)
        return cls(
            n_layers=n_layers,
            components=tuple(components),
            scopes=tuple(scopes),
            direction_index=Range(0.4 * last, 0.9 * last),
            max_weight={component: _weight_range(component) for component in components},
            max_weight_position=Range(0.6 * last, float(last)),
            min_weight_distance=Range(1.0, max(0.6 * last, 1.0)),
        )

    @classmethod
    def measured(
        cls,
        separation: Sequence[float],
        components: Sequence[str],
        scopes: Sequence[Scope] = ("global", "per_layer"),
    ) -> SearchSpace:
        """heretic's ranges, reaching down to where the measured separation begins.

        `separation` has one entry per hidden state: index 0 is the embeddings, index k + 1 the
        output of layer k (as `directions.layer_separation` returns it).
        """
        n_layers = len(separation) - 1
        base = cls.heretic(n_layers, components, scopes)
        onset = separation_onset(separation)
        if onset is None:
            return base
        last = max(n_layers - 1, 0)
        return cls(
            n_layers=n_layers,
            components=base.components,
            scopes=base.scopes,
            direction_index=Range(min(base.direction_index.low, onset), base.direction_index.high),
            max_weight=base.max_weight,
            max_weight_position=Range(
                min(base.max_weight_position.low, onset), base.max_weight_position.high
            ),
            # From a peak at the last layer the kernel must reach back to the onset layer.
            min_weight_distance=Range(1.0, max(base.min_weight_distance.high, last - onset + 1.0)),
            onset=onset,
        )

    def sample(self, trial: optuna.Trial) -> dict[str, float | str]:
        """Draw one point; every parameter is always sampled (multivariate TPE prefers that)."""
        values: dict[str, float | str] = {}
        if len(self.scopes) > 1:
            values["direction_scope"] = trial.suggest_categorical("direction_scope", self.scopes)
        else:
            values["direction_scope"] = self.scopes[0]
        values["direction_index"] = _suggest(trial, "direction_index", self.direction_index)
        for component in self.components:
            values[f"{component}.max_weight"] = _suggest(
                trial, f"{component}.max_weight", self.max_weight[component]
            )
            values[f"{component}.max_weight_position"] = _suggest(
                trial, f"{component}.max_weight_position", self.max_weight_position
            )
            values[f"{component}.min_weight"] = _suggest(
                trial, f"{component}.min_weight", Range(0.0, 1.0)
            )
            values[f"{component}.min_weight_distance"] = _suggest(
                trial, f"{component}.min_weight_distance", self.min_weight_distance
            )
        return values

    def describe(self) -> str:
        where = f"refusal separates from layer {self.onset}" if self.onset is not None else ""
        return (
            f"{self.n_layers} layers{'; ' + where if where else ''}; direction "
            f"{self.direction_index.low:.2f}-{self.direction_index.high:.2f}, kernel peak "
            f"{self.max_weight_position.low:.2f}-{self.max_weight_position.high:.2f}, reach "
            f"{self.min_weight_distance.low:.2f}-{self.min_weight_distance.high:.2f}"
        )


def _weight_range(component: str) -> Range:
    # heretic HEAD lets the MLP weight go below zero and clamps it, so TPE can switch MLP edits off.
    return Range(-0.25, 1.5) if component == "mlp" else Range(0.8, 1.5)


def _suggest(trial: optuna.Trial, name: str, bounds: Range) -> float:
    if bounds.high == bounds.low:
        return bounds.low
    return trial.suggest_float(name, bounds.low, bounds.high)


def separation_onset(separation: Sequence[float]) -> int | None:
    """The first layer whose output separates at least ONSET_FRACTION as well as the best one."""
    per_layer = [float(value) for value in list(separation)[1:]]
    finite = [value for value in per_layer if math.isfinite(value)]
    if not finite or max(finite) <= 0:
        return None
    threshold = ONSET_FRACTION * max(finite)
    return next(index for index, value in enumerate(per_layer) if value >= threshold)


def to_ablation_params(
    values: Mapping[str, float | str], components: Iterable[str]
) -> AblationParams:
    """The engine's parameters for one sampled point."""
    from hctl_worker.ablation import AblationParams, ComponentKernel

    kernels = {}
    for component in components:
        max_weight = max(0.0, float(values[f"{component}.max_weight"]))
        kernels[component] = ComponentKernel(
            max_weight=max_weight,
            max_weight_position=float(values[f"{component}.max_weight_position"]),
            # Sampled as a fraction of the peak, stored as an absolute weight (as heretic does).
            min_weight=float(values[f"{component}.min_weight"]) * max_weight,
            min_weight_distance=float(values[f"{component}.min_weight_distance"]),
        )
    per_layer = values.get("direction_scope") == "per_layer"
    return AblationParams(
        direction_index=None if per_layer else float(values["direction_index"]),
        kernels=kernels,
    )


@dataclass(frozen=True)
class Outcome:
    """What evaluating one point gave (the engine's `Score`, as the search needs it)."""

    kl: float
    refusals: int | None  # None: skipped because the KL was already too high
    total_bad: int
    seconds: float = 0.0


@dataclass(frozen=True)
class TrialResult:
    number: int  # 1-based among finished trials, as a user counts them
    params: dict[str, float | str]
    kl: float
    refusals: int | None
    total_bad: int
    seconds: float
    ablation: dict[str, Any] = field(default_factory=dict)

    @property
    def refusal_skipped(self) -> bool:
        return self.refusals is None


def open_study(journal: Path, *, seed: int, n_startup_trials: int) -> optuna.Study:
    """The job's study, created or continued. The sampler's seed moves on with every stored trial
    so a continued search does not replay the random startup points it already tried."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(
        JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal)))
    )
    existing = 0
    with contextlib.suppress(KeyError):  # a new job has no study yet
        existing = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=n_startup_trials,
        n_ei_candidates=128,
        multivariate=True,
        seed=seed + existing,
    )
    return optuna.create_study(
        storage=storage,
        sampler=sampler,
        study_name=STUDY_NAME,
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )


def recover_interrupted(study: optuna.Study) -> int:
    """Mark trials left running by a killed worker as failed and queue their points again."""
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(dict(trial.params), skip_if_exists=False)
        recovered += 1
    return recovered


def finished_trials(study: optuna.Study) -> list[TrialResult]:
    """The finished trials in the order they finished."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    results = [_result(trial) for trial in trials if "number" in trial.user_attrs]
    return sorted(results, key=lambda result: result.number)


def _result(trial: FrozenTrial) -> TrialResult:
    attributes = trial.user_attrs
    return TrialResult(
        number=int(attributes["number"]),
        params=dict(attributes.get("params", trial.params)),
        kl=float(attributes["kl"]),
        refusals=attributes["refusals"],
        total_bad=int(attributes["total_bad"]),
        seconds=float(attributes.get("seconds", 0.0)),
        ablation=dict(attributes.get("ablation", {})),
    )


def run_search(
    study: optuna.Study,
    space: SearchSpace,
    evaluate: Callable[[dict[str, float | str]], Outcome],
    *,
    n_trials: int,
    on_trial: Callable[[TrialResult], None] | None = None,
    describe: Callable[[dict[str, float | str]], dict[str, Any]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[TrialResult]:
    """Run trials until `n_trials` have finished (counting those from earlier runs).

    `evaluate` gets the sampled point; `describe` turns it into what the trial stores for export
    (the engine's `AblationParams.to_dict()`). A trial that raises is marked failed, then the error
    goes up: an interrupted trial is never counted.
    """
    done = len(finished_trials(study))
    while done < n_trials:
        trial = study.ask()
        started = clock()
        try:
            values = space.sample(trial)
            outcome = evaluate(values)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        done += 1
        result = TrialResult(
            number=done,
            params=values,
            # A model that computes NaN or inf is as broken as can be; JSON and Optuna need a number.
            kl=outcome.kl if math.isfinite(outcome.kl) else BROKEN_KL,
            refusals=outcome.refusals,
            total_bad=outcome.total_bad,
            seconds=outcome.seconds or (clock() - started),
            ablation=describe(values) if describe else {},
        )
        for key, value in (
            ("number", result.number),
            ("params", result.params),
            ("kl", result.kl),
            ("refusals", result.refusals),
            ("total_bad", result.total_bad),
            ("seconds", result.seconds),
            ("ablation", result.ablation),
        ):
            trial.set_user_attr(key, value)
        refusals = result.refusals if result.refusals is not None else result.total_bad
        study.tell(trial, [float(refusals), float(result.kl)])
        if on_trial is not None:
            on_trial(result)
    return finished_trials(study)


def pareto_front(results: Iterable[TrialResult]) -> list[TrialResult]:
    """The trials no other trial beats on both refusals and KL: fewest refusals first.

    Sorted by refusals, then KL; a trial is kept when its KL is strictly below that of every trial
    before it (heretic v1.4's rule, the same order as HEAD's lexicographic one). Trials whose
    refusals were skipped for a high KL never make the front.
    """
    scored = sorted(
        (result for result in results if result.refusals is not None),
        key=lambda result: (result.refusals, result.kl, result.number),
    )
    front: list[TrialResult] = []
    for result in scored:
        if not front or result.kl < front[-1].kl:
            front.append(result)
    return front


def choose(front: Sequence[TrialResult], index: int) -> TrialResult:
    """The front's trial at `index` (0 = fewest refusals); IndexError names the valid range."""
    if not front:
        raise IndexError("the Pareto front is empty")
    if not 0 <= index < len(front):
        raise IndexError(f"trial index {index} is outside the Pareto front (0-{len(front) - 1})")
    return front[index]
