"""The Optuna study: the resumable record of the search and the loop that runs its trials.

The objectives are the scorers the settings mark "minimize" or "maximize", in their order (see
`scorers`); by default the refusal count on the harmful evaluation prompts and the KL divergence
of the first-token distribution on the harmless ones, both minimised (heretic HEAD's objectives,
raw). A count goes to Optuna as a count, as it always did, so a journal from before scorers had
names continues with the same numbers. A guard with a limit (the harmless refusals) is an Optuna
constraint: the sampler learns to stay out of the region where the model refuses harmless
prompts, and the objectives stay what they measure (a penalty would mix the two and put
penalised trials on the front). The sampler is multivariate TPE, with `n_startup_trials` random
trials first. Where it samples is the search space's business (`search_space.py`).

The study lives in a JournalStorage file in the job directory. A worker that is killed and started
again on the same job directory continues the same study: finished trials are kept, a trial that
was running when the worker died is marked failed and its parameters are tried again, and `n_trials`
counts finished trials, so raising it adds trials to a finished study. Each finished trial is a
`trials.Trial`, numbered 1, 2, 3... in the order trials finished.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from hctl_worker.errors import SettingsError
from hctl_worker.trials import BROKEN_VALUE, Direction, Score, Trial

if TYPE_CHECKING:
    from hctl_worker.search_space import SearchSpace

STUDY_NAME = "hctl"
DEFAULT_DIRECTIONS: tuple[Direction, ...] = ("minimize", "minimize")
# The user attributes a finished trial gets (everything else was set when it was queued); the
# last three are those of journals written before scores had names.
_RESULT_ATTRS = frozenset(
    {"number", "params", "scores", "seconds", "pruned", "ablation", "kl", "refusals", "total_bad"}
)


@dataclass(frozen=True)
class Outcome:
    """What evaluating one point gave: every scorer's score, by name."""

    scores: dict[str, Score]
    seconds: float = 0.0
    pruned: bool = False  # stopped once behind the front: its refusal count is a lower bound


def _storage(journal: Path) -> JournalStorage:
    return JournalStorage(
        JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal)))
    )


def open_study(
    journal: Path,
    *,
    seed: int,
    n_startup_trials: int,
    directions: Sequence[Direction] = DEFAULT_DIRECTIONS,
) -> optuna.Study:
    """The job's study, created or continued. The sampler's seed moves on with every stored trial
    so a continued search does not replay the random startup points it already tried."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(journal)
    existing = 0
    with contextlib.suppress(KeyError):  # a new job has no study yet
        loaded = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        existing = len(loaded.trials)
        if len(loaded.directions) != len(directions):
            raise SettingsError(
                f"the study in {journal} has {len(loaded.directions)} objectives, the settings "
                f"{len(directions)}",
                "Use the scorers the job started with, or a new --job-dir for other objectives.",
            )
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
        directions=list(directions),
        load_if_exists=True,
    )


def load_trials(journal: Path) -> list[Trial]:
    """The finished trials of a job's journal, without a sampler (for reading only)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(journal))
    except KeyError:
        return []
    return finished_trials(study)


def recover_interrupted(study: optuna.Study) -> int:
    """Mark trials left running by a killed worker as failed and queue their points again."""
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if trial.params:
            # A queued point keeps what it was queued with (its origin), not partial results.
            queued_with = {
                key: value for key, value in trial.user_attrs.items() if key not in _RESULT_ATTRS
            }
            study.enqueue_trial(dict(trial.params), user_attrs=queued_with, skip_if_exists=False)
        recovered += 1
    return recovered


def finished_trials(study: optuna.Study) -> list[Trial]:
    """The finished trials (pruned ones included) in the order they finished."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    results = [_result(trial) for trial in trials if "number" in trial.user_attrs]
    return sorted(results, key=lambda result: result.number)


def _result(trial: FrozenTrial) -> Trial:
    """A journal trial as a record; one written before scores had names holds `kl`, `refusals`
    and `total_bad` instead, which the record reads as the two objectives they were."""
    attributes = trial.user_attrs
    legacy = {key: attributes[key] for key in ("kl", "refusals", "total_bad") if key in attributes}
    return Trial(
        number=int(attributes["number"]),
        params=dict(attributes.get("params", trial.params)),
        scores=attributes.get("scores", {}),
        seconds=float(attributes.get("seconds", 0.0)),
        pruned=bool(attributes.get("pruned", False)),
        ablation=dict(attributes.get("ablation", {})),
        origin=attributes.get("origin"),
        **legacy,
    )


def objective_values(trial: Trial) -> list[float]:
    """What Optuna is told: each objective's value; an unmeasured one as its worst (every
    prompt refused for a count, a broken model otherwise)."""
    values = []
    for score in trial.scores.values():
        if not score.objective:
            continue
        if score.value is not None:
            values.append(float(score.value))
        elif score.of is not None:
            values.append(float(score.of) if score.direction == "minimize" else 0.0)
        else:
            values.append(BROKEN_VALUE if score.direction == "minimize" else -BROKEN_VALUE)
    return values


def run_search(
    study: optuna.Study,
    space: SearchSpace,
    evaluate: Callable[[dict[str, float | str]], Outcome],
    *,
    n_trials: int,
    on_trial: Callable[[Trial], None] | None = None,
    describe: Callable[[dict[str, float | str]], dict[str, Any]] | None = None,
    skip: Callable[[optuna.Study, optuna.Trial], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[Trial]:
    """Run trials until `n_trials` have finished (counting those from earlier runs).

    `evaluate` gets the sampled point; `describe` turns it into what the trial stores for export
    (the engine's `AblationParams.to_dict()`). A drawn trial for which `skip` says yes (a queued
    point another trial already covers) is marked failed and not run. A trial that raises is
    marked failed, then the error goes up: an interrupted trial is never counted. A pruned outcome
    is told to Optuna as PRUNED (TPE counts it among the poor trials) and counts as finished.
    """
    done = len(finished_trials(study))
    while done < n_trials:
        trial = study.ask()
        if skip is not None and skip(study, trial):
            study.tell(trial, state=TrialState.FAIL)
            continue
        started = clock()
        try:
            values = space.sample(trial)
            outcome = evaluate(values)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        done += 1
        result = Trial(
            number=done,
            params=values,
            scores=outcome.scores,
            seconds=outcome.seconds or (clock() - started),
            pruned=outcome.pruned,
            ablation=describe(values) if describe else {},
            origin=trial.user_attrs.get("origin"),
        )
        for key, value in (
            ("number", result.number),
            ("params", result.params),
            ("scores", {name: score.model_dump() for name, score in result.scores.items()}),
            ("seconds", result.seconds),
            ("pruned", result.pruned),
            ("ablation", result.ablation),
        ):
            trial.set_user_attr(key, value)
        if result.pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            for name, score in result.scores.items():
                if score.limit is not None and score.value is not None:
                    trial.set_constraint(name, score.value - score.limit)
            study.tell(trial, objective_values(result))
        if on_trial is not None:
            on_trial(result)
    return finished_trials(study)
