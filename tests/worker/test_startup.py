"""The study's first trials: canonical (classic abliteration) trials and startup points drawn from
the measurements, queued once per study whatever restarts or other workers do."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from optuna.trial import TrialState

from hctl_worker.priors import RefusalProfile, coverage_reach, draw_heretic, draw_measured
from hctl_worker.search_space import SearchSpace, to_ablation_params
from hctl_worker.startup import (
    KEY_ATTR,
    canonical_trials,
    enqueue_once,
    plan_startup,
    superseded,
)
from hctl_worker.study import Outcome, finished_trials, open_study, recover_interrupted, run_search
from hctl_worker.trials import legacy_scores, pareto_front
from tests.worker.test_search import COMPONENTS, TOTAL, tent_weight

LAYERS = 8


def profile_of(separation: list[float], written: list[tuple[float, float]]) -> RefusalProfile:
    """A profile whose writes (attention, MLP per layer) are the same along every direction."""
    per_direction = tuple(tuple(layer) for layer in written)
    return RefusalProfile(
        separation=tuple(separation),
        written=tuple(per_direction for _ in separation),
        components=COMPONENTS,
    )


# Read best at the last layer, written only by the first two layers' MLPs (the trap the old
# "measured onset" ranges fell into: they looked where refusal reads, not where it is written).
READ_LATE_WRITTEN_EARLY = profile_of(
    [0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 9.0],
    [(0.1, 3.0), (0.0, 2.0)] + [(0.0, 0.0)] * 6,
)


def classic_only(values: dict) -> Outcome:
    """A fake model only classic abliteration fixes: a direction from the last two layers,
    removed at weight >= 0.9 from both components of every layer (written throughout)."""
    full = all(
        tent_weight(values, component, layer) >= 0.9
        for component in COMPONENTS
        for layer in range(LAYERS)
    )
    late = values["direction_scope"] == "global" and float(values["direction_index"]) >= 5.5
    refusals = 0 if full and late else TOTAL
    return Outcome(legacy_scores(refusals, TOTAL, 0.002))


def test_canonical_trials_project_the_best_directions_out_of_every_layer() -> None:
    space = SearchSpace.whole(LAYERS, COMPONENTS)
    planned = canonical_trials(space, READ_LATE_WRITTEN_EARLY)
    assert [trial.key for trial in planned] == ["canonical:7", "canonical:5", "canonical:4"]
    for trial in planned:
        assert trial.user_attrs["origin"] == "canonical"
        params = to_ablation_params(trial.params, COMPONENTS)
        assert params.direction_index == float(trial.key.split(":")[1])
        assert all(kernel.max_weight == 1.0 for kernel in params.kernels.values())
    # Settings that rule out one direction for all layers get the per-layer classic edit.
    per_layer = canonical_trials(
        SearchSpace.whole(LAYERS, COMPONENTS, ("per_layer",)), READ_LATE_WRITTEN_EARLY
    )
    assert [trial.key for trial in per_layer] == ["canonical:per_layer"]


def test_best_layers_are_spread_over_a_deep_model() -> None:
    # Separation rising to the last layer: the best of all, of the first 80 %, of the first 60 %.
    rising = profile_of([0.0] + [float(layer) for layer in range(30)], [(0.0, 1.0)] * 30)
    assert rising.best_layers(3) == [29, 23, 17]
    assert READ_LATE_WRITTEN_EARLY.best_layers(3) == [7, 5, 4]
    # Separation peaking mid-depth: the peak first, then the best a tenth of the depth away.
    peaked = [0.0] + [10.0 - abs(layer - 12) * 0.5 for layer in range(30)]
    assert profile_of(peaked, [(0.0, 1.0)] * 30).best_layers(3) == [12, 15, 9]
    broken = profile_of([0.0, float("nan"), 2.0, 1.0], [(0.0, 1.0)] * 3)
    assert broken.best_layers(3) == [1, 2]


def test_measured_draws_edit_where_refusal_is_written_not_where_it_is_read() -> None:
    space = SearchSpace.whole(LAYERS, COMPONENTS)
    rng = random.Random(0)
    draws = [draw_measured(READ_LATE_WRITTEN_EARLY, space, rng) for _ in range(200)]
    for draw in draws:
        assert space.contains(draw)
        assert float(draw["direction_index"]) >= 3.5  # a direction that reads refusal well
        # The MLP kernel reaches layers 0 and 1, where refusal is written.
        assert tent_weight(draw, "mlp", 0) > 0 and tent_weight(draw, "mlp", 1) > 0
    peaks = [float(draw["mlp.max_weight_position"]) for draw in draws]
    assert sum(peak < 2 for peak in peaks) == len(peaks)
    heretic = SearchSpace.heretic(LAYERS, COMPONENTS)
    assert all(heretic.contains(draw_heretic(space, rng)) for _ in range(50))


def test_coverage_reach_is_the_distance_holding_most_of_the_writes() -> None:
    assert coverage_reach([0.0, 1.0, 0.0, 0.0], peak=1.0) == 0.0
    assert coverage_reach([1.0, 1.0, 1.0, 1.0, 1.0], peak=2.0, share=0.8) == 2.0
    assert coverage_reach([0.0, 0.0], peak=0.0) == 2.0  # nothing written: the whole depth


def test_the_plan_is_deterministic_and_lies_in_the_space() -> None:
    space = SearchSpace.whole(LAYERS, COMPONENTS)
    plan = plan_startup(space, READ_LATE_WRITTEN_EARLY, n_startup_trials=11, seed=4)
    assert plan == plan_startup(space, READ_LATE_WRITTEN_EARLY, n_startup_trials=11, seed=4)
    assert Counter(trial.source for trial in plan) == {"canonical": 3, "measured": 4, "heretic": 2}
    assert all(space.contains(trial.params) for trial in plan)
    assert len({trial.key for trial in plan}) == len(plan)


def test_classic_abliteration_is_never_missed(tmp_path: Path) -> None:
    space = SearchSpace.whole(LAYERS, COMPONENTS)
    study = open_study(tmp_path / "study.journal", seed=1, n_startup_trials=10)
    plan = plan_startup(space, READ_LATE_WRITTEN_EARLY, n_startup_trials=10, seed=1)
    enqueue_once(study, plan)
    found = run_search(study, space, classic_only, n_trials=5, skip=superseded)
    assert [trial.origin for trial in found[:3]] == ["canonical"] * 3
    assert [trial.refusals for trial in found[:3]] == [
        0,
        TOTAL,
        TOTAL,
    ]  # layer 7 works, 5 and 4 not
    assert all(trial.origin is None for trial in found[3:])
    assert pareto_front(found)[0].origin == "canonical"
    # heretic's ranges, without the canonical trials, miss it.
    heretic = open_study(tmp_path / "heretic.journal", seed=1, n_startup_trials=10)
    missed = run_search(heretic, SearchSpace.heretic(LAYERS, COMPONENTS), classic_only, n_trials=20)
    assert min(trial.refusals for trial in missed) == TOTAL


def test_a_resumed_study_does_not_queue_its_first_trials_again(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    space = SearchSpace.whole(LAYERS, COMPONENTS)
    plan = plan_startup(space, READ_LATE_WRITTEN_EARLY, n_startup_trials=6, seed=2)
    assert enqueue_once(open_study(journal, seed=2, n_startup_trials=6), plan) == len(plan)
    run_search(open_study(journal, seed=2, n_startup_trials=6), space, classic_only, n_trials=2)

    resumed = open_study(journal, seed=2, n_startup_trials=6)
    assert enqueue_once(resumed, plan) == 0
    run_search(resumed, space, classic_only, n_trials=10, skip=superseded)
    keys = Counter(
        trial.user_attrs.get(KEY_ATTR)
        for trial in open_study(journal, seed=2, n_startup_trials=6).trials
    )
    assert all(keys[trial.key] == 1 for trial in plan)
    assert [trial.number for trial in finished_trials(resumed)] == list(range(1, 11))


def test_a_plan_queued_twice_by_two_workers_runs_each_point_once(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    space = SearchSpace.whole(LAYERS, COMPONENTS)
    plan = plan_startup(space, READ_LATE_WRITTEN_EARLY, n_startup_trials=6, seed=3)
    # Two workers start together: each sees no plan yet and queues all of it.
    first, second = (open_study(journal, seed=3, n_startup_trials=6) for _ in range(2))
    for study in (first, second):
        for planned in plan:
            study.enqueue_trial(planned.params, user_attrs=planned.user_attrs)
    run_search(first, space, classic_only, n_trials=4, skip=superseded)
    run_search(second, space, classic_only, n_trials=9, skip=superseded)

    study = open_study(journal, seed=3, n_startup_trials=6)
    done = Counter(
        trial.user_attrs.get(KEY_ATTR) for trial in study.get_trials(states=(TrialState.COMPLETE,))
    )
    assert all(done[planned.key] == 1 for planned in plan)
    assert len(study.get_trials(states=(TrialState.FAIL,))) == len(plan)  # the copies, dropped
    assert len(finished_trials(study)) == 9
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_an_interrupted_canonical_trial_runs_again_as_canonical(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    space = SearchSpace.whole(LAYERS, COMPONENTS)
    plan = canonical_trials(space, READ_LATE_WRITTEN_EARLY)
    study = open_study(journal, seed=5, n_startup_trials=4)
    enqueue_once(study, plan)
    dying = study.ask()  # the worker dies during the first canonical trial
    space.sample(dying)

    study = open_study(journal, seed=5, n_startup_trials=4)
    assert recover_interrupted(study) == 1
    found = run_search(study, space, classic_only, n_trials=3, skip=superseded)
    assert [trial.origin for trial in found] == ["canonical"] * 3
    assert sorted(float(trial.params["direction_index"]) for trial in found) == [4.0, 5.0, 7.0]
