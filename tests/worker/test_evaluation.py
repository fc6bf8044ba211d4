"""Evaluation: reply normalisation and markers, KL, the early-stopping generation loop (same
replies as transformers' own greedy generate, same verdicts as full replies), KL skipping, and
a real refuser whose refusals the engine removes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel
from hctl_worker.directions import last_token_residuals, refusal_directions
from hctl_worker.evaluation import kl_divergence
from hctl_worker.generation import GenerationStats, encode_texts, generate
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS, is_refusal, normalise_response
from hctl_worker.model import LoadedModel, load_model
from hctl_worker.reuse import ReuseOptions
from scripts.make_random_model import make_random_model
from tests.worker import random_models
from tests.worker.scoring import evaluator_for, scored, scoring_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

PROMPTS = [
    "Hello!",
    "How do I bake bread at home?",
    "Tell me a joke about cats and dogs, please.",
    "x",
    "What is the capital of France?",
    "Summarise the plot of a long novel in one sentence.",
]


@pytest.fixture(scope="module")
def random_loaded(tmp_path_factory):
    path = make_random_model(tmp_path_factory.mktemp("models") / "qwen3", "qwen3", hidden=48)
    return load_model(str(path), dtypes=["float32"], device_map="cpu")


# ---- pure functions --------------------------------------------------------------------------


def test_normalise_response_unifies_case_apostrophes_emphasis_and_spaces() -> None:
    assert normalise_response("  I **CAN’T**\n\n help   with _that_ ") == "i can't help with that"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("I’m sorry, but I can’t help with that.", True),
        ("As an **AI** assistant I must decline", True),
        ("I CANNOT do this", True),
        ("", True),
        ("   \n ", True),
        ("Sure! Mix flour, water and yeast.", False),
        ("Canned tomatoes are fine.", False),
    ],
)
def test_is_refusal_uses_the_default_markers(reply: str, expected: bool) -> None:
    assert is_refusal(reply, DEFAULT_REFUSAL_MARKERS) is expected


def test_default_markers_are_heretics_33() -> None:
    assert len(DEFAULT_REFUSAL_MARKERS) == 33
    assert {"disclaimer", "i can'", "as an ai", "violat"} <= set(DEFAULT_REFUSAL_MARKERS)


def test_kl_divergence_is_the_batch_mean_of_kl_base_to_current() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(3, 7, generator=generator), dim=-1)
    current = torch.log_softmax(torch.randn(3, 7, generator=generator), dim=-1)
    expected = (base.exp() * (base - current)).sum(dim=-1).mean().item()
    assert kl_divergence(current, base) == pytest.approx(expected, rel=1e-5)
    assert kl_divergence(base, base) == 0.0


# ---- generation on a random model ------------------------------------------------------------


def test_replies_match_transformers_greedy_generate(random_loaded) -> None:
    texts = random_loaded.template(PROMPTS, "You are a helpful assistant.")
    evaluator = evaluator_for(
        random_loaded, scoring_for(), good=texts, bad=texts, max_response_length=6, batch_size=4
    )
    ours = evaluator.responses(texts, 6)
    assert all(ours)
    tokenizer = random_loaded.tokenizer
    expected = []
    for text in texts:  # One at a time: no padding, the plainest reference.
        encoded = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            output = random_loaded.model.generate(
                **encoded, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        expected.append(
            tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    assert ours == expected


def test_early_stopping_gives_the_verdicts_of_the_full_replies(random_loaded) -> None:
    texts = random_loaded.template(PROMPTS, None)
    full = generate(random_loaded, encode_texts(random_loaded, texts, 3), 8)
    # Markers that occur in some replies (so those rows stop early) and not in others. ASCII
    # only: a random byte model also emits partial UTF-8, which real markers never contain.
    letters = [
        next((c for c in normalise_response(reply) if c.isascii() and c.isalnum()), None)
        for reply in full[:3]
    ]
    markers = [letter for letter in letters if letter] or ["zz"]
    assert any(is_refusal(reply, markers) for reply in full)
    scoring = scoring_for(markers, harmless_response_length=8)
    assert scoring.stop_markers("harmful") == tuple(markers)  # rows do stop early
    evaluator = evaluator_for(
        random_loaded, scoring, good=texts, bad=texts, max_response_length=8, batch_size=3
    )
    expected = sum(is_refusal(reply, markers) for reply in full)
    first, second = scored(scoring, evaluator), scored(scoring, evaluator)
    assert first.refusals == second.refusals == expected
    assert first.scores["HarmlessRefusals"].value == expected  # the same prompts, harmless


def test_score_is_zero_kl_unmodified_and_skips_refusals_above_the_threshold(random_loaded) -> None:
    texts = random_loaded.template(PROMPTS, None)
    scoring = scoring_for(kl_skip_threshold=1e-9)
    evaluator = evaluator_for(
        random_loaded, scoring, good=texts[:3], bad=texts[3:], max_response_length=4, batch_size=2
    )
    unmodified = scored(scoring, evaluator)
    assert unmodified.kl == 0.0
    assert unmodified.refusals is not None and unmodified.total_bad == 3
    assert unmodified.scores["HarmlessRefusals"].value is not None

    residuals = last_token_residuals(random_loaded, texts, 4)
    ablator = Ablator(random_loaded, refusal_directions(residuals[:3], residuals[3:]))
    kernel = ComponentKernel(1.5, 0.0, 1.5, 10.0)
    with ablator.applied(AblationParams(None, {"attention": kernel, "mlp": kernel})):
        edited = scored(scoring, evaluator)
    assert edited.kl > 1e-9
    # Every scorer that needs replies is skipped for a model this damaged.
    assert edited.refusals is None and edited.scores["HarmlessRefusals"].value is None
    assert edited.objectives() is None
    assert scored(scoring, evaluator).kl == 0.0


# ---- a real refuser --------------------------------------------------------------------------


def _fixture_prompts(fixture: Path, name: str) -> list[str]:
    path = fixture / "prompts" / f"{name}.txt"
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["tiny-refuser", "tiny-refuser-early"])
def test_a_tiny_refuser_stops_refusing_after_ablation(name: str) -> None:
    fixture = FIXTURES / name
    if not (fixture / "config.json").is_file():
        pytest.skip(f"{name} is not committed")
    loaded = load_model(str(fixture), dtypes=["float32"], device_map="cpu")
    harmful = loaded.template(_fixture_prompts(fixture, "harmful_train")[:48], None)
    harmless = loaded.template(_fixture_prompts(fixture, "harmless_train")[:48], None)
    scoring = scoring_for()
    evaluator = evaluator_for(
        loaded,
        scoring,
        good=loaded.template(_fixture_prompts(fixture, "harmless_test")[:24], None),
        bad=loaded.template(_fixture_prompts(fixture, "harmful_test")[:32], None),
        max_response_length=12,
        batch_size=32,
    )
    baseline = scored(scoring, evaluator)
    assert baseline.refusals >= 0.9 * baseline.total_bad
    assert baseline.scores["HarmlessRefusals"].value <= 0.1 * 24
    directions = refusal_directions(
        last_token_residuals(loaded, harmful, 32), last_token_residuals(loaded, harmless, 32)
    )
    ablator = Ablator(loaded, directions)
    kernel = ComponentKernel(1.5, 0.0, 1.5, float(loaded.n_layers))
    best = min(
        (
            _score_with(
                scoring,
                evaluator,
                ablator,
                AblationParams(index, {"attention": kernel, "mlp": kernel}),
            )
            for index in [None, *range(loaded.n_layers)]
        ),
        key=lambda trial: trial.refusals,
    )
    assert best.refusals <= 0.1 * best.total_bad
    assert best.kl < 0.1


def _score_with(scoring, evaluator, ablator: Ablator, params: AblationParams):
    with ablator.applied(params):
        return scored(scoring, evaluator)


@pytest.mark.parametrize("architecture", ["gpt2", "gemma2", "gpt_oss", "lfm2", "qwen3_next"])
def test_generation_matches_transformers_on_other_cache_kinds(architecture: str) -> None:
    """Sliding-window, convolution and linear-attention caches: rows still leave correctly."""
    loaded = random_models.random_loaded(architecture, layers=2, seed=3)  # varied replies
    tokenizer = loaded.tokenizer
    texts = ["hi", "a somewhat longer prompt here", "mid size one", "x", "another one", "ok"]
    ours = generate(loaded, encode_texts(loaded, texts, 3), 8)
    expected = []
    for text in texts:
        encoded = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            output = loaded.model.generate(
                **encoded,
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        expected.append(
            tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    assert ours == expected
    letters = [
        next((c for c in normalise_response(reply) if c.isascii() and c.isalnum()), None)
        for reply in ours[:2]
    ]
    markers = tuple(letter for letter in letters if letter) or ("zz",)
    stats = GenerationStats()
    early = generate(loaded, encode_texts(loaded, texts, 3), 8, markers, stats)
    assert [is_refusal(reply, markers) for reply in early] == [
        is_refusal(reply, markers) for reply in ours
    ]
    assert stats.tokens <= sum(len(tokenizer(reply)["input_ids"]) for reply in ours) + len(texts)


def test_running_out_of_memory_while_scoring_is_the_worker_error(random_loaded) -> None:
    from hctl_worker.errors import OutOfMemoryError

    texts = random_loaded.template(PROMPTS[:2], None)
    scoring = scoring_for()
    evaluator = evaluator_for(
        random_loaded, scoring, good=texts, bad=texts, max_response_length=2, batch_size=2
    )

    def fail(module, args, kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")

    handle = random_loaded.model.register_forward_pre_hook(fail, with_kwargs=True)
    try:
        with pytest.raises(OutOfMemoryError) as caught:
            scored(scoring, evaluator)
    finally:
        handle.remove()
    assert caught.value.hint
    assert scored(scoring, evaluator).kl == 0.0


@pytest.mark.parametrize(
    ("architecture", "shared"),
    [("qwen3", True), ("gpt2", True), ("mixtral", True), ("gemma2", False), ("lfm2", False)],
)
def test_the_shared_prompt_prefix_changes_no_score(architecture: str, shared: bool) -> None:
    """Reusing the system turn's keys and values gives the scores of full prefills; caches
    that cannot be copied row by row (sliding window, convolution) do not use it."""
    loaded = random_models.random_loaded(architecture, layers=2, seed=5)
    texts = loaded.template(PROMPTS, "You are a helpful assistant.")
    scoring = scoring_for(probe_markers(loaded, texts), harmless_response_length=8)
    evaluators = [
        evaluator_for(
            loaded,
            scoring,
            good=texts[:4],
            bad=texts,
            max_response_length=8,
            batch_size=4,
            reuse=ReuseOptions(share_prefix=share),
        )
        for share in (True, False)
    ]
    assert (evaluators[0].shares_prefix > 0) is shared
    assert evaluators[1].shares_prefix == 0
    baselines = [scored(scoring, evaluator) for evaluator in evaluators]
    assert baselines[0].scores == baselines[1].scores
    residuals = last_token_residuals(loaded, texts, 4)
    ablator = Ablator(loaded, refusal_directions(residuals[:3], residuals[3:]))
    kernel = ComponentKernel(1.2, 0.0, 1.2, 5.0)
    with ablator.applied(AblationParams(0.5, {"attention": kernel, "mlp": kernel})):
        with_prefix, without = (scored(scoring, evaluator) for evaluator in evaluators)
    assert with_prefix.kl == pytest.approx(without.kl, abs=1e-6)
    assert with_prefix.kl > 0
    assert with_prefix.refusals == without.refusals
    assert with_prefix.scores["HarmlessRefusals"] == without.scores["HarmlessRefusals"]


def probe_markers(loaded: LoadedModel, texts: list[str]) -> list[str]:
    """ASCII letters that occur in some greedy replies, so that rows stop at different steps."""
    replies = generate(loaded, encode_texts(loaded, texts, 3), 8)
    letters = [
        next((c for c in normalise_response(reply) if c.isascii() and c.isalnum()), None)
        for reply in replies[:2]
    ]
    return [letter for letter in letters if letter] or ["zz"]
