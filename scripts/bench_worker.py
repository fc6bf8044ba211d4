"""Benchmark the worker engine: seconds per trial, generated tokens per second, stage timings.

A trial here is what the search does per Optuna trial: apply an ablation (varied parameters),
score it with the job's scorers, restore. Every scorer combination (`--combinations`) scores the
same sequence of ablations, so their seconds per trial compare directly:

    markers+kl         KeywordRate, KLDivergence (the objectives before the harmless guard)
    default            KeywordRate, KLDivergence, HarmlessRefusals (the worker's default)
    markers+mtkl       KeywordRate, MultiTokenKL, HarmlessRefusals
    classifier+kl      RefusalClassifier, KLDivergence, HarmlessRefusals
    classifier+mtkl    RefusalClassifier, MultiTokenKL, HarmlessRefusals

    python scripts/bench_worker.py                       # committed tiny refuser, heretic's settings
    python scripts/bench_worker.py --model qwen3-0.6b    # random Qwen3-0.6B (its real shape)
    python scripts/bench_worker.py --model PATH --device cuda --trials 30 --json out.json
    python scripts/bench_worker.py --combinations default classifier+mtkl --classifier PATH
    python scripts/bench_worker.py --end-to-end          # also time `hctl-worker run`, if present

The default settings copy the heretic baseline (shared/reference/heretic-baseline.md): float32,
batch 32, 16-token replies, 30 trials, system prompt "You are a helpful assistant.", the
fixture's test prompts (86 harmful for refusals, 62 harmless for KL) and train prompts for the
directions; the classifier is the committed tiny one unless `--classifier` names another (e.g.
NousResearch/Minos-v1), multi-token KL follows 16 tokens. No timing is asserted anywhere; this
prints a table and writes JSON.
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

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel  # noqa: E402
from hctl_worker.directions import last_token_residuals, refusal_directions  # noqa: E402
from hctl_worker.evaluation import EvaluationPrompts, Evaluator  # noqa: E402
from hctl_worker.model import load_model  # noqa: E402
from hctl_worker.scorers import build_scoring  # noqa: E402
from hctl_worker.settings import WorkerSettings  # noqa: E402
from hctl_worker.trials import Trial  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "tiny-refuser"
CLASSIFIER = REPO / "tests" / "fixtures" / "tiny-refusal-classifier"
GUARD = ("HarmlessRefusals", "report")
COMBINATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "markers+kl": (("KeywordRate", "minimize"), ("KLDivergence", "minimize")),
    "default": (("KeywordRate", "minimize"), ("KLDivergence", "minimize"), GUARD),
    "markers+mtkl": (("KeywordRate", "minimize"), ("MultiTokenKL", "minimize"), GUARD),
    "classifier+kl": (("RefusalClassifier", "minimize"), ("KLDivergence", "minimize"), GUARD),
    "classifier+mtkl": (("RefusalClassifier", "minimize"), ("MultiTokenKL", "minimize"), GUARD),
}
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
    results["combinations"] = {}
    for name in arguments.combinations:
        results["combinations"][name] = bench_combination(
            arguments, loaded, ablator, name, (good_test, bad_test), system
        )
        done = results["combinations"][name]
        print(  # as each finishes: a slow model shows something before the end
            f"{name}: {done['seconds_per_trial']:.3f} s per trial", file=sys.stderr, flush=True
        )
    results["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available() and arguments.device != "cpu":
        results["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return results


def bench_combination(
    arguments: argparse.Namespace,
    loaded,
    ablator: Ablator,
    name: str,
    prompts: tuple[list[str], list[str]],
    system: str | None,
) -> dict:
    """Seconds per trial with one scorer combination, on the same ablations as every other."""
    good, bad = prompts
    settings = WorkerSettings(
        scorers=[{"name": scorer, "optimization": how} for scorer, how in COMBINATIONS[name]],
        refusal_classifier={"model": arguments.classifier, "batch_size": arguments.batch_size},
        kl_tokens=arguments.kl_tokens,
        max_response_length=arguments.max_response_length,
        kl_skip_threshold=0,  # score every trial fully: comparable timings
    )
    started = time.perf_counter()
    scoring = build_scoring(settings, loaded)
    evaluator = Evaluator(
        loaded,
        harmless=EvaluationPrompts(good, loaded.template(good, system)),
        harmful=EvaluationPrompts(bad, loaded.template(bad, system)),
        max_response_length=arguments.max_response_length,
        batch_size=arguments.batch_size,
        harmless_response_length=min(
            settings.harmless_response_length, arguments.max_response_length
        ),
        continuation_tokens=settings.kl_tokens if "continuation" in scoring.reads else 0,
        stop_markers={
            prompts: scoring.stop_markers(prompts) for prompts in ("harmful", "harmless")
        },
    )
    baseline = scoring.score(evaluator.evaluate())
    scoring.set_baseline(baseline)
    setup = time.perf_counter() - started
    generator = random.Random(arguments.seed)
    evaluator.stats.tokens = evaluator.stats.forward_passes = evaluator.stats.rows = 0
    seconds, scored_seconds, refusals = [], 0.0, []
    for _ in range(arguments.trials):
        params = random_params(generator, loaded.n_layers)
        started = time.perf_counter()
        ablator.apply(params)
        applied = time.perf_counter()
        trial = Trial(number=0, scores=scoring.score(evaluator.evaluate()))
        scored_seconds += time.perf_counter() - applied
        ablator.restore()
        seconds.append(time.perf_counter() - started)
        refusals.append(trial.refusals)
    ordered = sorted(seconds)
    # What each shared measurement costs alone (an edit applied, 5 repetitions).
    measured = {"first_token_kl": evaluator.first_token_divergences}
    if evaluator.continuation_tokens:
        measured["multi_token_kl"] = evaluator.continuation_divergences
    parts_ms = {}
    ablator.apply(random_params(generator, loaded.n_layers))
    evaluator.evaluate()
    for part, measure in measured.items():
        started = time.perf_counter()
        for _ in range(5):
            measure()
        parts_ms[part] = 1000 * (time.perf_counter() - started) / 5
    ablator.restore()
    return {
        "parts_ms": parts_ms,
        "scorers": [scorer for scorer, _ in COMBINATIONS[name]],
        "setup_s": setup,
        "baseline": {key: score.display() for key, score in baseline.items()},
        "seconds_per_trial": sum(seconds) / len(seconds),
        "median_s": ordered[len(ordered) // 2],
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "generated_tokens": evaluator.stats.tokens,
        "generated_tokens_per_s": evaluator.stats.tokens / max(scored_seconds, 1e-9),
        "continuation_tokens": evaluator.continuation_tokens,
        "shared_prefix_tokens": evaluator.shares_prefix,
        "refusals_range": [
            min((r for r in refusals if r is not None), default=None),
            max((r for r in refusals if r is not None), default=None),
        ],
        "kl_prompts": len(good),
        "refusal_prompts": len(bad),
    }


def end_to_end(arguments: argparse.Namespace) -> dict | None:
    """Time `hctl-worker run` on the fixture when the SEARCH helper's CLI supports it."""
    executable = Path(sys.executable).with_name("hctl-worker")
    help_text = subprocess.run(
        [str(executable), "run", "--help"], capture_output=True, text=True, check=False
    )
    if help_text.returncode != 0:
        return {"skipped": "hctl-worker run is not available yet"}
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "config.toml"
        prompts = FIXTURE / "prompts"
        config.write_text(
            "\n".join(
                [
                    f'model = "{FIXTURE}"',
                    'dtypes = ["float32"]',
                    'device_map = "cpu"',
                    f"batch_size = {arguments.batch_size}",
                    f"max_response_length = {arguments.max_response_length}",
                    f"n_trials = {arguments.trials}",
                    "n_startup_trials = 10",
                    "seed = 1",
                    f'system_prompt = "{SYSTEM_PROMPT}"',
                    f'[good_prompts]\ndataset = "{prompts / "harmless_train.txt"}"',
                    f'[bad_prompts]\ndataset = "{prompts / "harmful_train.txt"}"',
                    f'[good_evaluation_prompts]\ndataset = "{prompts / "harmless_test.txt"}"',
                    f'[bad_evaluation_prompts]\ndataset = "{prompts / "harmful_test.txt"}"',
                ]
            )
            + "\n"
        )
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


def print_table(results: dict) -> None:
    rows = [
        ("model", results["settings"]["model"] or "tiny-refuser (fixture)"),
        ("parameters / layers", f"{results['parameters']:,} / {results['n_layers']}"),
        (
            "device / dtype / threads",
            f"{results['settings']['device']} / "
            f"{results['settings']['dtype']} / {results['threads']}",
        ),
        ("load", f"{results['stages']['load_s']:.2f} s"),
        (
            "residuals",
            f"{results['stages']['residuals_s']:.2f} s "
            f"({results['stages']['residual_prompts']} prompts)",
        ),
    ]
    for name, combination in results["combinations"].items():
        rows += [
            (f"[{name}] scorers", ", ".join(combination["scorers"])),
            (f"[{name}] setup + baseline", f"{combination['setup_s']:.2f} s"),
            (f"[{name}] baseline", json.dumps(combination["baseline"])),
            (
                f"[{name}] seconds per trial (mean)",
                f"{combination['seconds_per_trial']:.3f} s over {results['settings']['trials']} "
                f"trials ({combination['kl_prompts']} harmless, "
                f"{combination['refusal_prompts']} harmful prompts)",
            ),
            (
                f"[{name}] median / min / max",
                f"{combination['median_s']:.3f} / {combination['min_s']:.3f} / "
                f"{combination['max_s']:.3f} s",
            ),
            (
                f"[{name}] generated tokens (per s)",
                f"{combination['generated_tokens']} "
                f"({combination['generated_tokens_per_s']:.0f}/s)",
            ),
            (f"[{name}] continuation tokens scored", str(combination["continuation_tokens"])),
            (
                f"[{name}] KL passes alone",
                ", ".join(f"{part} {ms:.1f} ms" for part, ms in combination["parts_ms"].items()),
            ),
        ]
    rows.append(("peak RSS", f"{results['peak_rss_mb']:.0f} MB"))
    if "peak_cuda_mb" in results:
        rows.append(("peak CUDA memory", f"{results['peak_cuda_mb']:.0f} MB"))
    if results.get("end_to_end"):
        for key, value in results["end_to_end"].items():
            rows.append((f"hctl-worker run: {key}", json.dumps(value)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="folder, hub id, or qwen3-0.6b (random)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-response-length", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=0, help="cap every prompt set (0 = all)")
    parser.add_argument(
        "--prompts-from", default="", help="a folder with prompts/*.txt (e.g. a fixture's)"
    )
    parser.add_argument("--row-normalization", default="none", choices=["none", "pre", "full"])
    parser.add_argument("--threads", type=int, default=0, help="0 = the worker's choice")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-system-prompt", action="store_true")
    parser.add_argument(
        "--combinations", nargs="+", default=list(COMBINATIONS), choices=list(COMBINATIONS)
    )
    parser.add_argument("--classifier", default=str(CLASSIFIER), help="refusal classifier")
    parser.add_argument("--kl-tokens", type=int, default=16, help="MultiTokenKL tokens")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--json", default="", help="write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    arguments = parse_arguments(argv)
    results = bench(arguments)
    if arguments.end_to_end:
        results["end_to_end"] = end_to_end(arguments)
    print_table(results)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
