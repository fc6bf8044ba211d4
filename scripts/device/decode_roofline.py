"""The worker's decode step on one model against the memory-bandwidth limit.

    PYTHONPATH=worker:... python3 scripts/device/decode_roofline.py MODEL --device cuda \
        --dtype bfloat16 --batch-size 64 --new-tokens 32 --facts OUT/device.json --json OUT/decode.json

Loads MODEL with the worker's loader and times the worker's own generation engine
(`hctl_worker.generation.generate`, greedy, no refusal markers) on one batch of the harmful test
prompts: once with 1 new token (the prompt's pass only) and once with --new-tokens; the
difference over the difference in forward passes is the time of one decode step (median of
--repeats pairs, after a warm-up; the host clock, after a device synchronisation).

The limit: each decode step reads every weight once (the input embedding only for the batch's
rows, unless the output layer shares it) and each row's key/value cache; that many bytes over the
copy bandwidth measured by device_facts.py (--facts) is the fastest a step can be. The fraction
reported is that time over the measured step: 1.0 would be a step at the bandwidth limit.

With --operators N, one more generation runs under torch's profiler, and the N operators (by
input shapes) that took the most time are listed, per forward pass of that generation (its
prompt pass included, which the shapes tell apart): where a step's time goes
(on one CPU core, for example, the output layer's product and the key/value cache's
concatenation; on a GPU, how many kernels a step launches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from hctl_worker.encoding import encode_texts  # noqa: E402
from hctl_worker.generation import GenerationStats, generate  # noqa: E402
from hctl_worker.model import LoadedModel, load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURE_PROMPTS = REPO / "tests" / "fixtures" / "tiny-refuser" / "prompts"
SYSTEM_PROMPT = "You are a helpful assistant."


def prompts_for(model: Path, count: int) -> list[str]:
    """The first `count` harmful test prompts (the model's own, else the fixture's), repeated
    if there are fewer."""
    source = model / "prompts" if (model / "prompts").is_dir() else FIXTURE_PROMPTS
    lines = [line for line in (source / "harmful_test.txt").read_text().splitlines() if line]
    return [lines[index % len(lines)] for index in range(count)]


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of weights one decode step reads: every parameter once, less the input embedding
    when it is not the output layer's (a step reads only its rows)."""
    model = loaded.model
    unique = {id(parameter): parameter for parameter in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def cache_bytes_per_token(loaded: LoadedModel) -> int:
    """Key and value bytes one token keeps in every layer (full attention assumed)."""
    config = loaded.model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = torch.finfo(loaded.dtype).bits // 8
    return 2 * kv_heads * head_dim * element * loaded.n_layers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(loaded: LoadedModel, batches, new_tokens: int) -> tuple[float, GenerationStats]:
    stats = GenerationStats()
    device = loaded.input_device
    synchronize(device)
    started = time.perf_counter()
    generate(loaded, batches, new_tokens, stats=stats)
    synchronize(device)
    return time.perf_counter() - started, stats


def measure(arguments) -> dict:
    model_dir = Path(arguments.model)
    loaded = load_model(str(model_dir), dtypes=[arguments.dtype], device_map=arguments.device)
    texts = loaded.template(prompts_for(model_dir, arguments.batch_size), SYSTEM_PROMPT)
    batches = encode_texts(loaded, texts, arguments.batch_size)
    prompt_width = batches[0].input_ids.shape[1]
    timed(loaded, batches, min(4, arguments.new_tokens))  # warm-up
    steps, tokens = [], 0
    for _ in range(arguments.repeats):
        short_s, short = timed(loaded, batches, 1)
        long_s, long = timed(loaded, batches, arguments.new_tokens)
        passes = long.forward_passes - short.forward_passes
        steps.append((long_s - short_s) / passes)
        tokens = long.tokens
    step = statistics.median(steps)
    weights = weight_bytes(loaded)
    mean_context = prompt_width + arguments.new_tokens / 2
    cache = cache_bytes_per_token(loaded) * arguments.batch_size * mean_context
    facts = json.loads(Path(arguments.facts).read_text()) if arguments.facts else {}
    bandwidth = facts.get("copy", {}).get("bytes_per_s")
    result = {
        "model": str(model_dir),
        "architecture": loaded.model.config.architectures,
        "parameters": sum(
            p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values()
        ),
        "dtype": str(loaded.dtype),
        "device": str(loaded.input_device),
        "batch_size": arguments.batch_size,
        "new_tokens": arguments.new_tokens,
        "tokens_generated": tokens,
        "prompt_width": prompt_width,
        "decode_step_s": step,
        "decode_steps_s": steps,
        "rows_per_s": arguments.batch_size / step,
        "weight_bytes_per_step": weights,
        "cache_bytes_per_step": cache,
        "copy_bytes_per_s": bandwidth,
    }
    if arguments.operators:
        result["operators"] = operators(loaded, batches, arguments.new_tokens, arguments.operators)
    if bandwidth:
        result["weights_limit_s"] = weights / bandwidth
        result["weights_and_cache_limit_s"] = (weights + cache) / bandwidth
        result["fraction_of_limit_weights"] = result["weights_limit_s"] / step
        result["fraction_of_limit_weights_and_cache"] = result["weights_and_cache_limit_s"] / step
    return result


def operators(loaded: LoadedModel, batches, new_tokens: int, top: int) -> list[dict]:
    """The `top` operators (by name and input shapes) of one generation, in ms per decode step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if loaded.input_device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as profiler:
        _, stats = timed(loaded, batches, new_tokens)
    passes = max(1, stats.forward_passes)
    rows = []
    for event in profiler.key_averages(group_by_input_shape=True):
        device_us = getattr(event, "self_device_time_total", 0) or 0
        rows.append(
            {
                "name": event.key,
                "shapes": str(event.input_shapes),
                "calls_per_pass": event.count / passes,
                "host_ms_per_pass": event.self_cpu_time_total / 1e3 / passes,
                "device_ms_per_pass": device_us / 1e3 / passes,
            }
        )
    rows.sort(key=lambda row: max(row["host_ms_per_pass"], row["device_ms_per_pass"]), reverse=True)
    return rows[:top]


def decode_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every decode-step timing takes (this script's and graph_check.py's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--facts", default="", help="device_facts.py's JSON (copy bandwidth)")
    parser.add_argument("--json", default="", help="write the figures here")
    parser.add_argument(
        "--operators", type=int, default=0, help="list the N costliest operators per pass"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = decode_parser(__doc__.splitlines()[0]).parse_args(argv)
    result = measure(arguments)
    print(
        f"decode step: {result['decode_step_s'] * 1e3:.2f} ms at batch {result['batch_size']} "
        f"({result['rows_per_s']:.0f} tokens/s; {result['tokens_generated']} tokens generated), "
        f"weights {result['weight_bytes_per_step'] / 1e9:.2f} GB, "
        f"cache ~{result['cache_bytes_per_step'] / 1e9:.2f} GB per step"
    )
    for row in result.get("operators", []):
        print(
            f"  {row['host_ms_per_pass']:8.2f} ms host {row['device_ms_per_pass']:8.2f} ms device "
            f"{row['calls_per_pass']:6.1f} calls/pass  {row['name']} {row['shapes']}"
        )
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
