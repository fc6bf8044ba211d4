"""The Optuna study: the resumable record of the search, and the loop each worker runs on it.

The objectives are the scorers the settings mark "minimize" or "maximize", in their order (see
`scorers`); by default the refusal count on the harmful evaluation prompts and the KL divergence
of the first-token distribution on the harmless ones, both minimised (heretic HEAD's objectives,
raw). A count goes to Optuna as a count, as it always did, so a journal from before scorers had
names continues with the same numbers. A guard with a limit (the harmless refusals) is an Optuna
constraint: the sampler learns to stay out of the region where the model refuses harmless
prompts, and the objectives stay what they measure (a penalty would mix the two and put
penalised trials on the front). The sampler is multivariate TPE, with `n_startup_trials` random
trials first and a "constant liar" for the trials other workers are running, so parallel
workers do not sample the same point. Where it samples is the search space's business
(`search_space.py`).

The study lives in a storage (`storage.py`): the journal in the job directory, or a PostgreSQL
database that workers on several machines share. Any number of workers run `run_search` on one
study at once; they take turns (`StudyStorage.exclusive`, milliseconds) for what must not
interleave, and know of each other only through the study (`teamwork.py`), so that:

- a trial starts only while finished + running trials are fewer than `n_trials`, so the
  finished ones stop at exactly `n_trials`, whatever the races;
- a worker may ask several trials in one turn (`at_once`, never more than the free slots) and
  evaluate them together; they are sampled one after the other with the constant liar in place,
  so the second point is drawn knowing the first is running;
- a finished trial gets its number (1, 2, 3... in the order trials finished, unique across
  workers) and is reported (its events) in the same turn, then marked reported in the study; a
  worker that died between the two has its trial reported by the next turn's holder;
- a running trial whose worker died (its heartbeat stands still) is failed and its point queued
  again, so it runs again: nothing a dead worker did is lost, nothing is counted twice.

A worker that is killed and started again on the same job directory continues the same study,
and `n_trials` counts finished trials, so raising it adds trials to a finished study.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hctl_worker.errors import SettingsError
from hctl_worker.storage import StudyStorage, journal_storage
from hctl_worker.teamwork import Teamwork, mark_reported, reported_numbers
from hctl_worker.trials import BROKEN_VALUE, Direction, Score, Trial

if TYPE_CHECKING:
    from hctl_worker.search_space import SearchSpace

STUDY_NAME = "hctl"
DEFAULT_DIRECTIONS: tuple[Direction, ...] = ("minimize", "minimize")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# The user attributes a finished trial gets (everything else was set when it was queued); the
# last three are those of journals written before scores had names.
_RESULT_ATTRS = frozenset(
    {"number", "params", "scores", "seconds", "pruned", "ablation", "run_by"}
    | {"kl", "refusals", "total_bad"}
)


@dataclass(frozen=True)
class Outcome:
    """What evaluating one point gave: every scorer's score, by name."""

    scores: dict[str, Score]
    seconds: float = 0.0
    pruned: bool = False  # stopped once behind the front: its refusal count is a lower bound


def open_study(
    where: Path | StudyStorage,
    *,
    seed: int,
    n_startup_trials: int,
    directions: Sequence[Direction] = DEFAULT_DIRECTIONS,
    seed_offset: int = 0,
) -> optuna.Study:
    """The job's study, created or continued, in a journal file or a `StudyStorage`.

    The sampler's seed moves on with every stored trial, so a continued search does not replay
    the random startup points it already tried, and by `seed_offset`, so that workers starting
    together on one study do not draw the same ones.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = journal_storage(where) if isinstance(where, Path) else where
    existing = 0
    summary = _summary(storage)
    if summary is not None:
        existing = summary.n_trials
        if len(summary.directions) != len(directions):
            raise SettingsError(
                f"the study in {storage.description} has {len(summary.directions)} objectives, "
                f"the settings {len(directions)}",
                "Use the scorers the job started with, or a new --job-dir for other objectives.",
            )
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=n_startup_trials,
        n_ei_candidates=128,
        multivariate=True,
        constant_liar=True,
        seed=seed + existing + seed_offset,
    )
    study = optuna.create_study(
        storage=storage.storage,
        sampler=sampler,
        study_name=STUDY_NAME,
        directions=list(directions),
        load_if_exists=True,
    )
    study.hctl_storage = storage  # type: ignore[attr-defined]  # the lock goes with the study
    return study


def _summary(storage: StudyStorage) -> optuna.study.StudySummary | None:
    summaries = optuna.study.get_all_study_summaries(storage.storage, include_best_trial=False)
    return next((summary for summary in summaries if summary.study_name == STUDY_NAME), None)


def study_storage(study: optuna.Study) -> StudyStorage:
    return study.hctl_storage  # type: ignore[attr-defined]


def load_trials(storage: StudyStorage) -> list[Trial]:
    """The finished trials of a job's study, without a sampler (for reading only)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage.storage)
    except KeyError:
        return []
    return finished_trials(study)


class StudyPromptRecord:
    """Where the job's prompt sets came from (`job_prompts.SharedRecord`), kept in the study so
    that the workers of a job's other pods, whose job directories differ, take the same ones."""

    KEY = "prompt_sources"

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def read(self) -> dict[str, str]:
        record = self.study.user_attrs.get(self.KEY)
        if not isinstance(record, dict):
            return {}
        return {str(table): str(kind) for table, kind in record.items()}

    def write(self, record: dict[str, str]) -> None:
        self.study.set_user_attr(self.KEY, dict(record))


def recover_interrupted(study: optuna.Study) -> int:
    """Mark every running trial failed and queue its point again. Only for a study that no
    worker is running (a test, a tool); live workers use the heartbeat rule instead."""
    return sum(_requeue(study, trial) for trial in _running(study))


def finished_trials(study: optuna.Study) -> list[Trial]:
    """The finished trials (pruned ones included) in the order they finished."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
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
        run_by=str(attributes.get("run_by", "")),
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


def _running(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def _requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Fail a running trial and queue its point again; False when it had finished meanwhile."""
    if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
        return False
    if trial.params:
        # A queued point keeps what it was queued with (its origin), not partial results.
        queued_with = {
            key: value for key, value in trial.user_attrs.items() if key not in _RESULT_ATTRS
        }
        study.enqueue_trial(dict(trial.params), user_attrs=queued_with, skip_if_exists=False)
    return True


Report = Callable[[Trial, list[Trial]], None]


def run_search(
    study: optuna.Study,
    space: SearchSpace,
    evaluate: Callable[[dict[str, float | str]], Outcome],
    *,
    n_trials: int,
    on_trial: Callable[[Trial], None] | None = None,
    report: Report | None = None,
    describe: Callable[[dict[str, float | str]], dict[str, Any]] | None = None,
    team: Teamwork | None = None,
    skip: Callable[[optuna.Study, optuna.Trial], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
    evaluate_together: Callable[[list[dict[str, float | str]]], list[Outcome]] | None = None,
    at_once: int = 1,
) -> list[Trial]:
    """Take part in the search until `n_trials` have finished (counting those from earlier runs
    and from other workers); returns every finished trial.

    `evaluate` gets the sampled point; `describe` turns it into what the trial stores for export
    (the engine's `AblationParams.to_dict()`). A drawn trial for which `skip` says yes (a queued
    point another trial already covers) is marked failed and not run. `report(trial, finished)` is
    called in the turn that numbers the trial (with every finished trial of the study), also for
    trials a dead worker finished but never reported; `on_trial(trial)` for this worker's own
    trials. A trial that raises is marked failed, then the error goes up: an interrupted trial is
    never counted. A pruned outcome is told to Optuna as PRUNED (TPE counts it among the poor
    trials) and counts as finished.

    With `evaluate_together` and `at_once` > 1, each turn asks up to `at_once` trials (never more
    than the free slots) and evaluates them in one call, which returns one outcome per point, in
    order; a turn that gets a single trial evaluates it with `evaluate`. The points are sampled
    one after the other with the constant liar in place (`constant_liar=True`), so the second is
    drawn knowing the first is running. A trial's seconds are its outcome's, else an even share
    of the call's wall time. The trials are numbered in the order they were asked; if the call
    raises, or returns the wrong number of outcomes, all of them are marked failed.
    """
    team = team or Teamwork()
    storage = study_storage(study)
    want = max(1, at_once) if evaluate_together is not None else 1
    while True:
        with storage.exclusive():
            finished = _report_missing(study, report)
            if len(finished) >= n_trials:
                return finished
            for running in _running(study):
                if team.stale(running):
                    _requeue(study, running)
            free = n_trials - len(finished) - len(_running(study))
            trials = _ask(study, team, skip, min(want, free))
        if not trials:
            team.sleep(team.wait_s)  # every slot is taken: one may come free if its worker died
            continue
        started = clock()
        try:
            with contextlib.ExitStack() as beats:
                for trial in trials:
                    beats.enter_context(team.beating(study, trial._trial_id))
                points = [space.sample(trial) for trial in trials]
                if len(trials) == 1 or evaluate_together is None:
                    outcomes = [evaluate(point) for point in points]
                else:
                    outcomes = list(evaluate_together(points))
                    if len(outcomes) != len(points):
                        raise ValueError(
                            f"evaluate_together returned {len(outcomes)} outcomes "
                            f"for {len(points)} points"
                        )
        except BaseException:
            for trial in trials:
                with contextlib.suppress(Exception):
                    study.tell(trial, state=TrialState.FAIL)
            raise
        seconds = (clock() - started) / len(trials)
        for trial, values, outcome in zip(trials, points, outcomes, strict=True):
            result = _finish(study, trial, values, outcome, team, report, describe, seconds)
            if result is not None and on_trial is not None:
                on_trial(result)


def _ask(
    study: optuna.Study,
    team: Teamwork,
    skip: Callable[[optuna.Study, optuna.Trial], bool] | None,
    slots: int,
) -> list[optuna.Trial]:
    """Ask and claim up to `slots` trials; a drawn trial `skip` says yes to is marked failed
    and another drawn in its place. Called holding the lock."""
    trials: list[optuna.Trial] = []
    while len(trials) < slots:
        trial = study.ask()
        if skip is not None and skip(study, trial):
            study.tell(trial, state=TrialState.FAIL)
            continue
        team.claim(study, trial._trial_id)
        trials.append(trial)
    return trials


def _finish(
    study: optuna.Study,
    trial: optuna.Trial,
    values: dict[str, float | str],
    outcome: Outcome,
    team: Teamwork,
    report: Report | None,
    describe: Callable[[dict[str, float | str]], dict[str, Any]] | None,
    seconds: float,
) -> Trial | None:
    """Number, tell and report a trial in one turn; None when another worker had given it up
    for dead meanwhile (its point runs again)."""
    with study_storage(study).exclusive():
        if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
            return None
        finished = finished_trials(study)
        result = Trial(
            number=max((done.number for done in finished), default=0) + 1,
            params=values,
            scores=outcome.scores,
            seconds=outcome.seconds or seconds,
            pruned=outcome.pruned,
            run_by=team.name,
            ablation=describe(values) if describe else {},
            origin=trial.user_attrs.get("origin"),
        )
        for key, value in (
            ("number", result.number),
            ("params", result.params),
            ("scores", {name: score.model_dump() for name, score in result.scores.items()}),
            ("seconds", result.seconds),
            ("pruned", result.pruned),
            ("run_by", result.run_by),
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
        finished.append(result)
        if report is not None:
            report(result, finished)
        mark_reported(study, {result.number})
    return result


def _report_missing(study: optuna.Study, report: Report | None) -> list[Trial]:
    """Report the finished trials no worker reported (one died between telling and reporting);
    returns every finished trial. Called holding the lock."""
    finished = finished_trials(study)
    if report is None:
        return finished
    reported = reported_numbers(study)
    for trial in finished:
        if trial.number not in reported:
            report(trial, finished)
            mark_reported(study, {trial.number})
    return finished
