"""A pass that checks drafts computes logits at every drafted column; drafts longer than the
logits budget (`Context.most_logits`) are checked over several passes, with the same replies."""

from __future__ import annotations

import random

from hctl_worker.first_pass import Context
from tests.worker.test_reuse import (
    _Drafting,
    _fixture_bench,
    _random_params,
    assert_same_scores,
)

ROWS = 8  # the bench's batch size
COLUMNS = 2  # logit columns per row a pass may compute under the tight budget: 1 drafted


def test_the_draft_room_is_what_the_logits_budget_leaves_each_row() -> None:
    assert Context().draft_room(8) is None  # no budget: no limit
    assert Context(most_logits=32).draft_room(8) == 3  # the next token and 3 drafted
    assert Context(most_logits=32).draft_room(32) == 0
    assert Context(most_logits=32).draft_room(64) == 0  # never fewer than the next token


def test_drafts_past_the_logits_budget_give_the_same_scores_in_more_passes() -> None:
    loaded, _, ablator, plain, optimised = _fixture_bench("tiny-refuser", 8, 16)
    harmful = optimised.evaluator._sets["harmful"]
    harmful.policy = _Drafting(optimised.reuse.pass_cost)
    optimised.reuse.refill = False  # a pass holds at most ROWS rows
    widest: list[int] = []
    head = loaded.model.get_output_embeddings()
    handle = head.register_forward_hook(
        lambda m, a, output: widest.append(output.shape[:-1].numel())
    )
    try:
        # The unmodified model drafts its own replies whole (12 tokens): 13 logit columns a row.
        optimised.stats.__init__()
        assert optimised.baseline() == plain.baseline()
        roomy = optimised.stats.forward_passes
        assert max(widest) > COLUMNS * ROWS
        assert optimised.stats.accepted > 0
        # One row's logit vector takes as many bytes as the budget holds COLUMNS * ROWS of.
        optimised.reuse._logit_bytes = optimised.reuse.memory_budget() // (COLUMNS * ROWS)
        widest.clear()
        optimised.stats.__init__()
        assert optimised.baseline() == plain.baseline()
        assert optimised.stats.forward_passes > roomy
        generator = random.Random(5)
        for _ in range(4):
            with ablator.applied(_random_params(generator, loaded.n_layers)):
                expected, got = plain.score(), optimised.score()
            assert_same_scores(expected, got)
    finally:
        handle.remove()
    assert optimised.stats.accepted > 0  # drafts were still checked, a few at a time
    assert max(widest) <= COLUMNS * ROWS
