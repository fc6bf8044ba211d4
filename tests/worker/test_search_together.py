"""Trials asked and evaluated together (`run_search(..., evaluate_together=..., at_once=...)`)."""

from __future__ import annotations

from itertools import count
from pathlib import Path

import pytest
from optuna.trial import TrialState

from hctl_worker.search_space import SearchSpace
from hctl_worker.study import Outcome, finished_trials, open_study, run_search
from hctl_worker.teamwork import Teamwork
from hctl_worker.trials import Trial
from tests.worker.test_search import COMPONENTS, counting, early_refuser


def space() -> SearchSpace:
    return SearchSpace.heretic(8, COMPONENTS)


def together(evaluate, calls: list):
    def wrapped(points: list[dict]) -> list[Outcome]:
        calls.append([dict(point) for point in points])
        return [evaluate(point) for point in points]

    return wrapped


def ticking(step: float = 10.0):
    """A clock that moves `step` seconds every time it is read."""
    ticks = count()
    return lambda: step * next(ticks)


def test_trials_asked_two_at_a_time_each_get_their_own_outcome(tmp_path: Path) -> None:
    study = open_study(tmp_path / "study.journal", seed=2, n_startup_trials=2)
    singles: list = []
    batches: list = []

    def timed_together(points: list[dict]) -> list[Outcome]:
        batches.append([dict(point) for point in points])
        first, second = (early_refuser(point) for point in points)
        return [first, Outcome(second.scores, seconds=7.0)]  # the second measured its own time

    seen: list[Trial] = []
    found = run_search(
        study,
        space(),
        counting(early_refuser, singles),
        n_trials=5,
        on_trial=seen.append,
        evaluate_together=timed_together,
        at_once=2,
        clock=ticking(),
    )

    assert [len(batch) for batch in batches] == [2, 2]
    assert len(singles) == 1  # the last free slot: one trial, through the single path
    assert [result.number for result in found] == [1, 2, 3, 4, 5]
    assert [result.number for result in seen] == [1, 2, 3, 4, 5]
    evaluated = [point for batch in batches for point in batch] + singles
    assert [result.params for result in found] == evaluated  # numbered in the order asked
    by_number = {trial.user_attrs["number"]: trial for trial in study.trials}
    assert sorted(by_number) == [1, 2, 3, 4, 5]
    for result in found:
        stored = by_number[result.number]
        assert stored.state == TrialState.COMPLETE
        assert stored.params == result.params
        assert result.scores == early_refuser(result.params).scores
        assert list(stored.values) == [
            float(result.refusals),  # type: ignore[arg-type]
            pytest.approx(result.kl),
        ]
    # Seconds: the outcome's own, else the shared wall time (10 s) split evenly.
    assert [result.seconds for result in found] == [5.0, 7.0, 5.0, 7.0, 10.0]


def test_never_more_trials_than_free_slots(tmp_path: Path) -> None:
    n_trials = 4
    study = open_study(tmp_path / "study.journal", seed=4, n_startup_trials=2)
    foreign = study.ask()  # another worker's trial, alive, holding one slot
    Teamwork(owner="other").claim(study, foreign._trial_id)

    def slots_respected() -> None:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        assert len(finished_trials(study)) + len(running) <= n_trials

    def checked(evaluate):
        def wrapped(point):
            slots_respected()
            return evaluate(point)

        return wrapped

    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # every slot taken: the other worker's trial fails
        sleeps.append(seconds)
        study.tell(foreign, state=TrialState.FAIL)

    singles: list = []
    batches: list = []
    found = run_search(
        study,
        space(),
        checked(counting(early_refuser, singles)),
        n_trials=n_trials,
        team=Teamwork(owner="me", sleep=sleep),
        evaluate_together=checked(together(early_refuser, batches)),
        at_once=2,
    )

    # 3 free slots: two together, then one alone; then none until the foreign trial failed.
    assert [len(batch) for batch in batches] == [2]
    assert len(singles) == 2 and len(sleeps) == 1
    assert [result.number for result in found] == [1, 2, 3, 4]
    states = [trial.state for trial in study.trials]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1


@pytest.mark.parametrize("error", [RuntimeError("engine died"), KeyboardInterrupt()])
def test_an_error_while_evaluating_together_fails_every_asked_trial(
    tmp_path: Path, error: BaseException
) -> None:
    study = open_study(tmp_path / "study.journal", seed=0, n_startup_trials=2)

    def broken(points: list[dict]) -> list[Outcome]:
        raise error

    with pytest.raises(type(error)):
        run_search(study, space(), early_refuser, n_trials=3, evaluate_together=broken, at_once=2)
    assert finished_trials(study) == []
    assert [trial.state for trial in study.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_a_wrong_number_of_outcomes_fails_the_trials(tmp_path: Path) -> None:
    study = open_study(tmp_path / "study.journal", seed=0, n_startup_trials=2)

    def short(points: list[dict]) -> list[Outcome]:
        return [early_refuser(points[0])]

    with pytest.raises(ValueError, match="1 outcomes for 2 points"):
        run_search(study, space(), early_refuser, n_trials=3, evaluate_together=short, at_once=2)
    assert finished_trials(study) == []
    assert [trial.state for trial in study.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_one_at_a_time_never_evaluates_together(tmp_path: Path) -> None:
    def run(journal: Path, **together_args) -> tuple[list[Trial], list]:
        calls: list = []
        found = run_search(
            open_study(journal, seed=6, n_startup_trials=2),
            space(),
            counting(early_refuser, calls),
            n_trials=4,
            **together_args,
        )
        return found, calls

    batches: list = []
    found, calls = run(
        tmp_path / "once.journal", evaluate_together=together(early_refuser, batches), at_once=1
    )
    plain, plain_calls = run(tmp_path / "plain.journal")

    assert batches == [] and len(calls) == 4
    assert calls == plain_calls  # the same points, drawn the same way
    assert [result.params for result in found] == [result.params for result in plain]
    assert [result.number for result in found] == [1, 2, 3, 4]
