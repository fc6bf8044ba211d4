"""Refilled batches: as a batch's replies finish, the next batch's rows join it (`refill.py`).
Each reply must be the one its batch gives alone, on every family whose cache can be joined; the
others must run their batches apart, with the same replies."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel
from hctl_worker.directions import last_token_residuals, refusal_directions
from hctl_worker.generation import Context, GenerationStats, encode_texts, generate
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS, contains_marker, normalise_response
from hctl_worker.model import load_model
from hctl_worker.refill import (
    MAX_ROWS_FACTOR,
    cache_bytes,
    join_rows,
    joinable,
    refilled_passes,
    row_limit,
)
from hctl_worker.reuse import ReuseOptions
from tests.worker.random_models import random_loaded
from tests.worker.scoring import evaluator_for, scoring_for
from tests.worker.test_reuse import FIXTURES, SYSTEM, _prompts

# Lengths that differ within and across batches (batches are grouped by length).
PROMPTS = [
    "Hi",
    "How do I bake bread at home?",
    "Tell me a joke.",
    "x",
    "Why is the sky blue, and why are sunsets red?",
    "Name a colour.",
    "What is two plus two?",
    "Write one line about the sea and the wind over it.",
    "ok",
    "Explain rain.",
]


def _cache(rows: int, columns: int, fill: float, layers: int = 2) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(layers):
        keys = torch.full((rows, 2, columns, 4), fill)
        cache.update(keys, keys + 0.5, layer)
    return cache


def test_joined_rows_are_padded_on_the_left_and_masked_there() -> None:
    running, joining = _cache(2, 5, 1.0), _cache(3, 3, 2.0)
    mask = torch.ones((2, 5), dtype=torch.long)
    mask[0, 0] = 0  # a column the running batch already masks stays masked
    assert joinable(running, mask) and joinable(joining, torch.ones((3, 3)))
    assert not joinable(running, torch.ones((2, 4)))  # the mask must hold the cache's columns
    joint = join_rows(running, mask, joining, torch.ones((3, 3), dtype=torch.long))
    assert joint.tolist() == [[0, 1, 1, 1, 1], [1] * 5] + [[0, 0, 1, 1, 1]] * 3
    for layer in running.layers:
        assert layer.keys.shape == layer.values.shape == (5, 2, 5, 4)
        assert torch.equal(layer.keys[:2], torch.full((2, 2, 5, 4), 1.0))
        assert torch.equal(layer.keys[2:, :, :2], torch.zeros((3, 2, 2, 4)))
        assert torch.equal(layer.keys[2:, :, 2:], torch.full((3, 2, 3, 4), 2.0))
        assert torch.equal(layer.values[2:, :, 2:], torch.full((3, 2, 3, 4), 2.5))
    # The shorter side may be the running one too (a long next batch, few steps in).
    longer = _cache(1, 7, 3.0)
    joint = join_rows(running, joint, longer, torch.ones((1, 7), dtype=torch.long))
    assert joint.shape == (6, 7) and joint[:5, :2].sum() == 0
    assert running.layers[0].keys.shape == (6, 2, 7, 4)


def test_the_refusers_replies_are_its_own_with_refilled_batches() -> None:
    """On a model that refuses harmful prompts (a marker, early) and answers harmless ones (to
    the length limit), batches of both thin out, and the next ones join them."""
    fixture = FIXTURES / "tiny-refuser"
    loaded = load_model(str(fixture), dtypes=["float32"], device_map="cpu")
    harmful, harmless = (_prompts(fixture, name, 12) for name in ("harmful_test", "harmless_test"))
    texts = loaded.template(
        [p for pair in zip(harmful, harmless, strict=True) for p in pair], SYSTEM
    )
    batches = encode_texts(loaded, texts, 4)
    runs = {}
    for refill in (False, True):
        stats = GenerationStats()
        context = Context(refill_bytes=2**30 if refill else 0)
        replies = generate(loaded, batches, 16, DEFAULT_REFUSAL_MARKERS, stats, context=context)
        runs[refill] = replies, stats
    assert runs[True][0] == runs[False][0]
    refused = sum(
        contains_marker(normalise_response(r), DEFAULT_REFUSAL_MARKERS) for r in runs[True][0]
    )
    assert 0 < refused < len(texts)  # the batches thin out
    assert runs[True][1].tokens == runs[False][1].tokens
    # The same tokens in fewer passes: later batches decoded with earlier ones.
    assert runs[True][1].forward_passes < runs[False][1].forward_passes


@pytest.mark.parametrize(
    "architecture",
    ["llama", "qwen2", "gpt2", "gpt_neox", "opt", "falcon", "phi3", "qwen3_moe", "gemma2",
     "mistral"],
)  # fmt: skip
def test_refilled_or_not_every_family_replies_alike_under_an_edit(architecture: str) -> None:
    """The worker's evaluation (shared prefix, replayed layers, packed prompts) with and without
    refilling gives the same replies, word for word, to an edited model; families whose cache
    cannot be joined (sliding windows) run their batches apart. (Random models' replies
    all run to the limit; their caches are small, so batches join before their first step.)"""
    loaded = random_loaded(architecture, seed=11)
    texts = loaded.template(PROMPTS, SYSTEM)
    residuals = last_token_residuals(loaded, texts, 4)
    ablator = Ablator(loaded, refusal_directions(residuals[:5], residuals[5:]))
    kernel = ComponentKernel(1.2, 1.0, 0.6, 1.5)
    edit = AblationParams(1.0, {"attention": kernel, "mlp": kernel})
    scoring = scoring_for(["zz"])
    common = dict(good=texts, bad=texts, max_response_length=10, batch_size=4)
    evaluators = {
        refill: evaluator_for(
            loaded,
            scoring,
            unchanged_layers=ablator.unchanged_layers,
            reuse=ReuseOptions(drafts=False, refill=refill),
            **common,
        )
        for refill in (False, True)
    }
    replies, passes = {}, {}
    with ablator.applied(edit):
        for refill, evaluator in evaluators.items():
            evaluator.evaluate()
            before = evaluator.stats.forward_passes
            replies[refill] = evaluator.replies("harmful"), evaluator.replies("harmless")
            passes[refill] = evaluator.stats.forward_passes - before
    assert replies[True] == replies[False]
    joins = evaluators[True].reuse.refill
    assert joins is (architecture not in ("gemma2", "mistral"))
    if joins:
        assert passes[True] < passes[False]
    else:
        assert passes[True] == passes[False]


def test_a_joint_batch_grows_as_far_as_the_budget_holds_its_keys_and_values() -> None:
    cache = _cache(4, 10, 1.0)  # 2 layers x (keys + values) x 4 rows x 2 heads x 10 x 4 floats
    per_row_now = cache_bytes(cache) / 4
    assert per_row_now == 2 * 2 * 2 * 10 * 4 * 4
    per_row_full = per_row_now * (10 + 30) / 10  # 30 tokens to come
    assert row_limit(cache, 4, 10, 30, int(7 * per_row_full)) == 7
    assert row_limit(cache, 4, 10, 30, int(2 * per_row_full)) == 4  # never below the batch
    assert row_limit(cache, 4, 10, 30, 2**40) == 4 * MAX_ROWS_FACTOR  # nor above the factor


def test_with_replay_off_a_batch_never_grows_past_its_rows() -> None:
    """replay_memory = 0 asks for no memory beyond a batch's own: batches are still refilled, but
    only as far as the batch size (the last, smaller batch joins the rows left)."""
    loaded = random_loaded("llama", seed=11)
    texts = loaded.template(PROMPTS, SYSTEM)
    scoring = scoring_for(["zz"])
    common = dict(good=texts, bad=texts, max_response_length=10, batch_size=4)
    budgets = {
        memory: evaluator_for(
            loaded, scoring, reuse=ReuseOptions(replay_memory=memory), **common
        ).reuse.refill_budget()
        for memory in (0.0, 0.25)
    }
    assert budgets[0.0] == 1 and budgets[0.25] >= 64 * 2**20
    cache = _cache(4, 10, 1.0)
    assert row_limit(cache, 4, 10, 30, budgets[0.0]) == 4
    plain = evaluator_for(loaded, scoring, reuse=ReuseOptions.plain(), **common)
    assert plain.reuse.refill_budget() == 0


def test_the_passes_of_refilled_batches_are_counted_as_the_engine_runs_them() -> None:
    """(The draft policy prices the way not taken with this; test_draft_policy checks it against
    the engine's own count.) Rows need 3 and 1 tokens, then 2 and 2, then 1; the first run may
    hold 3 rows: the second batch joins once the first's short row has left."""
    batches = [([3, 1], 3), ([2, 2], 0), ([1], 0)]
    # pass 1: batch 1's first; pass 2: a step (row of 3); pass 3: batch 2's first pass, joined;
    # pass 4: a step for all three; pass 5: batch 3's first, alone (4 rows would not fit).
    assert refilled_passes(batches) == 5
    assert refilled_passes([(need, 0) for need, _ in batches]) == 3 + 2 + 1  # one by one
    assert refilled_passes([([1, 1], 8), ([1], 8), ([4], 8)]) == 3 + 3
