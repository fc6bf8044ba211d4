"""The Optuna study: the resumable record of the search, and the loop each worker runs on it.

Two objectives, both minimised: the refusal count on the harmful evaluation prompts and the KL
divergence of the first-token distribution on the harmless ones (heretic HEAD's objectives, raw).
The sampler is multivariate TPE, with `n_startup_trials` random trials first and a "constant
liar" for the trials other workers are running, so parallel workers do not sample the same
point. Where it samples is the search space's business (`search_space.py`).

The study lives in a storage (`storage.py`): the journal in the job directory, or a PostgreSQL
database that workers on several machines share. Any number of workers run `run_search` on one
study at once; they take turns (`StudyStorage.exclusive`, milliseconds) for what must not
interleave, so that:

- a trial starts only while finished + running trials are fewer than `n_trials`, so the
  finished ones stop at exactly `n_trials`, whatever the races;
- a finished trial gets its number (1, 2, 3... in the order trials finished, unique across
  workers) and is reported (`on_trial`: its events) in the same turn, then marked reported in
  the study; a worker that died between the two has its trial reported by the next turn's holder;
- a running trial beats (a counter in its system attributes, every `heartbeat_s`); one whose
  beat stands still for `stale_after_s` by another worker's clock, or whose worker has been
  started again, was abandoned by a dead worker: it is failed and its point queued again, so it
  runs again (nothing a dead worker did is lost, nothing is counted twice).

A worker that is killed and started again on the same job directory continues the same study,
and `n_trials` counts finished trials, so raising it adds trials to a finished study.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hctl_worker.storage import StudyStorage, journal_storage
from hctl_worker.trials import Trial

if TYPE_CHECKING:
    from hctl_worker.search_space import SearchSpace

STUDY_NAME = "hctl"
BROKEN_KL = 1e6  # stands for a KL that came out NaN or infinite
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# The user attributes a finished trial gets (everything else was set when it was queued).
RESULT_ATTRS = frozenset(
    {"number", "params", "kl", "refusals", "total_bad", "seconds", "pruned", "ablation", "run_by"}
)
# Trial system attributes: who runs it (an identity unique per job directory and worker name),
# and its heartbeat counter.
OWNER_ATTR = "hctl:owner"
BEAT_ATTR = "hctl:beat"
# Study system attributes `hctl:reported:<number>`: that trial's event was written.
REPORTED_PREFIX = "hctl:reported:"


@dataclass(frozen=True)
class Outcome:
    """What evaluating one point gave (the engine's `Score`, as the search needs it)."""

    kl: float
    refusals: int | None  # None: skipped because the KL was already too high
    total_bad: int
    seconds: float = 0.0
    pruned: bool = False  # stopped once behind the front; `refusals` is a lower bound


def open_study(
    where: Path | StudyStorage, *, seed: int, n_startup_trials: int, seed_offset: int = 0
) -> optuna.Study:
    """The job's study, created or continued, in a journal file or a `StudyStorage`.

    The sampler's seed moves on with every stored trial, so a continued search does not replay
    the random startup points it already tried, and by `seed_offset`, so that workers starting
    together on one study do not draw the same ones.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = journal_storage(where) if isinstance(where, Path) else where
    existing = 0
    with contextlib.suppress(KeyError):  # a new job has no study yet
        summaries = optuna.study.get_all_study_summaries(storage.storage, include_best_trial=False)
        existing = next((s.n_trials for s in summaries if s.study_name == STUDY_NAME), 0)
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
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )
    study.hctl_storage = storage  # type: ignore[attr-defined]  # the lock goes with the study
    return study


def study_storage(study: optuna.Study) -> StudyStorage:
    return study.hctl_storage  # type: ignore[attr-defined]


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
    attributes = trial.user_attrs
    return Trial(
        number=int(attributes["number"]),
        params=dict(attributes.get("params", trial.params)),
        kl=float(attributes["kl"]),
        refusals=attributes["refusals"],
        total_bad=int(attributes["total_bad"]),
        seconds=float(attributes.get("seconds", 0.0)),
        pruned=bool(attributes.get("pruned", False)),
        run_by=str(attributes.get("run_by", "")),
        ablation=dict(attributes.get("ablation", {})),
    )


def _running(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def _requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Fail a running trial and queue its point again; False when it had finished meanwhile."""
    if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
        return False
    if trial.params:
        # A queued point keeps what it was queued with (its origin), not partial results.
        queued_with = {
            key: value for key, value in trial.user_attrs.items() if key not in RESULT_ATTRS
        }
        study.enqueue_trial(dict(trial.params), user_attrs=queued_with, skip_if_exists=False)
    return True


@dataclass
class Teamwork:
    """How one worker takes part in a study that others may share (see the module docstring).

    `owner` identifies this worker among all of the study's (its job directory and name);
    `name` is what events show. The clock and sleep are injectable for tests.
    """

    name: str = "1"
    owner: str = "1"
    heartbeat_s: float = 10.0
    stale_after_s: float = 60.0
    wait_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _beats_seen: dict[int, tuple[Any, float]] = field(default_factory=dict)

    def stale(self, trial: FrozenTrial, mine: int | None) -> bool:
        """Whether a running trial was abandoned: its worker was started again (same owner) or
        its beat has stood still for `stale_after_s` as this worker saw it."""
        if trial._trial_id == mine:
            return False
        if trial.system_attrs.get(OWNER_ATTR) == self.owner:
            return True
        beat = trial.system_attrs.get(BEAT_ATTR)
        now = self.clock()
        seen = self._beats_seen.get(trial._trial_id)
        if seen is None or seen[0] != beat:
            self._beats_seen[trial._trial_id] = (beat, now)
            return False
        return now - seen[1] >= self.stale_after_s

    @contextlib.contextmanager
    def beating(self, study: optuna.Study, trial_id: int) -> Iterator[None]:
        """Beat for a running trial, from a thread of its own, until the block ends."""
        stop = threading.Event()

        def beat() -> None:
            count = 0
            while not stop.wait(self.heartbeat_s):
                count += 1
                with contextlib.suppress(Exception):  # finished meanwhile, or a lost connection
                    study._storage.set_trial_system_attr(trial_id, BEAT_ATTR, count)

        thread = threading.Thread(target=beat, name="hctl-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=max(1.0, self.heartbeat_s))


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
    clock: Callable[[], float] = time.monotonic,
) -> list[Trial]:
    """Take part in the search until `n_trials` have finished (counting those from earlier runs
    and from other workers); returns every finished trial.

    `evaluate` gets the sampled point; `describe` turns it into what the trial stores for export
    (the engine's `AblationParams.to_dict()`). `report(trial, finished)` is called in the turn
    that numbers the trial (with every finished trial of the study), also for trials a dead
    worker finished but never reported; `on_trial(trial)` for this worker's own trials. A trial
    that raises is marked failed, then the error goes up: an interrupted trial is never counted.
    A pruned outcome is told to Optuna as PRUNED (TPE counts it among the poor trials) and
    counts as finished.
    """
    team = team or Teamwork()
    storage = study_storage(study)
    while True:
        with storage.exclusive():
            finished = _report_missing(study, report)
            if len(finished) >= n_trials:
                return finished
            for trial in _running(study):
                if team.stale(trial, None):
                    _requeue(study, trial)
            free = len(finished) + len(_running(study)) < n_trials
            trial = study.ask() if free else None
            if trial is not None:
                study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, team.owner)
        if trial is None:
            team.sleep(team.wait_s)  # every slot is taken: one may come free if its worker died
            continue
        started = clock()
        try:
            with team.beating(study, trial._trial_id):
                values = space.sample(trial)
                outcome = evaluate(values)
        except BaseException:
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL)
            raise
        result = _finish(study, trial, values, outcome, team, report, describe, clock() - started)
        if result is not None and on_trial is not None:
            on_trial(result)


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
            # A model that computes NaN or inf is as broken as can be; JSON and Optuna need a number.
            kl=outcome.kl if math.isfinite(outcome.kl) else BROKEN_KL,
            refusals=outcome.refusals,
            total_bad=outcome.total_bad,
            seconds=outcome.seconds or seconds,
            pruned=outcome.pruned,
            run_by=team.name,
            ablation=describe(values) if describe else {},
        )
        for key in sorted(RESULT_ATTRS):
            trial.set_user_attr(key, getattr(result, key))
        if result.pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            refusals = result.refusals if result.refusals is not None else result.total_bad
            study.tell(trial, [float(refusals), float(result.kl)])
        finished.append(result)
        if report is not None:
            report(result, finished)
        mark_reported(study, {result.number})
    return result


def reported_numbers(study: optuna.Study) -> set[int]:
    attributes = study._storage.get_study_system_attrs(study._study_id)
    return {
        int(key.removeprefix(REPORTED_PREFIX))
        for key, value in attributes.items()
        if key.startswith(REPORTED_PREFIX) and value
    }


def mark_reported(study: optuna.Study, numbers: set[int]) -> None:
    for number in sorted(numbers):
        study._storage.set_study_system_attr(study._study_id, f"{REPORTED_PREFIX}{number}", True)


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


def forget_reports(study: optuna.Study, numbers: set[int]) -> None:
    """Take back the marks of trials whose events are not where the marks say (a job directory
    restored from copies): the next turn reports them again. Called holding the lock."""
    for number in numbers:
        study._storage.set_study_system_attr(study._study_id, f"{REPORTED_PREFIX}{number}", None)
