"""Whether to draft is decided by measured pass times and exact pass counts, and changes no
result: the pass cost fit, the counts of passes and tokens with and without drafts (checked
against the engine's own counts), and a plain (undrafted) trial scoring like the plain
evaluation."""

from __future__ import annotations

import random

import pytest

from hctl_worker.draft_policy import DraftPolicy, FinishedReply, PassCost, passes_needed
from hctl_worker.drafts import DraftStore
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS
from hctl_worker.reuse import ReuseOptions
from hctl_worker.trials import Trial
from tests.worker.scoring import evaluator_for, scored, scoring_for
from tests.worker.test_reuse import (
    FIXTURES,
    SYSTEM,
    _fixture_bench,
    _prompts,
    _random_params,
    assert_same_scores,
)


def test_the_pass_cost_is_a_fixed_part_plus_a_part_per_token() -> None:
    cost = PassCost()
    assert cost.fitted() is None
    cost.observe(100, 0.05 + 0.001 * 100)
    assert cost.fitted() is None  # one size: no slope yet
    cost.observe(100, 0.05 + 0.001 * 100)
    assert cost.fitted() is None
    for cells in (1, 10, 1000):
        cost.observe(cells, 0.05 + 0.001 * cells)
    fixed, per_cell = cost.fitted()
    assert fixed == pytest.approx(0.05) and per_cell == pytest.approx(0.001)
    assert cost.estimate(3, 200) == pytest.approx(3 * 0.05 + 200 * 0.001)


def test_passes_are_counted_as_the_engine_runs_them() -> None:
    replies = [
        FinishedReply(0, [5, 6, 7], stopped=False),  # ran to the length limit: 3 choices
        FinishedReply(1, [8], stopped=True),  # then the stop token: 2 choices
    ]
    # Without drafts: one choice per pass; the first pass runs the 4 prompt columns (half of
    # the layers, the rest replayed), then 2 rows, then 1.
    assert passes_needed(replies, 4, 0.5, 3, None) == (3, 2 * 4 * 0.5 + 2 + 1)
    # Packed, the first pass computes the prompts' own tokens only (5 here, not 2 x 4).
    assert passes_needed(replies, 4, 0.5, 3, None, plain_prompt_cells=5) == (3, 5 * 0.5 + 2 + 1)
    # Drafts that are the replies: all in the first pass, which carries them (3 columns wide).
    store = DraftStore()
    assert passes_needed(replies, 4, 1.0, 3, store, [[5, 6, 7], [8]]) == (1, 2 * (4 + 3))
    # A first draft wrong at its second token: [5] kept, 6 chosen; the store then drafts 7 after
    # [5, 6] (one token: the last one is the model's choice), so one more pass ends the reply.
    longer = [FinishedReply(0, [5, 6, 7, 8], stopped=False), replies[1]]
    store.add(0, [5, 6, 7, 8])
    passes, cells = passes_needed(longer, 4, 1.0, 4, store, [[5, 9, 9, 9], [8]])
    assert passes == 2
    assert cells == 2 * (4 + 4) + 1 * (1 + 1)


def test_the_policy_drafts_only_where_measurement_says_it_is_cheaper() -> None:
    def cost_of(fixed: float) -> PassCost:
        cost = PassCost()
        for cells in (1, 100):
            cost.observe(cells, fixed + 0.01 * cells)
        return cost

    replies = [FinishedReply(0, [1, 2, 3], stopped=False)]
    right, wrong = DraftStore(), DraftStore()
    right.add(0, [1, 2, 3])
    wrong.add(0, [9, 9, 9])
    # Every token fed costs, nothing else (a CPU): drafts never pay, even right ones.
    compute = DraftPolicy(cost_of(0.0))
    assert not compute.drafting  # nothing priced yet: no drafts
    compute.observe_batch(replies, 4, 1.0, 3, right, [[1, 2, 3]])
    compute.finish(drafted=False, complete=True)
    assert not compute.drafting  # 7 columns in one pass against 4 + 1 + 1 in three
    # A pass costs much whatever it carries (a GPU): right drafts pay, wrong ones do not.
    passes = DraftPolicy(cost_of(0.5))
    passes.observe_batch(replies, 4, 1.0, 3, wrong, [[9, 9, 9]])
    passes.finish(drafted=False, complete=True)
    assert not passes.drafting
    for _ in range(2):
        passes.observe_batch(replies, 4, 1.0, 3, right, [[1, 2, 3]])
        passes.finish(drafted=False, complete=True)
    assert passes.drafting
    passes.finish(drafted=True, complete=False)  # a stopped generation teaches nothing
    assert passes.drafting
    assert passes.describe() == "1 drafted, 3 plain"
    # Each way is priced with its own first pass: drafts that would pay from a first pass as
    # cheap as the plain one do not when only the plain one is recorded (the drafted one then
    # computes every layer, the plain one a quarter of them).
    even, uneven = DraftPolicy(cost_of(0.5)), DraftPolicy(cost_of(0.5))
    even.observe_batch(replies, 400, 1.0, 3, right, [[1, 2, 3]])
    uneven.observe_batch(replies, 400, 1.0, 3, right, [[1, 2, 3]], None, 0.25)
    for policy in (even, uneven):
        policy.finish(drafted=False, complete=True)
    assert even.drafting and not uneven.drafting


class _Counting(DraftPolicy):
    """Drafts or not as told; records, per batch, the passes counted for both ways (at the
    moment the engine asks), and the passes refilled batches share without drafts."""

    def __init__(self, cost, drafting: bool) -> None:
        super().__init__(cost)
        self.counted: list[tuple[int, int]] = []
        self.forced = drafting

    @property
    def drafting(self) -> bool:
        return self.forced

    def observe_batch(self, replies, columns, share, length, store, first_drafts, *plain_way):
        with_drafts = passes_needed(replies, columns, share, length, store, first_drafts)[0]
        plain = passes_needed(replies, columns, share, length, None)[0]
        self.counted.append((with_drafts, plain))
        super().observe_batch(replies, columns, share, length, store, first_drafts, *plain_way)

    def share_passes(self, passes: int) -> None:
        self.counted.append((0, -passes))  # refilled, the plain way needs that many fewer
        super().share_passes(passes)


@pytest.mark.parametrize("drafting", [True, False])
def test_drafted_or_not_the_counts_match_the_engine_and_the_scores_the_plain_ones(
    drafting: bool,
) -> None:
    loaded, _, ablator, plain, optimised = _fixture_bench("tiny-refuser", 16, 16)
    assert plain.baseline() == optimised.baseline()
    harmful = optimised.evaluator._sets["harmful"]
    # The unmodified model's replies are its drafts: the baseline teaches the policy nothing.
    assert harmful.policy.drafted == harmful.policy.plain == 0
    cost = optimised.reuse.pass_cost
    assert cost.fitted() is not None  # the baseline's passes were timed
    generator = random.Random(5)
    for _ in range(4):
        harmful.policy = counting = _Counting(cost, drafting)
        params = _random_params(generator, loaded.n_layers)
        with ablator.applied(params):
            optimised.evaluator.stats.__init__()
            expected = plain.score()
            context = optimised.evaluator.evaluate()
            context.harmful_replies()
            passes = optimised.evaluator.stats.forward_passes
            counted = list(counting.counted)
            got = optimised.score()
        assert_same_scores(expected, got)
        assert counted and sum(count[0 if drafting else 1] for count in counted) == passes
        assert (counting.drafted > 0) is drafting and (counting.plain > 0) is not drafting


def test_the_kl_pass_is_the_first_pass_of_the_harmless_replies() -> None:
    """With the harmless replies read (the default scorers), a trial's KL pass is kept and the
    harmless replies continue from it: the same scores as the plain evaluation, one pass fewer
    per batch; a trial whose replies are skipped leaves nothing kept for the next one."""
    loaded, bad, ablator, _, _ = _fixture_bench("tiny-refuser", 16, 16)
    good = loaded.template(_prompts(FIXTURES / "tiny-refuser", "harmless_test", 16), SYSTEM)
    scoring = scoring_for(DEFAULT_REFUSAL_MARKERS)  # KeywordRate, KLDivergence, HarmlessRefusals
    common = dict(good=good, bad=bad, max_response_length=8, batch_size=8)
    plain = evaluator_for(loaded, scoring, reuse=ReuseOptions.plain(), **common)
    optimised = evaluator_for(loaded, scoring, unchanged_layers=ablator.unchanged_layers, **common)
    assert scored(scoring, plain).scores == scored(scoring, optimised).scores  # KL exactly 0
    harmless = optimised._sets["harmless"]
    for drafting in (False, True):  # the two runs compared must draft alike
        harmless.policy = _Counting(optimised.reuse.pass_cost, drafting)
        _compare_kept_and_not(loaded, ablator, scoring, plain, optimised, harmless)


def _compare_kept_and_not(loaded, ablator, scoring, plain, optimised, harmless) -> None:
    calls: list[int] = []
    handle = loaded.model.register_forward_pre_hook(lambda *args: calls.append(1))
    generator = random.Random(7)
    for _ in range(4):
        with ablator.applied(_random_params(generator, loaded.n_layers)):
            expected = scored(scoring, plain)
            calls.clear()
            context = optimised.evaluate()
            kl = context.first_token_divergences()
            assert len(harmless._started) == len(harmless.batches)  # kept for the replies
            context.harmless_replies()
            assert harmless._started == {}
            kept_calls = len(calls)
            calls.clear()
            optimised.evaluate()  # a new trial: nothing kept
            optimised.first_token_divergences()  # not kept
            assert harmless._started == {}
            optimised.replies("harmless")
            assert kept_calls == len(calls) - len(harmless.batches)  # one pass fewer a batch
            got = Trial(number=0, scores=scoring.score(context))
        assert got.refusals == expected.refusals
        harmless_refusals = got.scores["HarmlessRefusals"].value
        assert harmless_refusals == expected.scores["HarmlessRefusals"].value
        assert got.kl == pytest.approx(expected.kl, rel=1e-4, abs=1e-7)
        assert float(kl.mean()) == pytest.approx(expected.kl, rel=1e-4, abs=1e-7)
    handle.remove()
