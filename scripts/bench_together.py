"""Benchmark trials evaluated together (`hctl_worker.together`) against the same trials alone.

Draws groups of trials (heretic's ranges), and times each group twice, in alternating order:
every trial alone, and the group together (`score_together`, as the worker's search does with
`trials_together`). Both score with heretic's two measurements (refusals by markers, first-token
KL) and no pruning, so both do the same work; it prints seconds per trial, forward passes, and
whether every trial's scores agree (KL to float rounding).

    python scripts/bench_together.py --model PATH --together 4 --groups 3 --threads 1

No timing is asserted anywhere; this prints a table and writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
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
from hctl_worker.model import load_model  # noqa: E402
from hctl_worker.reuse import DEFAULT_REPLAY_MEMORY  # noqa: E402
from hctl_worker.together import score_together  # noqa: E402
from hctl_worker.workbench import Workbench  # noqa: E402
from scripts.bench_trials import make_evaluator, make_scoring, trial_params  # noqa: E402

SYSTEM_PROMPT = "You are a helpful assistant."


def _prompts(folder: Path, name: str, count: int) -> list[str]:
    lines = (folder / "prompts" / f"{name}.txt").read_text().splitlines()
    return [line for line in lines if line.strip()][:count]


def _values(scored) -> list[dict[str, float | None]]:
    return [{name: score.value for name, score in scores.items()} for scores, _ in scored]


def _agree(alone: dict, together: dict) -> bool:
    for name, value in alone.items():
        other = together[name]
        if name == "KLDivergence":
            if abs(other - value) > 1e-4 * max(abs(value), 1e-3):
                return False
        elif other != value:
            return False
    return True


def bench(arguments: argparse.Namespace) -> dict:
    torch.set_num_threads(arguments.threads)
    folder = Path(arguments.model)
    loaded = load_model(str(folder), dtypes=[arguments.dtype], threads=arguments.threads)
    count = arguments.prompts
    texts = {
        name: loaded.template(_prompts(folder, name, count), SYSTEM_PROMPT)
        for name in ("harmless_train", "harmful_train")
    }
    directions = refusal_directions(
        last_token_residuals(loaded, texts["harmful_train"], arguments.batch_size),
        last_token_residuals(loaded, texts["harmless_train"], arguments.batch_size),
    )
    ablator = Ablator(loaded, directions)
    good, bad = (_prompts(folder, name, count) for name in ("harmless_test", "harmful_test"))
    prompts = (
        EvaluationPrompts(good, loaded.template(good, SYSTEM_PROMPT)),
        EvaluationPrompts(bad, loaded.template(bad, SYSTEM_PROMPT)),
    )
    scoring = make_scoring("markers+kl", loaded, arguments)
    evaluator = make_evaluator("reuse", loaded, ablator, scoring, prompts, arguments)
    scoring.set_baseline(scoring.score(evaluator.evaluate()))
    workbench = Workbench(
        loaded=loaded,
        evaluator=evaluator,
        scoring=scoring,
        baseline={},
        ablator=ablator,
        profile=None,  # type: ignore[arg-type]  # the search's priors: not used here
    )
    generator = random.Random(arguments.seed)
    seconds: dict[str, list[float]] = {"alone": [], "together": []}
    passes: dict[str, int] = {"alone": 0, "together": 0}
    disagreements = 0
    for number in range(arguments.groups):
        group = [
            trial_params("heretic", generator, loaded.n_layers) for _ in range(arguments.together)
        ]
        ways = ("alone", "together") if number % 2 == 0 else ("together", "alone")
        scored = {}
        for way in ways:
            before = evaluator.stats.forward_passes
            started = time.perf_counter()
            if way == "alone":
                scored[way] = [score_together(workbench, [params])[0] for params in group]
            else:
                scored[way] = score_together(workbench, group)
            seconds[way].append((time.perf_counter() - started) / len(group))
            passes[way] += evaluator.stats.forward_passes - before
        disagreements += sum(
            not _agree(one, joint)
            for one, joint in zip(
                _values(scored["alone"]), _values(scored["together"]), strict=True
            )
        )
        print(
            f"group {number + 1}: alone {seconds['alone'][-1]:.3f} s/trial, "
            f"together {seconds['together'][-1]:.3f} s/trial",
            flush=True,
        )
    trials = arguments.groups * arguments.together
    return {
        "settings": vars(arguments),
        "trials": trials,
        "seconds_per_trial": {way: statistics.mean(values) for way, values in seconds.items()},
        "passes_per_trial": {way: value / trials for way, value in passes.items()},
        "trials_whose_scores_differ": disagreements,
    }


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder with prompts/")
    parser.add_argument("--together", type=int, default=4, help="trials per group")
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32, help="per prompt set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-response-length", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args(argv)
    # What make_evaluator / make_scoring read of bench_worker's arguments.
    arguments.replay_memory = DEFAULT_REPLAY_MEMORY
    arguments.no_drafts = arguments.no_refill = False
    arguments.classifier = None
    arguments.kl_tokens = 16
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    result = bench(arguments)
    per_trial, per_pass = result["seconds_per_trial"], result["passes_per_trial"]
    print(
        f"{result['trials']} trials: alone {per_trial['alone']:.3f} s/trial "
        f"({per_pass['alone']:.1f} passes), together {per_trial['together']:.3f} s/trial "
        f"({per_pass['together']:.1f} passes); "
        f"{result['trials_whose_scores_differ']} trials whose scores differ"
    )
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
