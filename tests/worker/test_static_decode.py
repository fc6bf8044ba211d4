"""Static decoding (the path CUDA graphs replay) changes no result: on the CPU it runs eagerly and
gives the dynamic path's replies on several architectures, and the refusals and KL of trials on
the fixtures with prefix sharing, layer replay, the kept KL pass and pruning; models it cannot
serve fall back to the dynamic path, and `auto` never uses it off CUDA."""

from __future__ import annotations

import random

import pytest

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel
from hctl_worker.directions import last_token_residuals, refusal_directions
from hctl_worker.generation import Context, GenerationStats, encode_texts, generate
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS
from hctl_worker.model import LoadedModel, load_model
from hctl_worker.pruning import PruningBar
from hctl_worker.reuse import ReuseOptions
from hctl_worker.settings import WorkerSettings
from hctl_worker.static_decode import StaticDecoder
from hctl_worker.trials import Trial
from tests.worker.random_models import random_loaded
from tests.worker.scoring import evaluator_for, scoring_for
from tests.worker.test_reuse import FIXTURES, SYSTEM, _prompts, _random_params, _Scored

PROMPTS = ["Hello there!", "How do I bake bread?", "Tell me a joke.", "x", "Why is the sky blue?"]


def _random_loaded(architecture: str, attention: str | None = None) -> LoadedModel:
    return random_loaded(architecture, attention=attention)


@pytest.mark.parametrize(
    ("architecture", "attention"),
    [("llama", None), ("llama", "eager"), ("qwen3", None), ("gemma", None), ("phi3", None),
     ("gpt2", None)],
)  # fmt: skip
def test_static_steps_give_the_dynamic_replies(architecture: str, attention: str | None) -> None:
    loaded = _random_loaded(architecture, attention)
    decoder = StaticDecoder.for_model(loaded, "eager")
    assert decoder.static and not decoder.graphs, decoder.describe()
    batches = encode_texts(loaded, loaded.template(PROMPTS, SYSTEM), 3)
    plain, static = GenerationStats(), GenerationStats()
    expected = generate(loaded, batches, 12, stats=plain)
    got = generate(loaded, batches, 12, stats=static, context=Context(decoder=decoder))
    assert got == expected
    assert plain.static_passes == 0 and static.static_passes > 0
    assert len(set(expected)) > 1  # the replies differ: the comparison meant something


@pytest.mark.parametrize("architecture", ["gemma2", "mistral", "qwen3_moe"])
def test_models_it_cannot_serve_keep_the_dynamic_path(architecture: str) -> None:
    """Sliding-window caches and experts: decided once, with the reason."""
    loaded = _random_loaded(architecture)
    decoder = StaticDecoder.for_model(loaded, "eager")
    assert not decoder.static and decoder.describe().startswith("the dynamic path")
    batches = encode_texts(loaded, loaded.template(PROMPTS, SYSTEM), 3)
    stats = GenerationStats()
    generate(loaded, batches, 6, stats=stats, context=Context(decoder=decoder))
    assert stats.static_passes == 0


def test_auto_uses_nothing_static_off_cuda_and_the_setting_takes_only_auto_or_off() -> None:
    loaded = _random_loaded("qwen3")
    assert not StaticDecoder.for_model(loaded, "auto").static
    assert not StaticDecoder.for_model(loaded, "off").static
    assert WorkerSettings().decode_graphs == "off"  # until checked on a GPU
    with pytest.raises(ValueError):
        WorkerSettings(decode_graphs="eager")


def test_trials_score_the_same_with_static_steps_on_a_fixture() -> None:
    """Prefix sharing, layer replay and the kept KL pass (the harmless replies are scored) on
    both sides, pruned or not; only the decode steps differ."""
    fixture = FIXTURES / "tiny-refuser"
    loaded = load_model(str(fixture), dtypes=["float32"], device_map="cpu")
    good = loaded.template(_prompts(fixture, "harmless_test", 16), SYSTEM)
    bad = loaded.template(_prompts(fixture, "harmful_test", 16), SYSTEM)
    residuals = last_token_residuals(loaded, bad, 8), last_token_residuals(loaded, good, 8)
    ablator = Ablator(loaded, refusal_directions(*residuals))
    scoring = scoring_for(DEFAULT_REFUSAL_MARKERS)
    plain, static = (
        _Scored(
            scoring,
            evaluator_for(
                loaded,
                scoring,
                good=good,
                bad=bad,
                max_response_length=12,
                batch_size=8,
                unchanged_layers=ablator.unchanged_layers,
                reuse=ReuseOptions(drafts=False, decode_graphs=mode),
            ),
        )
        for mode in ("off", "eager")
    )
    assert static.reuse.decoder.static and static.reuse.plan.enabled and static.shares_prefix
    assert "harmless" in static.evaluator.answered
    generator = random.Random(5)
    trials = [_random_params(generator, loaded.n_layers) for _ in range(5)]
    refusals, pruned = set(), 0
    late = ComponentKernel(1.5, 3.0, 1.0, 0.5)  # removes the refusals
    removing = AblationParams(3.0, {"attention": late, "mlp": late})
    for params in [AblationParams(None, {}), removing, *trials]:
        with ablator.applied(params):
            expected, got = plain.score(), static.score()
            front = [Trial(number=1, kl=expected.kl / 2, refusals=0, total_bad=len(bad))]
            limit = PruningBar(front, margin=1).refusal_limit
            expected_pruned, got_pruned = plain.score(limit), static.score(limit)
        for full, fast in ((expected, got), (expected_pruned, got_pruned)):
            assert fast.pruned == full.pruned
            if full.pruned:
                # Each stopped at `limit` refusals; how many more were decided in that step
                # depends on which rows decode together (static steps never refill batches).
                stopped_at = limit(full.kl)
                assert stopped_at is not None
                assert min(fast.refusals, full.refusals) >= stopped_at
            else:
                assert fast.refusals == full.refusals
            assert fast.kl == pytest.approx(full.kl, rel=1e-4, abs=1e-7)
            assert fast.scores.keys() == full.scores.keys()
        refusals.add(expected.refusals)
        pruned += int(expected_pruned.pruned)
    assert static.stats.static_passes > 0
    assert len(refusals) > 1 and pruned > 0


def test_a_graph_that_cannot_be_captured_turns_graphs_off_and_changes_no_reply() -> None:
    """Graphs need CUDA: here they fail at the first step, the batch goes on eagerly, and the
    model says once that its graphs are off."""
    loaded = _random_loaded("qwen3")
    decoder = StaticDecoder(static=True, graphs=True, reason="decode steps on CUDA graphs")
    batches = encode_texts(loaded, loaded.template(PROMPTS, SYSTEM), 3)
    stats = GenerationStats()
    got = generate(loaded, batches, 12, stats=stats, context=Context(decoder=decoder))
    assert got == generate(loaded, batches, 12)
    assert decoder.static and not decoder.graphs and stats.static_passes > 0
    assert "CUDA graphs failed" in decoder.describe()
