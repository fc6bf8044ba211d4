"""The Optuna study: the resumable record of the search and the loop that runs its trials.

Two objectives, both minimised: the refusal count on the harmful evaluation prompts and the KL
divergence of the first-token distribution on the harmless ones (heretic HEAD's objectives, raw).
The sampler is multivariate TPE, with `n_startup_trials` random trials first. Where it samples is
the search space's business (`search_space.py`).

The study lives in a JournalStorage file in the job directory. A worker that is killed and started
again on the same job directory continues the same study: finished trials are kept, a trial that
was running when the worker died is marked failed and its parameters are tried again, and `n_trials`
counts finished trials, so raising it adds trials to a finished study. Each finished trial is a
`trials.Trial`, numbered 1, 2, 3... in the order trials finished.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from hctl_worker.trials import Trial

if TYPE_CHECKING:
    from hctl_worker.search_space import SearchSpace

STUDY_NAME = "hctl"
BROKEN_KL = 1e6  # stands for a KL that came out NaN or infinite
# The user attributes a finished trial gets (everything else was set when it was queued).
_RESULT_ATTRS = frozenset(
    {"number", "params", "kl", "refusals", "total_bad", "seconds", "pruned", "ablation"}
)


@dataclass(frozen=True)
class Outcome:
    """What evaluating one point gave (the engine's `Score`, as the search needs it)."""

    kl: float
    refusals: int | None  # None: skipped because the KL was already too high
    total_bad: int
    seconds: float = 0.0
    pruned: bool = False  # stopped once behind the front; `refusals` is a lower bound


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
    attributes = trial.user_attrs
    return Trial(
        number=int(attributes["number"]),
        params=dict(attributes.get("params", trial.params)),
        kl=float(attributes["kl"]),
        refusals=attributes["refusals"],
        total_bad=int(attributes["total_bad"]),
        seconds=float(attributes.get("seconds", 0.0)),
        pruned=bool(attributes.get("pruned", False)),
        ablation=dict(attributes.get("ablation", {})),
        origin=attributes.get("origin"),
    )


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
            # A model that computes NaN or inf is as broken as can be; JSON and Optuna need a number.
            kl=outcome.kl if math.isfinite(outcome.kl) else BROKEN_KL,
            refusals=outcome.refusals,
            total_bad=outcome.total_bad,
            seconds=outcome.seconds or (clock() - started),
            pruned=outcome.pruned,
            ablation=describe(values) if describe else {},
            origin=trial.user_attrs.get("origin"),
        )
        for key, value in (
            ("number", result.number),
            ("params", result.params),
            ("kl", result.kl),
            ("refusals", result.refusals),
            ("total_bad", result.total_bad),
            ("seconds", result.seconds),
            ("pruned", result.pruned),
            ("ablation", result.ablation),
        ):
            trial.set_user_attr(key, value)
        if result.pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            refusals = result.refusals if result.refusals is not None else result.total_bad
            study.tell(trial, [float(refusals), float(result.kl)])
        if on_trial is not None:
            on_trial(result)
    return finished_trials(study)
