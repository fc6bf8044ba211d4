"""The objectives in the study: any number of named scores, the harmless-refusal guard as an
Optuna constraint, and journals written before scores had names."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hctl_worker.errors import SettingsError
from hctl_worker.job_directory import JobPaths, finished_trials, reconcile_settings
from hctl_worker.search_space import SearchSpace
from hctl_worker.settings import WorkerSettings
from hctl_worker.study import Outcome, open_study, run_search
from hctl_worker.trials import Score, Trial, choose, pareto_front

COMPONENTS = ("attention", "mlp")


def guarded_scores(values: dict) -> Outcome:
    """A fake model: more attention weight removes refusals, costs KL, and past 1.2 it starts
    refusing harmless prompts; a third objective (maximised) rewards low MLP weight."""
    weight = max(0.0, float(values["attention.max_weight"]))
    mlp = max(0.0, float(values["mlp.max_weight"]))
    harmless = 10.0 if weight > 1.2 else 0.0
    return Outcome(
        {
            "KeywordRate": Score(
                value=float(round(20 * max(0.0, 1.5 - weight))),
                of=20,
                direction="minimize",
                role="refusals",
            ),
            "KLDivergence": Score(value=0.01 * weight, direction="minimize", role="damage"),
            "Fluency": Score(value=2.0 - mlp, direction="maximize", role="other"),
            "HarmlessRefusals": Score(value=harmless, of=40, role="harmless_refusals", limit=2.0),
        }
    )


def three_objective_study(journal: Path, seed: int) -> optuna.Study:
    return open_study(
        journal, seed=seed, n_startup_trials=6, directions=["minimize", "minimize", "maximize"]
    )


def test_three_objectives_a_maximised_one_and_the_guard_as_a_constraint(tmp_path: Path) -> None:
    study = three_objective_study(tmp_path / "study.journal", seed=3)
    trials = run_search(study, SearchSpace.heretic(8, COMPONENTS), guarded_scores, n_trials=16)
    assert [trial.number for trial in trials] == list(range(1, 17))
    # Optuna got the three objectives in order, and a constraint only from the guard.
    for frozen, trial in zip(study.trials, trials, strict=True):
        assert frozen.values == [
            trial.scores["KeywordRate"].value,
            trial.scores["KLDivergence"].value,
            trial.scores["Fluency"].value,
        ]
        harmless = trial.scores["HarmlessRefusals"].value
        assert frozen.constraints == {"HarmlessRefusals": harmless - 2.0}
    over = [trial for trial in trials if not trial.acceptable]
    assert over and all(trial.scores["HarmlessRefusals"].value > 2.0 for trial in over)
    front = pareto_front(trials)
    assert front and all(trial.acceptable for trial in front)
    # The front is every acceptable trial that no other acceptable one beats on all three.
    acceptable = [trial for trial in trials if trial.acceptable]
    for trial in acceptable:
        beaten = any(
            other is not trial
            and all(a <= b for a, b in zip(other.objectives(), trial.objectives(), strict=True))
            and other.objectives() != trial.objectives()
            for other in acceptable
        )
        assert (trial in front) is not beaten
    assert choose(trials).acceptable and choose(over) is None


def test_the_front_of_two_objectives_is_unchanged_by_report_only_scores() -> None:
    def trial(number: int, refusals: int, kl: float, extra: float) -> Trial:
        return Trial(
            number=number,
            scores={
                "KeywordRate": Score(value=refusals, of=10, direction="minimize", role="refusals"),
                "KLDivergence": Score(value=kl, direction="minimize", role="damage"),
                "MultiTokenKL": Score(value=extra, role="damage"),
            },
        )

    trials = [trial(1, 3, 0.02, 9.0), trial(2, 3, 0.05, 0.0), trial(3, 0, 0.3, 5.0)]
    assert [t.number for t in pareto_front(trials)] == [3, 1]
    assert trials[0].kl == 0.02  # the headline damage is the objective, not the reported one


# ---- journals from before scores had names ------------------------------------------------------


def write_legacy_journal(journal: Path, count: int) -> None:
    """A study as the worker wrote it before scores had names: two minimised values (the
    refusal count and KL) and the trial's numbers as flat user attributes."""
    study = open_study(journal, seed=1, n_startup_trials=2)
    space = SearchSpace.heretic(8, COMPONENTS)
    for number in range(1, count + 1):
        trial = study.ask()
        values = space.sample(trial)
        refusals, kl = 20 - number, 0.01 * number
        for key, value in (
            ("number", number),
            ("params", values),
            ("kl", kl),
            ("refusals", refusals),
            ("total_bad", 20),
            ("seconds", 1.0),
            ("ablation", {}),
        ):
            trial.set_user_attr(key, value)
        study.tell(trial, [float(refusals), kl])


def test_a_job_started_before_named_scores_resumes_with_the_same_objectives(tmp_path) -> None:
    job = JobPaths(tmp_path / "job")
    job.root.mkdir()
    # Its settings file has no scorers: they are the defaults, so the job may continue.
    job.settings.write_text('model = "m"\nseed = 1\nmax_response_length = 16\n')
    write_legacy_journal(job.journal, 3)
    old = finished_trials(job)
    assert [(t.number, t.refusals, t.total_bad, t.kl) for t in old] == [
        (1, 19, 20, 0.01),
        (2, 18, 20, 0.02),
        (3, 17, 20, 0.03),
    ]
    assert list(old[0].scores) == ["KeywordRate", "KLDivergence"]
    settings = reconcile_settings(job, WorkerSettings(model="m", max_response_length=16))
    directions = [c.optimization for c in settings.scorers if c.optimization != "report"]
    study = open_study(job.journal, seed=1, n_startup_trials=2, directions=directions)

    def counted(values: dict) -> Outcome:
        scores = guarded_scores(values).scores
        return Outcome({name: scores[name] for name in ("KeywordRate", "KLDivergence")})

    trials = run_search(study, SearchSpace.heretic(8, COMPONENTS), counted, n_trials=5)
    assert [trial.number for trial in trials] == [1, 2, 3, 4, 5]
    # New trials tell Optuna the count, as the old ones did: one scale in one study.
    assert [frozen.values[0] for frozen in study.trials] == [t.refusals for t in trials]


def test_other_objectives_on_an_old_job_are_refused_with_a_hint(tmp_path: Path) -> None:
    job = JobPaths(tmp_path / "job")
    job.root.mkdir()
    job.settings.write_text('model = "m"\nseed = 1\n')
    write_legacy_journal(job.journal, 2)
    changed = WorkerSettings(
        model="m",
        scorers=[
            {"name": "KeywordRate", "optimization": "minimize"},
            {"name": "MultiTokenKL", "optimization": "minimize"},
        ],
    )
    with pytest.raises(SettingsError) as raised:
        reconcile_settings(job, changed)
    assert "scorers" in raised.value.message and "--job-dir" in raised.value.hint
    # And a study whose number of objectives differs is refused before any trial runs.
    with pytest.raises(SettingsError) as raised:
        open_study(job.journal, seed=1, n_startup_trials=1, directions=["minimize"] * 3)
    assert "2 objectives" in raised.value.message


def test_the_journal_keeps_every_score_by_name(tmp_path: Path) -> None:
    study = three_objective_study(tmp_path / "study.journal", seed=0)
    (trial,) = run_search(study, SearchSpace.heretic(8, COMPONENTS), guarded_scores, n_trials=1)
    stored = optuna.load_study(
        study_name="hctl",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))
        ),
    ).trials[0]
    assert set(stored.user_attrs["scores"]) == set(trial.scores)
    assert "kl" not in stored.user_attrs  # the headline numbers are derived, not stored twice
