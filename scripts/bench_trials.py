"""What bench_worker.py times: the trials (edits drawn like a search's), the scorer combinations,
the evaluator of each kind, and what a trial must compute at the least."""

from __future__ import annotations

import random
import time

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel
from hctl_worker.evaluation import Evaluator
from hctl_worker.generation import encode_texts
from hctl_worker.reuse import ReuseOptions
from hctl_worker.scorers import Scoring, build_scoring
from hctl_worker.settings import WorkerSettings

GUARD = ("HarmlessRefusals", "report")
COMBINATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "markers+kl": (("KeywordRate", "minimize"), ("KLDivergence", "minimize")),
    "default": (("KeywordRate", "minimize"), ("KLDivergence", "minimize"), GUARD),
    "markers+mtkl": (("KeywordRate", "minimize"), ("MultiTokenKL", "minimize"), GUARD),
    "classifier+kl": (("RefusalClassifier", "minimize"), ("KLDivergence", "minimize"), GUARD),
    "classifier+mtkl": (("RefusalClassifier", "minimize"), ("MultiTokenKL", "minimize"), GUARD),
}


def random_params(generator: random.Random, n_layers: int) -> AblationParams:
    """Parameters drawn like a search would: every layer reachable, both scopes."""
    last = max(n_layers - 1, 1)

    def kernel() -> ComponentKernel:
        maximum = generator.uniform(0.5, 1.5)
        return ComponentKernel(
            max_weight=maximum,
            max_weight_position=generator.uniform(0, last),
            min_weight=generator.uniform(0, 1) * maximum,
            min_weight_distance=generator.uniform(1, max(last, 1)),
        )

    index = None if generator.random() < 0.3 else generator.uniform(0, last)
    return AblationParams(index, {"attention": kernel(), "mlp": kernel()})


def trial_params(kind: str, generator: random.Random, n_layers: int) -> AblationParams:
    """`random`: every layer reachable; `heretic`: heretic's ranges (peak in the last 40 %);
    `full-depth`: every layer at weight 1 with one late direction (the canonical trials)."""
    last = max(n_layers - 1, 1)
    if kind == "random":
        return random_params(generator, n_layers)
    if kind == "full-depth":
        full = ComponentKernel(1.0, last / 2, 1.0, float(n_layers))
        return AblationParams(generator.uniform(0.6 * last, last), {"attention": full, "mlp": full})

    def kernel(low: float) -> ComponentKernel:
        maximum = max(0.0, generator.uniform(low, 1.5))
        return ComponentKernel(
            max_weight=maximum,
            max_weight_position=generator.uniform(0.6 * last, last),
            min_weight=generator.uniform(0, 1) * maximum,
            min_weight_distance=generator.uniform(1, max(0.6 * last, 1)),
        )

    index = None if generator.random() < 0.5 else generator.uniform(0.4 * last, 0.9 * last)
    return AblationParams(index, {"attention": kernel(0.8), "mlp": kernel(-0.25)})


def make_scoring(combination: str, loaded, arguments) -> Scoring:
    settings = WorkerSettings(
        scorers=[{"name": name, "optimization": how} for name, how in COMBINATIONS[combination]],
        refusal_classifier={"model": arguments.classifier, "batch_size": arguments.batch_size},
        kl_tokens=arguments.kl_tokens,
        max_response_length=arguments.max_response_length,
        kl_skip_threshold=0,  # score every trial fully: comparable timings
    )
    return build_scoring(settings, loaded)


def make_evaluator(kind, loaded, ablator, scoring, prompts, arguments) -> Evaluator:
    """`reuse`: the worker's evaluator; `plain`: no shared prefix, replay, drafts or pruning;
    `no-drafts`: the worker's without draft replies; `no-refill`: without refilled batches;
    `no-screen`: the output head computes every logit in decode steps."""
    plain = kind == "plain"
    good, bad = prompts
    return Evaluator.for_scoring(
        loaded,
        scoring,
        harmless=good,
        harmful=bad,
        max_response_length=arguments.max_response_length,
        batch_size=arguments.batch_size,
        kl_tokens=arguments.kl_tokens,
        harmless_response_length=min(16, arguments.max_response_length),
        unchanged_layers=None if plain else ablator.unchanged_layers,
        reuse=ReuseOptions.plain()
        if plain
        else ReuseOptions(
            replay_memory=arguments.replay_memory,
            drafts=not (kind == "no-drafts" or arguments.no_drafts),
            refill=not (kind == "no-refill" or arguments.no_refill),
            screen_head=kind != "no-screen",
        ),
    )


def kl_passes_ms(evaluator: Evaluator, ablator: Ablator, params: AblationParams) -> dict:
    """What each KL measurement costs alone, an edit applied (mean of 5)."""
    measured = {"first_token_kl": evaluator.first_token_divergences}
    if evaluator.continuation_tokens:
        measured["multi_token_kl"] = evaluator.continuation_divergences
    parts = {}
    ablator.apply(params)
    evaluator.evaluate()  # a new edit: the passes below share its refreshed prefix
    for part, measure in measured.items():
        started = time.perf_counter()
        for _ in range(5):
            measure()
        parts[part] = 1000 * (time.perf_counter() - started) / 5
    ablator.restore()
    return parts


def own_prompt_tokens(evaluator: Evaluator, loaded, batch_size: int) -> int:
    """The evaluation prompts' tokens less padding and less the shared prefix, which a trial
    must compute (the KL prompts' pass is also the harmless replies' first pass)."""
    tokens = 0
    for prompts in evaluator.prompts.values():
        for batch in encode_texts(loaded, prompts.texts, batch_size):
            rows = batch.attention_mask.shape[0]
            tokens += int(batch.attention_mask.sum()) - rows * evaluator.shares_prefix
    return tokens
