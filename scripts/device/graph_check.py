"""Decode steps as CUDA graphs on one model: the same replies, and how much faster.

    PYTHONPATH=worker:... python3 scripts/device/graph_check.py MODEL --device cuda \
        --dtype bfloat16 --batch-size 64 --new-tokens 32 --facts OUT/device.json --json OUT/graphs.json

(a) For a few edited trials (`Ablator` with fixed `AblationParams`, directions from the harmful
and harmless prompts), the worker's greedy replies with graphs off (the dynamic path), with static
buffers run eagerly, and with graphs on: every reply (its decoded text) must be the same, else a
line starting with MISMATCH says where. (b) The decode step's time each way (as
decode_roofline.py measures it: a run of --new-tokens less a run of 1 token, over the passes
between, median of --repeats, after a warm-up), against the weights' bytes over the copy
bandwidth of device_facts.py (--facts).

On a CPU the graph part is skipped (said so); the static and dynamic paths are still compared.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: scripts.device

import torch  # noqa: E402

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel  # noqa: E402
from hctl_worker.directions import last_token_residuals, refusal_directions  # noqa: E402
from hctl_worker.encoding import encode_texts  # noqa: E402
from hctl_worker.first_pass import Context  # noqa: E402
from hctl_worker.generation import GenerationStats, generate  # noqa: E402
from hctl_worker.model import LoadedModel, load_model  # noqa: E402
from hctl_worker.static_decode import StaticDecoder  # noqa: E402
from scripts.device.decode_roofline import (  # noqa: E402
    FIXTURE_PROMPTS,
    SYSTEM_PROMPT,
    decode_parser,
    prompts_for,
    synchronize,
    weight_bytes,
)


def trials(n_layers: int, count: int) -> list[AblationParams]:
    """The unedited model, then edits spread over the depth (both components, both scopes)."""
    last = max(n_layers - 1, 1)
    found = [AblationParams(None, {})]
    for number in range(1, count):
        peak = last * number / count
        kernel = ComponentKernel(1.0 + 0.2 * number, peak, 0.3, max(last / 3, 0.5))
        index = None if number % 2 == 0 else peak
        found.append(AblationParams(index, {"attention": kernel, "mlp": kernel}))
    return found


def decoders(loaded: LoadedModel) -> dict[str, StaticDecoder]:
    """Graphs off (the dynamic path), static eagerly, and graphs on (on CUDA only)."""
    ways = {"off": StaticDecoder.off(), "static": StaticDecoder.for_model(loaded, "eager")}
    if loaded.input_device.type == "cuda":
        ways["graphs"] = StaticDecoder.for_model(loaded, "auto")
    else:
        print("CUDA graphs: skipped (not a CUDA device); static vs dynamic compared only")
    for name, decoder in ways.items():
        print(f"{name}: {decoder.describe()}")
    return ways


def compare(loaded, batches, new_tokens: int, ways: dict, ablator: Ablator, count: int) -> dict:
    """Each trial's replies every way; MISMATCH lines where a way differs from graphs off."""
    report = {"trials": [], "mismatches": 0}
    for params in trials(loaded.n_layers, count):
        with ablator.applied(params):
            replies = {
                name: generate(loaded, batches, new_tokens, context=Context(decoder=decoder))
                for name, decoder in ways.items()
            }
        entry = {"params": params.to_dict(), "differs": {}}
        for name, got in replies.items():
            rows = [
                row for row, (a, b) in enumerate(zip(replies["off"], got, strict=True)) if a != b
            ]
            entry["differs"][name] = len(rows)
            if rows and name != "off":
                report["mismatches"] += 1
                row = rows[0]
                print(
                    f"MISMATCH: {name} vs off, trial {params.to_dict()}: {len(rows)} of "
                    f"{len(got)} replies differ; row {row}: {replies['off'][row]!r} vs "
                    f"{got[row]!r}"
                )
        report["trials"].append(entry)
    ok = report["mismatches"] == 0
    print(f"replies: {'identical' if ok else 'MISMATCH'} across {len(ways)} ways, {count} trials")
    return report


def step_time(loaded, batches, new_tokens: int, decoder: StaticDecoder, repeats: int) -> dict:
    def timed(tokens: int) -> tuple[float, GenerationStats]:
        stats = GenerationStats()
        synchronize(loaded.input_device)
        started = time.perf_counter()
        generate(loaded, batches, tokens, stats=stats, context=Context(decoder=decoder))
        synchronize(loaded.input_device)
        return time.perf_counter() - started, stats

    timed(min(4, new_tokens))  # warm-up
    steps, static = [], 0
    for _ in range(repeats):
        short_s, short = timed(1)
        long_s, long = timed(new_tokens)
        steps.append((long_s - short_s) / max(1, long.forward_passes - short.forward_passes))
        static = long.static_passes
    return {"decode_step_s": statistics.median(steps), "steps_s": steps, "static_passes": static}


def main(argv: Sequence[str] | None = None) -> int:
    parser = decode_parser(__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="edited trials compared")
    arguments = parser.parse_args(argv)
    model_dir = Path(arguments.model)
    loaded = load_model(str(model_dir), dtypes=[arguments.dtype], device_map=arguments.device)
    texts = loaded.template(prompts_for(model_dir, arguments.batch_size), SYSTEM_PROMPT)
    batches = encode_texts(loaded, texts, arguments.batch_size)
    source = model_dir / "prompts" if (model_dir / "prompts").is_dir() else FIXTURE_PROMPTS
    good = [line for line in (source / "harmless_test.txt").read_text().splitlines() if line]
    good = loaded.template(good[: arguments.batch_size], SYSTEM_PROMPT)
    with torch.inference_mode():
        bad_residuals = last_token_residuals(loaded, texts, arguments.batch_size)
        good_residuals = last_token_residuals(loaded, good, arguments.batch_size)
    ablator = Ablator(loaded, refusal_directions(bad_residuals, good_residuals))
    ways = decoders(loaded)
    result = {
        "model": str(model_dir),
        "device": str(loaded.input_device),
        "dtype": str(loaded.dtype),
        "batch_size": arguments.batch_size,
        "new_tokens": arguments.new_tokens,
        "decoders": {name: decoder.describe() for name, decoder in ways.items()},
        "replies": compare(loaded, batches, arguments.new_tokens, ways, ablator, arguments.trials),
        "timing": {},
    }
    facts = json.loads(Path(arguments.facts).read_text()) if arguments.facts else {}
    bandwidth = facts.get("copy", {}).get("bytes_per_s")
    limit = weight_bytes(loaded) / bandwidth if bandwidth else None
    result["weights_limit_s"] = limit
    for name, decoder in ways.items():
        figures = step_time(loaded, batches, arguments.new_tokens, decoder, arguments.repeats)
        if limit:
            figures["times_the_limit"] = figures["decode_step_s"] / limit
        result["timing"][name] = figures
        against = f", {figures['times_the_limit']:.1f}x the bandwidth limit" if limit else ""
        print(f"decode step, {name}: {figures['decode_step_s'] * 1e3:.2f} ms{against}")
    if "graphs" in ways:
        speedup = (
            result["timing"]["off"]["decode_step_s"] / result["timing"]["graphs"]["decode_step_s"]
        )
        result["graphs_speedup"] = speedup
        print(f"graphs: {speedup:.1f}x faster decode steps than off; {ways['graphs'].describe()}")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["replies"]["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
