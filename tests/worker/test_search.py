"""The search on its own: ranges and the resumable journal (a small fake engine)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hctl_worker.ablation import kernel_weights
from hctl_worker.search_space import SearchSpace, to_ablation_params
from hctl_worker.study import Outcome, finished_trials, open_study, recover_interrupted, run_search
from hctl_worker.trials import Trial, legacy_scores

COMPONENTS = ("attention", "mlp")
TOTAL = 50


def tent_weight(values: dict, component: str, layer: int) -> float:
    """heretic's kernel at one layer (written out here so the fake does not need the engine)."""
    peak = max(0.0, float(values[f"{component}.max_weight"]))
    position = float(values[f"{component}.max_weight_position"])
    reach = float(values[f"{component}.min_weight_distance"])
    low = float(values[f"{component}.min_weight"]) * peak
    distance = abs(layer - position)
    if distance > reach:
        return 0.0
    return peak + distance / reach * (low - peak)


def early_refuser(values: dict) -> Outcome:
    """A fake model with 8 layers whose refusal is written by layer 0's attention only."""
    weight = tent_weight(values, "attention", 0)
    refusals = round(TOTAL * min(1.0, max(0.0, 1.0 - weight)))
    damage = sum(tent_weight(values, component, 7) for component in COMPONENTS)
    kl = 0.001 + 0.01 * damage + 0.02 * max(0.0, weight - 1.0)
    return Outcome(legacy_scores(refusals, TOTAL, kl))


def counting(evaluate, calls: list):
    def wrapped(values: dict) -> Outcome:
        calls.append(dict(values))
        return evaluate(values)

    return wrapped


def test_the_whole_space_reaches_every_layer_and_holds_the_classic_edit() -> None:
    space = SearchSpace.whole(8, COMPONENTS)
    assert (space.direction_index.low, space.direction_index.high) == (0.0, 7.0)
    assert (space.max_weight_position.low, space.max_weight_position.high) == (0.0, 7.0)
    assert space.min_weight_distance.high >= 7
    for layer in range(8):
        point = space.full_depth_point(layer)
        assert space.contains(point)
        params = to_ablation_params(point, COMPONENTS)
        assert params.direction_index == layer
        for component in COMPONENTS:
            assert kernel_weights(params.kernels[component], 8) == [1.0] * 8
    per_layer = to_ablation_params(space.full_depth_point(None), COMPONENTS)
    assert per_layer.direction_index is None


def test_heretic_ranges_hold_neither_early_edits_nor_the_classic_edit() -> None:
    heretic = SearchSpace.heretic(8, COMPONENTS)
    assert heretic.direction_index.low > 2 and heretic.max_weight_position.low > 4
    assert not any(heretic.contains(heretic.full_depth_point(layer)) for layer in range(8))
    whole = SearchSpace.whole(8, COMPONENTS)
    # A space with one scope does not hold points of the other.
    assert not SearchSpace.whole(8, COMPONENTS, ("per_layer",)).contains(whole.full_depth_point(3))


def test_search_finds_an_early_refusal_that_heretic_ranges_miss(tmp_path: Path) -> None:
    results = {}
    for name, space in (
        ("whole", SearchSpace.whole(8, COMPONENTS)),
        ("heretic", SearchSpace.heretic(8, COMPONENTS)),
    ):
        study = open_study(tmp_path / f"{name}.journal", seed=1, n_startup_trials=10)
        results[name] = run_search(study, space, early_refuser, n_trials=30)
    best = {name: min(result.refusals for result in found) for name, found in results.items()}
    assert best["whole"] <= 0.1 * TOTAL
    assert best["heretic"] > 0.5 * TOTAL


def test_a_restarted_search_continues_without_redoing_trials(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    space = SearchSpace.heretic(8, COMPONENTS)
    first_calls: list = []
    seen: list[Trial] = []
    run_search(
        open_study(journal, seed=3, n_startup_trials=2),
        space,
        counting(early_refuser, first_calls),
        n_trials=3,
        on_trial=seen.append,
    )
    before = finished_trials(open_study(journal, seed=3, n_startup_trials=2))

    second_calls: list = []
    run_search(
        open_study(journal, seed=3, n_startup_trials=2),
        space,
        counting(early_refuser, second_calls),
        n_trials=5,
        on_trial=seen.append,
    )
    after = finished_trials(open_study(journal, seed=3, n_startup_trials=2))

    assert len(first_calls) == 3 and len(second_calls) == 2
    assert [result.number for result in seen] == [1, 2, 3, 4, 5]
    assert [result.number for result in after] == [1, 2, 3, 4, 5]
    assert after[:3] == before
    # The continued sampler does not replay the first points.
    assert all(call not in first_calls for call in second_calls)


def test_a_trial_killed_midway_is_redone_once_and_counted_once(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    space = SearchSpace.heretic(8, COMPONENTS)
    run_search(open_study(journal, seed=5, n_startup_trials=2), space, early_refuser, n_trials=2)
    # A worker dies in the middle of its third trial: sampled, never told.
    study = open_study(journal, seed=5, n_startup_trials=2)
    dying = study.ask()
    interrupted_point = space.sample(dying)

    study = open_study(journal, seed=5, n_startup_trials=2)
    assert recover_interrupted(study) == 1
    calls: list = []
    run_search(study, space, counting(early_refuser, calls), n_trials=4)

    assert calls[0] == interrupted_point
    results = finished_trials(study)
    assert [result.number for result in results] == [1, 2, 3, 4]
    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.RUNNING) == 0


def test_an_interrupted_trial_is_marked_failed_not_counted(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    space = SearchSpace.heretic(8, COMPONENTS)

    def interrupted(values: dict) -> Outcome:
        raise KeyboardInterrupt

    study = open_study(journal, seed=0, n_startup_trials=2)
    with pytest.raises(KeyboardInterrupt):
        run_search(study, space, interrupted, n_trials=3)
    assert finished_trials(study) == []
    assert [trial.state for trial in study.trials] == [TrialState.FAIL]
    # Raising n_trials on a finished study adds trials.
    run_search(study, space, early_refuser, n_trials=1)
    run_search(study, space, early_refuser, n_trials=3)
    assert [result.number for result in finished_trials(study)] == [1, 2, 3]


def test_study_journal_is_an_optuna_journal(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    run_search(
        open_study(journal, seed=0, n_startup_trials=1),
        SearchSpace.heretic(8, COMPONENTS),
        early_refuser,
        n_trials=2,
    )
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    loaded = optuna.load_study(study_name="hctl", storage=storage)
    assert len(loaded.trials) == 2 and loaded.trials[0].user_attrs["number"] == 1


def test_a_nan_kl_is_recorded_as_a_broken_model(tmp_path: Path) -> None:
    def broken(values: dict) -> Outcome:
        return Outcome(legacy_scores(None, TOTAL, float("nan")))

    study = open_study(tmp_path / "study.journal", seed=0, n_startup_trials=1)
    (result,) = run_search(study, SearchSpace.heretic(8, COMPONENTS), broken, n_trials=1)
    assert result.kl == 1e6 and result.refusals is None
    assert study.trials[0].state == TrialState.COMPLETE
