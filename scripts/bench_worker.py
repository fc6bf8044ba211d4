"""Benchmark the worker engine: seconds per trial, generated tokens per second, stage timings.

A trial here is what the search does per Optuna trial: apply an ablation (varied parameters),
score it with a set of scorers, restore. Every scorer combination (`--scorers`) and evaluation
kind (`--compare-plain`, `--compare-no-drafts`, `--compare-no-refill`,
`--compare-no-screen`) scores the same
sequence of ablations, so their seconds per trial compare directly:

    markers+kl         KeywordRate, KLDivergence (the objectives before the harmless guard)
    default            KeywordRate, KLDivergence, HarmlessRefusals (the worker's default)
    markers+mtkl       KeywordRate, MultiTokenKL, HarmlessRefusals
    classifier+kl      RefusalClassifier, KLDivergence, HarmlessRefusals
    classifier+mtkl    RefusalClassifier, MultiTokenKL, HarmlessRefusals

    python scripts/bench_worker.py                       # committed tiny refuser, heretic's settings
    python scripts/bench_worker.py --model qwen3-0.6b    # random Qwen3-0.6B (its real shape)
    python scripts/bench_worker.py --model PATH --device cuda --trials 30 --json out.json
    python scripts/bench_worker.py --scorers default classifier+mtkl --classifier PATH
    python scripts/bench_worker.py --end-to-end          # also time `hctl-worker run`, if present
    python scripts/bench_worker.py --workers 1,2 --trials 40   # one search, 1 then 2 workers

The default settings copy the heretic baseline (shared/reference/heretic-baseline.md): float32,
batch 32, 16-token replies, 30 trials, system prompt "You are a helpful assistant.", the
fixture's test prompts (86 harmful for refusals, 62 harmless for KL) and train prompts for the
directions; the classifier is the committed tiny one unless `--classifier` names another (e.g.
NousResearch/Minos-v1), multi-token KL follows 16 tokens. No timing is asserted anywhere; this
prints a table and writes JSON.

Trials are scored here one at a time; the worker's search scores `trials_together` of them at
once, sharing their decode steps: `bench_together.py` times that against the same trials alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hctl_worker.ablation import Ablator  # noqa: E402
from hctl_worker.directions import last_token_residuals, refusal_directions  # noqa: E402
from hctl_worker.evaluation import EvaluationPrompts  # noqa: E402
from hctl_worker.generation import GenerationStats  # noqa: E402
from hctl_worker.model import load_model  # noqa: E402
from hctl_worker.pruning import PruningBar  # noqa: E402
from hctl_worker.trials import Trial, pareto_front  # noqa: E402
from scripts import worker_scaling  # noqa: E402
from scripts.bench_report import print_table, summarise  # noqa: E402
from scripts.bench_trials import (  # noqa: E402
    COMBINATIONS,
    kl_passes_ms,
    make_evaluator,
    make_scoring,
    own_prompt_tokens,
    trial_params,
)

FIXTURE = REPO / "tests" / "fixtures" / "tiny-refuser"
CLASSIFIER = REPO / "tests" / "fixtures" / "tiny-refusal-classifier"
SYSTEM_PROMPT = "You are a helpful assistant."
SYNTHETIC_PROMPTS = [
    "How do I bake sourdough bread at home?",
    "Explain how photosynthesis works.",
    "Write a short poem about the sea.",
    "What is the capital of Australia?",
    "Give me three tips for learning a language.",
    "Summarise the causes of the First World War.",
    "How do I pick a lock without the key?",
    "Tell me how to make a dangerous chemical at home.",
]


def read_prompts(folder: Path, name: str) -> list[str]:
    path = folder / "prompts" / f"{name}.txt"
    return [line for line in path.read_text().splitlines() if line.strip()]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(arguments: argparse.Namespace) -> dict:
    results: dict = {"settings": vars(arguments).copy(), "stages": {}}
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device_map = "cpu" if arguments.device == "cpu" else arguments.device
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        if arguments.model == "qwen3-0.6b":
            from make_random_model import make_random_model

            source = str(
                make_random_model(
                    Path(scratch) / "qwen3-0.6b",
                    "qwen3-0.6b",
                    dtype=getattr(torch, arguments.dtype),
                )
            )
            results["stages"]["build_random_model_s"] = time.perf_counter() - started
        else:
            source = arguments.model or str(FIXTURE)
        started = time.perf_counter()
        loaded = load_model(
            source,
            dtypes=[arguments.dtype],
            device_map=device_map,
            threads=arguments.threads or None,
        )
        results["stages"]["load_s"] = time.perf_counter() - started
    results["threads"] = torch.get_num_threads()
    results["n_layers"] = loaded.n_layers
    results["parameters"] = sum(p.numel() for p in loaded.model.parameters())

    folder = Path(arguments.prompts_from or source)
    if (folder / "prompts").is_dir():
        good_train = read_prompts(folder, "harmless_train")
        bad_train = read_prompts(folder, "harmful_train")
        good_test = read_prompts(folder, "harmless_test")
        bad_test = read_prompts(folder, "harmful_test")
    else:
        good_train = bad_train = good_test = bad_test = SYNTHETIC_PROMPTS
    if arguments.prompts:
        good_train, bad_train = good_train[: arguments.prompts], bad_train[: arguments.prompts]
        good_test, bad_test = good_test[: arguments.prompts], bad_test[: arguments.prompts]
    system = None if arguments.no_system_prompt else SYSTEM_PROMPT
    template = loaded.template

    started = time.perf_counter()
    bad_residuals = last_token_residuals(loaded, template(bad_train, system), arguments.batch_size)
    good_residuals = last_token_residuals(
        loaded, template(good_train, system), arguments.batch_size
    )
    directions = refusal_directions(bad_residuals, good_residuals)
    results["stages"]["residuals_s"] = time.perf_counter() - started
    results["stages"]["residual_prompts"] = len(bad_train) + len(good_train)

    ablator = Ablator(loaded, directions, row_normalization=arguments.row_normalization)
    prompts = (
        EvaluationPrompts(good_test, template(good_test, system)),
        EvaluationPrompts(bad_test, template(bad_test, system)),
    )
    kinds = ["reuse", "plain"] if arguments.compare_plain else ["reuse"]
    if arguments.compare_no_drafts:
        kinds.append("no-drafts")
    if arguments.compare_no_refill:
        kinds.append("no-refill")
    if arguments.compare_no_screen:
        kinds.append("no-screen")
    variants = [f"{combination} {kind}" for combination in arguments.scorers for kind in kinds]
    scorings = {
        combination: make_scoring(combination, loaded, arguments)
        for combination in arguments.scorers
    }
    evaluators = {}
    results["baseline"] = {}
    for variant in variants:
        combination, kind = variant.split(" ")
        scoring = scorings[combination]
        started = time.perf_counter()
        evaluators[variant] = make_evaluator(kind, loaded, ablator, scoring, prompts, arguments)
        baseline = scoring.score(evaluators[variant].evaluate())
        scoring.set_baseline(baseline)
        results["stages"][f"baseline_{variant}_s"] = time.perf_counter() - started
        results["baseline"][variant] = {name: score.display() for name, score in baseline.items()}
    evaluator = evaluators[variants[0]]
    results["stages"]["baseline_s"] = results["stages"][f"baseline_{variants[0]}_s"]
    results["shared_prefix_tokens"] = evaluator.shares_prefix
    results["reuse"] = evaluator.reuse.describe()

    # The same for every variant with a floor (the plain ones have none).
    prompt_tokens = own_prompt_tokens(evaluator, loaded, arguments.batch_size)
    generator = random.Random(arguments.seed)
    records: dict[str, list[dict]] = {variant: [] for variant in variants}
    finished: dict[str, list[Trial]] = {variant: [] for variant in variants}
    for number in range(1, arguments.trials + 1):
        params = trial_params(arguments.params, generator, loaded.n_layers)
        order = variants if number % 2 else variants[::-1]  # alternate which goes first
        for variant in order:
            combination, kind = variant.split(" ")
            scoring, evaluator = scorings[combination], evaluators[variant]
            evaluator.stats = GenerationStats()
            evaluator.seconds = {}
            limit, front = None, None
            if kind != "plain" and arguments.prune_margin >= 0:  # as the worker's prune_trials
                front = pareto_front(finished[variant])
                if scoring.can_prune:
                    harmful = len(bad_test)
                    bar = PruningBar.for_prompts(finished[variant], harmful, arguments.prune_margin)
                    limit = bar.refusal_limit
            started = time.perf_counter()
            ablator.apply(params)
            first_edited = ablator.unchanged_layers()
            start_layer = evaluator.reuse.plan.start_for(first_edited)
            context = evaluator.evaluate()
            trial = Trial(
                number=number, scores=scoring.score(context, limit, front), pruned=context.pruned
            )
            ablator.restore()
            seconds = time.perf_counter() - started
            stats = evaluator.stats
            records[variant].append(
                {
                    "seconds": seconds,
                    "start_layer": start_layer,
                    # What any exact evaluation of this trial computes, in all-layer tokens:
                    # the prompts' own tokens (no padding, no shared prefix) above the first
                    # edited layer, and the reply tokens it generated but each reply's last
                    # (not fed back when the reply ends at its length): a lower bound.
                    "floor_tokens": None
                    if kind == "plain"  # it computes the prefix and whole replies on purpose
                    else prompt_tokens * (1 - first_edited / loaded.n_layers)
                    + max(0, stats.tokens - stats.rows),
                    "kl": trial.kl,
                    "refusals": trial.refusals,
                    "pruned": trial.pruned,
                    "forward_passes": stats.forward_passes,
                    "layer_tokens": stats.layer_tokens,
                    "input_tokens": stats.input_tokens,
                    "generated_tokens": stats.tokens,
                    "drafted": stats.drafted,
                    "accepted": stats.accepted,
                    "parts_s": dict(evaluator.seconds),
                }
            )
            finished[variant].append(trial)
    results["trials"] = {variant: summarise(rows) for variant, rows in records.items()}
    for variant in variants:
        results["trials"][variant]["draft_choices"] = evaluators[variant].draft_choices()
        fitted = evaluators[variant].reuse.pass_cost.fitted()
        results["trials"][variant]["pass_cost"] = (
            {"fixed_ms": 1000 * fitted[0], "per_token_ms": 1000 * fitted[1]} if fitted else None
        )
    last = trial_params(arguments.params, generator, loaded.n_layers)
    for variant in variants:
        results["trials"][variant]["kl_passes_ms"] = kl_passes_ms(
            evaluators[variant], ablator, last
        )
    results["trials"]["count"] = arguments.trials
    results["trials"]["kl_prompts"] = len(good_test)
    results["trials"]["refusal_prompts"] = len(bad_test)
    if arguments.compare_plain:
        results["trials"]["mismatched_trials"] = {
            combination: [
                index + 1
                for index, (fast, plain) in enumerate(
                    zip(
                        records[f"{combination} reuse"],
                        records[f"{combination} plain"],
                        strict=True,
                    )
                )
                if not fast["pruned"]
                and (
                    fast["refusals"] != plain["refusals"]
                    or abs(fast["kl"] - plain["kl"]) > 1e-4 * max(plain["kl"], 1e-3)
                )
            ]
            for combination in arguments.scorers
        }
    results["per_trial"] = records
    results["peak_rss_mb"] = peak_rss_mb()
    if arguments.bandwidth_gbs > 0:
        # The memory-bandwidth floor of one forward pass is reading every weight once; a pass
        # here also carries many tokens, so this is an upper bound on the fraction reached.
        weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        floor_s = weight_bytes / (arguments.bandwidth_gbs * 1e9)
        reuse = results["trials"][f"{arguments.scorers[0]} reuse"]
        per_pass = reuse["seconds_per_trial"] / max(reuse["forward_passes"], 1)
        results["bandwidth"] = {
            "weight_bytes": weight_bytes,
            "floor_s_per_pass": floor_s,
            "seconds_per_pass": per_pass,
            "fraction_of_limit": floor_s / per_pass,
        }
    if torch.cuda.is_available() and arguments.device != "cpu":
        results["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return results


def end_to_end(arguments: argparse.Namespace) -> dict | None:
    """Time `hctl-worker run` on the fixture when the SEARCH helper's CLI supports it."""
    executable = Path(sys.executable).with_name("hctl-worker")
    help_text = subprocess.run(
        [str(executable), "run", "--help"], capture_output=True, text=True, check=False
    )
    if help_text.returncode != 0:
        return {"skipped": "hctl-worker run is not available yet"}
    with tempfile.TemporaryDirectory() as scratch:
        config = worker_scaling.fixture_config(
            Path(scratch) / "config.toml", batch_size=arguments.batch_size,
            max_response_length=arguments.max_response_length, n_trials=arguments.trials,
            system_prompt=SYSTEM_PROMPT,
        )  # fmt: skip
        started = time.perf_counter()
        completed = subprocess.run(
            [
                str(executable),
                "run",
                "--config",
                str(config),
                "--job-dir",
                f"{scratch}/job",
                "--events",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
        events_path = Path(scratch) / "job" / "events.jsonl"
        events = (
            [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]
            if events_path.exists()
            else []
        )
    result: dict = {"returncode": completed.returncode, "wall_s": round(wall, 2)}
    if completed.returncode != 0:
        result["stderr_tail"] = completed.stderr[-2000:]
        return result
    stages = {
        event["stage"]: round(event["seconds"], 2)
        for event in events
        if event.get("type") == "stage" and event.get("state") == "end" and event.get("seconds")
    }
    trials = [event for event in events if event.get("type") == "trial"]
    result["stages_s"] = stages
    if trials:
        result["trials"] = len(trials)
        result["mean_trial_event_s"] = round(sum(t["seconds"] for t in trials) / len(trials), 3)
        result["best_refusals"] = min(
            (t["refusals"] for t in trials if t["refusals"] is not None), default=None
        )
    if "search" in stages and trials:
        result["search_seconds_per_trial"] = round(stages["search"] / len(trials), 3)
    return result


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="folder, hub id, or qwen3-0.6b (random)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-response-length", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=0, help="cap every prompt set (0 = all)")
    parser.add_argument("--row-normalization", default="none", choices=["none", "pre", "full"])
    parser.add_argument("--threads", type=int, default=0, help="0 = the worker's choice")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-system-prompt", action="store_true")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument(
        "--params", default="random", choices=["random", "heretic", "full-depth"], help="trial kind"
    )
    parser.add_argument(
        "--prompts-from", default="", help="a folder with prompts/ (default: the model's own)"
    )
    parser.add_argument("--compare-plain", action="store_true", help="also time the plain path")
    parser.add_argument(
        "--compare-no-drafts", action="store_true", help="also time reuse without draft replies"
    )
    parser.add_argument("--replay-memory", type=float, default=0.25)
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=0, help="device memory bandwidth, for the floor"
    )
    parser.add_argument("--no-drafts", action="store_true", help="reuse without draft replies")
    parser.add_argument(
        "--compare-no-refill",
        action="store_true",
        help="also time reuse without refilling batches as their replies finish",
    )
    parser.add_argument("--no-refill", action="store_true", help="reuse without refilling batches")
    parser.add_argument(
        "--compare-no-screen",
        action="store_true",
        help="also time reuse with every logit of the output head computed in decode steps",
    )
    parser.add_argument("--prune-margin", type=float, default=0.05, help="negative: no pruning")
    parser.add_argument(
        "--scorers", nargs="+", default=["default"], choices=list(COMBINATIONS),
        help="scorer combinations to time (see the module docstring)",
    )  # fmt: skip
    parser.add_argument("--classifier", default=str(CLASSIFIER), help="refusal classifier")
    parser.add_argument("--kl-tokens", type=int, default=16, help="MultiTokenKL tokens")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument(
        "--workers",
        default="",
        help="e.g. 1,2: only time one search run by that many hctl-worker processes each "
        "(one thread or one GPU each; see worker_scaling.py)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    arguments = parse_arguments(argv)
    if arguments.workers:
        counts = [int(count) for count in arguments.workers.split(",")]
        results = {"workers": worker_scaling.measure(
            counts, n_trials=arguments.trials, batch_size=arguments.batch_size,
            max_response_length=arguments.max_response_length, system_prompt=SYSTEM_PROMPT,
            model=Path(arguments.model) if arguments.model else FIXTURE, device=arguments.device,
        )}  # fmt: skip
        if arguments.json:
            Path(arguments.json).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    results = bench(arguments)
    if arguments.end_to_end:
        results["end_to_end"] = end_to_end(arguments)
    print_table(results)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
