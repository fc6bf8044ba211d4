"""Choosing the batch size by measured throughput (batch_size = 0 means "find it").

Sizes 1, 2, 4, ... up to max_batch_size (and no larger than the prompts measured on) are tried
on the job's own prompts with the job's model: each gets a short warm-up and a timed greedy
generation, and the size that generates the most tokens per second wins (the largest size is
often not the fastest: on a CPU, wide batches spill the caches). Running out of memory ends the
sweep at the last size that fit. The figures are logged, and kept in the job directory
(`batch_size.json`) for the same model, device, dtype, threads and prompts, so a resumed job or
a second worker on the same machine does not measure again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hctl_worker.errors import OutOfMemoryError
from hctl_worker.generation import GenerationStats, encode_texts, generate
from hctl_worker.model_errors import free_memory, is_out_of_memory

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

# Once throughput has fallen this far below the best, larger sizes are not worth trying.
GIVE_UP_RATIO = 0.7
CACHE_FILE = "batch_size.json"


def candidate_sizes(max_batch_size: int, prompts: int | None = None) -> list[int]:
    """1, 2, 4, ... and the largest size itself when it is not a power of two; the largest is
    max_batch_size, or the number of prompts when there are fewer (a wider batch has no rows)."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    largest = min(max_batch_size, prompts) if prompts else max_batch_size
    largest = max(1, largest)
    sizes = []
    size = 1
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return sizes


@dataclass
class BatchSizeChoice:
    """The measured throughput per size (generated tokens per second) and the size chosen."""

    size: int
    tokens_per_second: dict[int, float] = field(default_factory=dict)
    cached: bool = False

    def describe(self) -> str:
        figures = ", ".join(f"{size}: {rate:.1f}" for size, rate in self.tokens_per_second.items())
        source = "from the job's cache; " if self.cached else ""
        return f"batch size {self.size} ({source}tokens/s by size: {figures})"


def measure_batch_size(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    max_batch_size: int,
    on_message: Callable[[str], None] | None = None,
    max_new_tokens: int = 8,
    clock: Callable[[], float] = time.perf_counter,
) -> BatchSizeChoice:
    """The batch size with the highest measured throughput (tokens per second), OOM-safe."""
    if not texts:
        raise ValueError("no texts to measure the batch size on")
    say = on_message or (lambda message: None)
    choice = BatchSizeChoice(size=0)
    best_rate = 0.0
    for size in candidate_sizes(max_batch_size, len(texts)):
        batch_texts = [texts[i % len(texts)] for i in range(size)]
        try:
            batches = encode_texts(loaded, batch_texts, size)
            generate(loaded, batches, min(2, max_new_tokens))  # warm-up: allocations, kernels
            stats = GenerationStats()
            started = clock()
            generate(loaded, batches, max_new_tokens, stats=stats)
            elapsed = max(clock() - started, 1e-9)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            free_memory()
            say(f"batch size {size}: out of memory")
            if choice.size == 0:
                raise OutOfMemoryError(
                    "out of memory even with batch size 1",
                    hint="Use a GPU with more memory, or a smaller model or dtype.",
                ) from error
            break
        rate = max(stats.tokens, 1) / elapsed
        choice.tokens_per_second[size] = rate
        say(f"batch size {size}: {rate:.1f} tokens/s")
        if rate > best_rate:
            choice.size, best_rate = size, rate
        elif rate < GIVE_UP_RATIO * best_rate:
            break
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    say(f"chose batch size {choice.size}")
    return choice


def calibration_key(loaded: LoadedModel, texts: Sequence[str], max_batch_size: int) -> str:
    """What a measurement holds for: the model, its dtype and device, the threads, the prompts."""
    device = str(loaded.input_device)
    if loaded.input_device.type == "cuda":
        device += " " + torch.cuda.get_device_name(loaded.input_device)
    digest = hashlib.sha256()
    parts = [loaded.source, str(loaded.dtype), device, torch.get_num_threads(), max_batch_size]
    digest.update(json.dumps([*parts, list(texts)]).encode())
    return digest.hexdigest()


def cached_batch_size(
    job_root: Path,
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    max_batch_size: int,
    on_message: Callable[[str], None] | None = None,
) -> BatchSizeChoice:
    """The job's measured batch size for this model, device and prompts; measured (and kept)
    when the job has none."""
    path = job_root / CACHE_FILE
    key = calibration_key(loaded, texts, max_batch_size)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            rates = {int(size): float(rate) for size, rate in stored["tokens_per_second"].items()}
            return BatchSizeChoice(int(stored["size"]), rates, cached=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none yet, or damaged: measured again
    choice = measure_batch_size(loaded, texts, max_batch_size=max_batch_size, on_message=on_message)
    record = {"key": key, "model": loaded.source, **asdict(choice)}
    record.pop("cached")
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    return choice


__all__ = [
    "BatchSizeChoice",
    "cached_batch_size",
    "candidate_sizes",
    "measure_batch_size",
]
