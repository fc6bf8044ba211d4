"""Doing less work per trial changes no result: layer replay, draft replies and pruning give the
refusals and KL of the plain evaluation on the fixtures, and the trials they prune are ones the
plain evaluation ranks behind the front."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState

from hctl_worker import agreement, reuse
from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel
from hctl_worker.directions import last_token_residuals, refusal_directions
from hctl_worker.draft_policy import DraftPolicy
from hctl_worker.drafts import DraftStore
from hctl_worker.evaluation import Evaluator
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS
from hctl_worker.model import LoadedModel, load_model
from hctl_worker.pruning import PruningBar
from hctl_worker.replay import DepthPlan, plan_depth
from hctl_worker.reuse import ReuseOptions
from hctl_worker.scorers import Scoring
from hctl_worker.search_space import SearchSpace
from hctl_worker.study import Outcome, finished_trials, open_study, run_search
from hctl_worker.trials import Trial, behind_front, legacy_scores, pareto_front
from tests.worker.random_models import random_loaded
from tests.worker.scoring import evaluator_for, scoring_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SYSTEM = "You are a helpful assistant."


# ---- pure parts ------------------------------------------------------------------------------


def test_the_depth_plan_buys_depth_first_then_spreads_checkpoints() -> None:
    assert plan_depth(8, 10, 100, 7 * 10 + 7 * 100) == DepthPlan(7, (1, 2, 3, 4, 5, 6, 7))
    assert plan_depth(8, 10, 100, 7 * 10 + 4 * 100) == DepthPlan(7, (1, 3, 5, 7))
    assert plan_depth(8, 10, 100, 4 * 10 + 100) == DepthPlan(4, (4,))
    assert plan_depth(8, 10, 100, 50) == DepthPlan(0, ())
    assert plan_depth(8, 10, 100, 0) == DepthPlan(0, ())
    plan = DepthPlan(8, (2, 4, 6, 8))
    assert [plan.start_for(k) for k in (0, 1, 2, 5, 30)] == [0, 0, 2, 4, 8]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 30])
def test_the_shortcut_check_reads_logits_in_chunks_and_decides_as_on_all_rows(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """The check that a shortcut gives the plain pass's distributions compares a few rows at a
    time (no float32 copy of every row); per row it is the whole-batch KL and argmax test."""
    generator = torch.Generator().manual_seed(0)
    plain = torch.randn(23, 50, generator=generator)
    loaded = SimpleNamespace(dtype=torch.float32)
    monkeypatch.setattr(agreement, "AGREEMENT_CHUNK_ELEMENTS", chunk * 50)
    nudged = plain + 1e-3 * torch.randn(plain.shape, generator=generator)
    assert agreement.agree(loaded, plain, plain.clone())
    whole = torch.nn.functional.kl_div(
        torch.log_softmax(nudged, -1),
        torch.log_softmax(plain, -1),
        reduction="batchmean",
        log_target=True,
    )
    assert float(whole) < agreement.TOLERANCE
    assert agreement.agree(loaded, plain, nudged) == bool(
        (plain.argmax(-1) == nudged.argmax(-1)).all()
    )
    moved = plain.clone()
    moved[-1] = torch.roll(moved[-1], 1)  # one row, the last chunk's, a different distribution
    assert not agreement.agree(loaded, plain, moved)


def test_drafts_follow_the_most_frequent_reply_that_starts_like_this_one() -> None:
    store = DraftStore()
    store.add(0, [1, 2, 3, 4])
    store.add(0, [1, 2, 5])
    store.add(0, [1, 2, 5, 6])
    assert store.draft(0, [], 10) == [1, 2, 5, 6]
    assert store.draft(0, [1, 2, 3], 10) == [4]
    assert store.draft(0, [1, 2], 1) == [5]
    assert store.draft(0, [7], 10) == []
    assert store.draft(1, [], 10) == []


def test_the_pruning_bar_is_the_fewest_refusals_at_no_higher_kl_plus_the_margin() -> None:
    trials = [
        Trial(number=1, kl=0.01, refusals=20, total_bad=32),
        Trial(number=2, kl=0.05, refusals=5, total_bad=32),
        Trial(number=3, kl=0.03, refusals=25, total_bad=32),  # behind trial 1
        Trial(number=4, kl=0.001, refusals=None, total_bad=32),  # skipped: no score
    ]
    bar = PruningBar(trials, margin=2)
    assert bar.refusal_limit(0.005) is None  # nothing on the front has a KL this low
    assert bar.refusal_limit(0.02) == 22
    assert bar.refusal_limit(0.5) == 7
    assert bar.refusal_limit(float("nan")) is None
    assert PruningBar.for_prompts(trials, 32, 0.05).margin == 2  # 1.6 rounded up


# ---- the engine against the plain evaluation -------------------------------------------------


def _prompts(fixture: Path, name: str, count: int) -> list[str]:
    lines = (fixture / "prompts" / f"{name}.txt").read_text().splitlines()
    return [line for line in lines if line.strip()][:count]


def assert_same_scores(expected: Trial, got: Trial) -> None:
    """The optimised evaluation's refusals are the plain one's, its KL within float rounding."""
    assert got.refusals == expected.refusals
    assert got.kl == pytest.approx(expected.kl, rel=1e-4, abs=1e-7)


def _random_params(generator: random.Random, n_layers: int) -> AblationParams:
    last = max(n_layers - 1, 1)

    def kernel() -> ComponentKernel:
        peak = generator.uniform(0.3, 1.5)
        return ComponentKernel(
            max_weight=peak,
            max_weight_position=generator.uniform(0, last),
            min_weight=generator.uniform(0, 1) * peak,
            min_weight_distance=generator.uniform(0.5, last),
        )

    index = None if generator.random() < 0.3 else generator.uniform(0, last)
    return AblationParams(index, {"attention": kernel(), "mlp": kernel()})


def _fixture_bench(name: str, n_good: int, n_bad: int):
    """A fixture model, its templated test prompts, an ablator, and the plain and the optimised
    evaluator of the same prompts."""
    fixture = FIXTURES / name
    loaded = load_model(str(fixture), dtypes=["float32"], device_map="cpu")
    good = loaded.template(_prompts(fixture, "harmless_test", n_good), SYSTEM)
    bad = loaded.template(_prompts(fixture, "harmful_test", n_bad), SYSTEM)
    residuals_bad = last_token_residuals(loaded, bad, 8)
    residuals_good = last_token_residuals(loaded, good, 8)
    ablator = Ablator(loaded, refusal_directions(residuals_bad, residuals_good))
    plain, optimised = _evaluators(
        loaded,
        ablator,
        good,
        bad,
        markers=DEFAULT_REFUSAL_MARKERS,
        max_response_length=12,
        batch_size=8,
    )
    return loaded, bad, ablator, plain, optimised


class _Scored:
    """An evaluator scored by heretic's two objectives (markers, first-token KL), every trial
    measured in full unless pruned."""

    def __init__(self, scoring: Scoring, evaluator: Evaluator) -> None:
        self.scoring, self.evaluator = scoring, evaluator
        self.reuse, self.stats = evaluator.reuse, evaluator.stats

    @property
    def shares_prefix(self) -> int:
        return self.evaluator.shares_prefix

    def score(self, refusal_limit=None) -> Trial:
        context = self.evaluator.evaluate()
        scores = self.scoring.score(context, refusal_limit)
        return Trial(number=0, scores=scores, pruned=context.pruned)

    def baseline(self) -> dict:
        return self.score().scores


def _evaluators(
    loaded: LoadedModel, ablator: Ablator, good: list[str], bad: list[str], *, markers, **common
):
    scoring = scoring_for(
        markers,
        scorers=[
            {"name": "KeywordRate", "optimization": "minimize"},
            {"name": "KLDivergence", "optimization": "minimize"},
        ],
    )
    plain = evaluator_for(
        loaded,
        scoring,
        good=good,
        bad=bad,
        reuse=ReuseOptions.plain(),
        **common,
    )
    optimised = evaluator_for(
        loaded, scoring, good=good, bad=bad, unchanged_layers=ablator.unchanged_layers, **common
    )
    return _Scored(scoring, plain), _Scored(scoring, optimised)


@pytest.mark.parametrize("name", ["tiny-refuser", "tiny-refuser-early"])
def test_reuse_gives_the_plain_evaluations_refusals_and_kl_in_fewer_passes(name: str) -> None:
    loaded, _, ablator, plain, optimised = _fixture_bench(name, 24, 24)
    assert optimised.reuse.plan.enabled and optimised.shares_prefix > 0
    assert optimised.reuse.packed and not plain.reuse.packed
    assert plain.baseline() == optimised.baseline()
    generator = random.Random(3)
    starts, refusal_counts, passes = [], set(), {"plain": 0, "optimised": 0}
    for _ in range(10):
        params = _random_params(generator, loaded.n_layers)
        plain.stats.__init__()
        optimised.stats.__init__()
        with ablator.applied(params):
            starts.append(optimised.reuse.plan.start_for(ablator.unchanged_layers()))
            expected, got = plain.score(), optimised.score()
        assert_same_scores(expected, got)
        passes["plain"] += plain.stats.forward_passes
        passes["optimised"] += optimised.stats.forward_passes
        refusal_counts.add(expected.refusals)
    # The check meant something: some trials started above layer 0, drafts saved passes, and
    # refusals varied.
    assert any(start > 0 for start in starts)
    assert passes["optimised"] < passes["plain"]
    assert len(refusal_counts) > 1


@pytest.mark.parametrize("architecture", ["qwen3", "gemma2", "lfm2"])
def test_models_whose_caches_cannot_be_replayed_fall_back_to_the_same_scores(
    architecture: str,
) -> None:
    """Sliding-window and convolution caches are neither replayed nor shared; scores agree."""
    loaded = random_loaded(architecture)
    prompts = [
        "Hello there!",
        "How do I bake bread?",
        "Tell me a joke.",
        "x",
        "Why is the sky blue?",
    ]
    texts = loaded.template(prompts, SYSTEM)
    residuals = last_token_residuals(loaded, texts, 4)
    ablator = Ablator(loaded, refusal_directions(residuals[:2], residuals[2:]))
    plain, optimised = _evaluators(
        loaded, ablator, texts[:3], texts, markers=["e", "zz"], max_response_length=6, batch_size=2
    )
    assert optimised.reuse.plan.enabled is (architecture == "qwen3")
    assert optimised.reuse.use_drafts is (architecture == "qwen3")
    assert optimised.reuse.packed is (architecture == "qwen3")
    kernel = ComponentKernel(1.2, 2.0, 1.2, 0.5)  # layer 2 only
    with ablator.applied(AblationParams(1.5, {"attention": kernel, "mlp": kernel})):
        expected, got = plain.score(), optimised.score()
    assert_same_scores(expected, got)


def test_a_pruned_trial_is_one_the_plain_evaluation_ranks_behind_the_front() -> None:
    _, bad, ablator, plain, optimised = _fixture_bench("tiny-refuser", 16, 24)
    # A front of one trial that removes the refusals at little KL...
    late = ComponentKernel(1.5, 3.0, 1.0, 0.5)
    with ablator.applied(AblationParams(3.0, {"attention": late, "mlp": late})):
        best = plain.score()
    front = [Trial(number=1, kl=best.kl, refusals=best.refusals, total_bad=len(bad))]
    # ...and trials with early directions, which keep refusing, some at a higher KL.
    generator = random.Random(11)
    pruned = 0
    for number in range(2, 10):
        early = ComponentKernel(generator.uniform(1.0, 1.5), generator.uniform(0, 2), 1.0, 3.0)
        params = AblationParams(generator.uniform(0, 1.5), {"attention": early, "mlp": early})
        with ablator.applied(params):
            full = plain.score()
            bar = PruningBar(front, margin=1)
            fast = optimised.score(refusal_limit=bar.refusal_limit)
        assert fast.kl == pytest.approx(full.kl, rel=1e-4, abs=1e-7)
        if not fast.pruned:
            assert fast.refusals == full.refusals
            continue
        pruned += 1
        # Pruned: the count so far is a lower bound, and the full evaluation puts the trial
        # behind the front.
        assert fast.refusals <= full.refusals
        assert fast.refusals >= bar.refusal_limit(fast.kl)
        trial = Trial(number=number, kl=full.kl, refusals=full.refusals, total_bad=len(bad))
        assert pareto_front([*front, trial]) == front
    assert pruned > 0


def test_a_trial_the_front_beats_gets_no_guard_measured_and_could_not_have_made_the_front() -> None:
    fixture = FIXTURES / "tiny-refuser"
    loaded = load_model(str(fixture), dtypes=["float32"], device_map="cpu")
    good = loaded.template(_prompts(fixture, "harmless_test", 16), SYSTEM)
    bad = loaded.template(_prompts(fixture, "harmful_test", 16), SYSTEM)
    directions = refusal_directions(
        last_token_residuals(loaded, bad, 8), last_token_residuals(loaded, good, 8)
    )
    ablator = Ablator(loaded, directions)
    scoring = scoring_for(DEFAULT_REFUSAL_MARKERS)  # refusals, KL and the harmless guard
    evaluator = evaluator_for(
        loaded, scoring, good=good, bad=bad, max_response_length=12, batch_size=8
    )
    scoring.set_baseline(scoring.score(evaluator.evaluate()))
    guard = next(name for name in scoring.names if name in scoring.limits)

    def trial(number: int, params: AblationParams, front=None) -> tuple[Trial, bool]:
        """The trial, and whether its harmless replies were generated."""
        generating = evaluator.seconds.get("harmless_replies", 0.0)
        with ablator.applied(params):
            scores = scoring.score(evaluator.evaluate(), front=front)
        answered = evaluator.seconds.get("harmless_replies", 0.0) > generating
        return Trial(number=number, scores=scores), answered

    late = ComponentKernel(1.5, 3.0, 1.0, 0.5)
    best, _ = trial(1, AblationParams(3.0, {"attention": late, "mlp": late}))
    off = ComponentKernel(0.0, 0.0, 0.0, 1.0)  # weight 0 everywhere: the original, KL 0
    untouched, _ = trial(2, AblationParams(1.0, {"attention": off, "mlp": off}))
    front = pareto_front([best, untouched])
    assert front == [best, untouched] and untouched.kl == 0 and untouched.refusals > 0
    generator = random.Random(5)
    skipped = measured = 0
    for number in range(3, 13):
        params = _random_params(generator, loaded.n_layers)
        fast, fast_answered = trial(number, params, front)
        full, full_answered = trial(number, params)
        assert full_answered
        # The objectives are measured alike; only the guard (and its replies) may be left out.
        assert fast.refusals == full.refusals
        assert fast.kl == pytest.approx(full.kl, rel=1e-5, abs=1e-8)
        if fast.scores[guard].value is None:
            skipped += 1
            assert not fast_answered  # the harmless replies were not generated
            # The fully measured trial could not have made the front either.
            assert pareto_front([*front, full]) == front
        else:
            measured += 1
            assert fast_answered
            assert fast.scores[guard].value == full.scores[guard].value
            assert not behind_front(front, full.objectives())
    assert skipped > 0 and measured > 0


def test_pruned_trials_are_in_the_journal_count_as_finished_and_stay_off_the_front(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "journal.log"
    space = SearchSpace.heretic(8, ("attention", "mlp"))
    outcomes = iter(
        [
            Outcome(legacy_scores(3, 10, 0.01)),
            Outcome(legacy_scores(5, 10, 0.02), pruned=True),
            Outcome(legacy_scores(8, 10, 0.005)),
        ]
    )
    trials = run_search(
        open_study(journal, seed=1, n_startup_trials=5),
        space,
        lambda values: next(outcomes),
        n_trials=3,
    )
    assert [trial.pruned for trial in trials] == [False, True, False]
    assert [trial.number for trial in pareto_front(trials)] == [1, 3]
    study = optuna.load_study(
        study_name="hctl", storage=open_study(journal, seed=1, n_startup_trials=5)._storage
    )
    assert [trial.state for trial in study.trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    ]
    # A resumed search counts the pruned trial as done and reads it back as it was.
    again = open_study(journal, seed=1, n_startup_trials=5)
    assert [trial.pruned for trial in finished_trials(again)] == [False, True, False]
    assert finished_trials(again)[1].refusals == 5
    assert (
        len(run_search(again, space, lambda values: Outcome(legacy_scores(1, 10, 1.0)), n_trials=3))
        == 3
    )


def test_unchanged_layers_are_those_below_every_edited_one() -> None:
    loaded = load_model(str(FIXTURES / "tiny-refuser"), dtypes=["float32"], device_map="cpu")
    ablator = Ablator(loaded, torch.randn(loaded.n_layers + 1, loaded.hidden_size))
    assert ablator.unchanged_layers() == loaded.n_layers  # no trial: nothing edited
    late = ComponentKernel(1.0, 3.0, 0.5, 1.0)  # layers 2 and 3
    off = ComponentKernel(0.0, 0.0, 0.0, 1.0)  # weight 0 everywhere: edits nothing
    with ablator.applied(AblationParams(1.0, {"attention": late, "mlp": off})):
        assert ablator.unchanged_layers() == 2
    with ablator.applied(AblationParams(1.0, {"attention": late, "mlp": late})):
        assert ablator.unchanged_layers() == 2
    early = ComponentKernel(1.0, 0.0, 1.0, 1.0)  # layers 0 and 1
    with ablator.applied(AblationParams(1.0, {"attention": late, "mlp": early})):
        assert ablator.unchanged_layers() == 0
    assert ablator.unchanged_layers() == loaded.n_layers


class _Drafting(DraftPolicy):
    """Always drafts."""

    @property
    def drafting(self) -> bool:
        return True


class _NeverDrafting(DraftPolicy):
    """Never drafts (the measured policy may, where a pass with drafts times cheaper)."""

    @property
    def drafting(self) -> bool:
        return False


def _recorded(first) -> int:
    return first.recording.nbytes() if first.recording is not None else 0


@pytest.mark.parametrize("drafting", [False, True])
def test_a_tight_budget_records_the_passes_without_drafts_first(
    monkeypatch: pytest.MonkeyPatch, drafting: bool
) -> None:
    """In a budget too small for every recording, the passes trials run without drafts keep
    the whole plan and the passes with drafts get none: a trial that drafts runs those from
    layer 0. Every trial scores as the plain evaluation, drafted or not."""
    fixture = FIXTURES / "tiny-refuser"
    loaded = load_model(str(fixture), dtypes=["float32"], device_map="cpu")
    good = loaded.template(_prompts(fixture, "harmless_test", 12), SYSTEM)
    # Prompts of very different lengths in one batch: its first pass is packed.
    words = [*_prompts(fixture, "harmful_test", 12), "Hi", "Why?", "Do it.", "Now"]
    bad = loaded.template(words, SYSTEM)
    residuals = [last_token_residuals(loaded, texts, 8) for texts in (bad, good)]
    ablator = Ablator(loaded, refusal_directions(*residuals))
    common = dict(markers=DEFAULT_REFUSAL_MARKERS, max_response_length=12, batch_size=16)
    plain, roomy = _evaluators(loaded, ablator, good, bad, **common)
    passes = list(roomy.reuse.first_passes.values())
    drafted = [first for first in passes if first.prompts_only is not None]
    assert drafted and all(first.recording is not None for first in drafted)
    without = sum(_recorded(first.prompts_only or first) for first in passes)
    without += roomy.reuse.prefix.recording.nbytes()
    with_drafts = sum(_recorded(first) for first in drafted)
    monkeypatch.setattr(reuse, "MINIMUM_REPLAY_BYTES", 0)
    fraction = (without + with_drafts / 2) / roomy.reuse._model_bytes
    tight = _Scored(
        plain.scoring,
        evaluator_for(
            loaded,
            plain.scoring,
            good=good,
            bad=bad,
            max_response_length=12,
            batch_size=16,
            unchanged_layers=ablator.unchanged_layers,
            reuse=ReuseOptions(replay_memory=fraction),
        ),
    )
    assert tight.reuse.plan == roomy.reuse.plan and tight.reuse.plan.enabled
    for first in tight.reuse.first_passes.values():
        assert (first.prompts_only or first).recording is not None
        if first.prompts_only is not None:
            assert first.recording is None
    assert tight.reuse.recorded_bytes() <= tight.reuse.memory_budget()
    harmful = tight.evaluator._sets["harmful"]
    harmful.policy = (_Drafting if drafting else _NeverDrafting)(tight.reuse.pass_cost)
    generator = random.Random(8)
    starts = []
    for _ in range(5):
        params = _random_params(generator, loaded.n_layers)
        with ablator.applied(params):
            starts.append(tight.reuse.plan.start_for(ablator.unchanged_layers()))
            expected, got = plain.score(), tight.score()
        assert_same_scores(expected, got)
    assert any(start > 0 for start in starts)
    assert harmful.policy.drafted == (5 if drafting else 0)


def test_the_shared_prefix_is_computed_once_per_trial() -> None:
    """A trial's KL pass and its replies share one refreshed prefix; the next trial (a new
    edit) refreshes it again, and its scores are still the plain evaluation's."""
    loaded, _, ablator, plain, optimised = _fixture_bench("tiny-refuser", 16, 16)
    prefix = optimised.reuse.prefix
    assert prefix is not None
    refreshes: list[int] = []
    refresh = prefix.refresh

    def counted(*args, **kwargs) -> None:
        refreshes.append(1)
        refresh(*args, **kwargs)

    prefix.refresh = counted
    generator = random.Random(5)
    for trial in range(3):
        with ablator.applied(_random_params(generator, loaded.n_layers)):
            expected, got = plain.score(), optimised.score()
        assert_same_scores(expected, got)
        assert len(refreshes) == trial + 1
