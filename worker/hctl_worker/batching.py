"""Choosing the batch size by measured throughput (batch_size = 0 means "find it").

Sizes 1, 2, 4, ... up to max_batch_size are tried on the real prompts; each gets a warm-up
and a timed greedy generation, and the size with the most prompts per second wins (the largest
size is often not the fastest). Running out of memory ends the sweep at the last size that fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from hctl_worker.errors import OutOfMemoryError
from hctl_worker.generation import encode_texts, generate
from hctl_worker.model import free_memory, is_out_of_memory

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

# Once throughput has fallen this far below the best, larger sizes are not worth trying.
GIVE_UP_RATIO = 0.7


def candidate_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... and max_batch_size itself when it is not a power of two."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch_size)
    return sizes


def find_batch_size(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    max_batch_size: int,
    on_message: Callable[[str], None] | None = None,
    max_new_tokens: int = 8,
    clock: Callable[[], float] = time.perf_counter,
) -> int:
    """The batch size with the highest measured throughput (prompts per second), OOM-safe."""
    if not texts:
        raise ValueError("no texts to measure the batch size on")
    say = on_message or (lambda message: None)
    best_size, best_rate = 0, 0.0
    for size in candidate_sizes(max_batch_size):
        batch_texts = [texts[i % len(texts)] for i in range(size)]
        try:
            batches = encode_texts(loaded, batch_texts, size)
            generate(loaded, batches, max_new_tokens)  # warm-up: allocations, kernel choice
            started = clock()
            generate(loaded, batches, max_new_tokens)
            elapsed = max(clock() - started, 1e-9)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            free_memory()
            say(f"batch size {size}: out of memory")
            if best_size == 0:
                raise OutOfMemoryError(
                    "out of memory even with batch size 1",
                    hint="Use a GPU with more memory, or a smaller model or dtype.",
                ) from error
            break
        rate = size / elapsed
        say(f"batch size {size}: {rate:.1f} prompts/s")
        if rate > best_rate:
            best_size, best_rate = size, rate
        elif rate < GIVE_UP_RATIO * best_rate:
            break
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    say(f"chose batch size {best_size}")
    return best_size


__all__ = ["candidate_sizes", "find_batch_size"]
