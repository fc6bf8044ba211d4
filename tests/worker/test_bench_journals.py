"""bench_heretic.py reads both tools' trials from their Optuna journals: each trial's own start
and end times, heretic's refusals and KL from the user attributes it sets, and the best trial
under the bar. Checked on journals Optuna itself writes."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from scripts.heretic_comparison import (
    _shared,
    exit_note,
    heretic_trials,
    journal_trial_seconds,
    quality,
)


def _journal(path: Path, outcomes: list[tuple[int, float] | None]) -> None:
    """A study like heretic's: per trial its refusals and KL as user attributes (None: the
    trial is pruned)."""
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(storage=storage, study_name="s", directions=["minimize"] * 2)
    study.enqueue_trial({"x": 0.5})  # an enqueued trial starts when it is asked for
    for index, outcome in enumerate(outcomes, start=1):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        if outcome is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        refusals, kl = outcome
        trial.set_user_attr("index", index)
        trial.set_user_attr("refusals", refusals)
        trial.set_user_attr("n_bad_prompts", 32)
        trial.set_user_attr("kl_divergence", kl)
        study.tell(trial, [kl, refusals / 32])


def test_every_finished_trial_has_its_seconds_and_heretics_scores(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = tmp_path / "journal.log"
    _journal(journal, [(30, 0.01), None, (2, 0.04), (1, 0.3)])

    seconds = journal_trial_seconds(journal)
    assert len(seconds) == 4  # the enqueued one, the pruned one, every complete one
    assert all(0 <= value < 60 for value in seconds)

    trials = heretic_trials(journal)
    assert sorted((t["number"], t["refusals"], t["kl"]) for t in trials) == [
        (1, 30, 0.01),
        (3, 2, 0.04),
        (4, 1, 0.3),
    ]
    found = quality(trials)
    assert found["best_under_bar"]["number"] == 3  # 2/32 at KL 0.04; trial 4's KL is over
    assert found["first_under_bar"] == 3
    assert found["fewest_refusals"]["number"] == 4


def test_a_journal_without_heretics_attributes_has_no_scores(tmp_path: Path) -> None:
    journal = tmp_path / "journal.log"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert heretic_trials(journal) == []
    assert len(journal_trial_seconds(journal)) == 2
    assert quality([]) == {
        "best_under_bar": None,
        "first_under_bar": None,
        "fewest_refusals": None,
    }


@pytest.fixture(autouse=True)
def _quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


def test_heretics_exit_at_its_closing_menu_is_told_apart_from_a_failure() -> None:
    """With stdin closed, heretic's question of which trial to keep ends it with EOFError and
    exit 1 once every trial is done: the bench says so, and calls anything else an exit."""
    menu = '...\n❱ 781 trial = prompt_select("Which trial do you want to use\n...\nEOFError\n'
    assert exit_note("heretic", 1, 10, 10, menu).startswith("exit 1 at its closing menu")
    assert exit_note("heretic", 1, 7, 10, menu) == "exit 1"  # stopped before its last trial
    assert exit_note("heretic", 1, 10, 10, "Traceback\nRuntimeError: boom\n") == "exit 1"
    assert exit_note("heretic", 0, 10, 10, "") == "exit 0"
    assert exit_note("hctl", 1, 10, 10, menu) == "exit 1"


def test_trials_that_ran_at_once_share_their_stretch_of_time() -> None:
    """hctl evaluates trials together: trials whose spans overlap share their stretch of time
    evenly; a trial that ran alone keeps its own span."""
    at = datetime(2026, 1, 1)

    def span(start: float, end: float) -> tuple[datetime, datetime]:
        return at + timedelta(seconds=start), at + timedelta(seconds=end)

    spans = {0: span(0, 6), 1: span(0, 6.2), 2: span(6.2, 9), 3: span(9.5, 10), 4: span(9.5, 12)}
    assert _shared(spans) == pytest.approx([3.1, 3.1, 2.8, 1.25, 1.25])
