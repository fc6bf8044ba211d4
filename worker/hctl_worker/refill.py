"""Refilling a batch as its replies finish.

A batch's replies end at different lengths (a refusal at its first marker, others at the stop
token or the length limit), and a batch takes as many decode steps as its longest reply. Each
step reads every weight, however few rows are left. So whenever the rows still generating and
the next batch's rows fit in the joint batch's limit (`row_limit`: as many rows as the memory
budget holds keys and values for, at the replies' full length), the next batch's first pass runs
and its rows join the running batch: their keys and values are appended to the cache, the
shorter side padded on the left and masked, and the decode steps carry on with both. Every row
keeps its own positions and attention mask, so its reply is the one it gets alone
(`tests/worker/test_refill.py` compares them).

Only plain key/value caches can be joined like this (`replay.replayable`), and only batches
decoded one token per row: drafts and static decoding keep their batches apart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as functional

from hctl_worker.replay import replayable

# A joint batch holds at most this many times a batch's rows, whatever the memory budget allows.
MAX_ROWS_FACTOR = 4


def cache_bytes(cache) -> int:
    """The bytes of a key/value cache's keys and values (0 for any other cache)."""
    layers = getattr(cache, "layers", None) or []
    return sum(
        layer.keys.nbytes + layer.values.nbytes
        for layer in layers
        if getattr(layer, "keys", None) is not None
    )


def row_limit(cache, rows: int, columns: int, new_tokens: int, budget: int) -> int:
    """How many rows a batch of `rows` rows may grow to by taking in others: as many as `budget`
    bytes of keys and values hold at the replies' full length (`columns` now, `new_tokens`
    more), at least `rows`, at most MAX_ROWS_FACTOR times as many."""
    per_row = cache_bytes(cache) / max(rows, 1) * (columns + new_tokens) / max(columns, 1)
    fitting = int(budget // per_row) if per_row > 0 else rows
    return max(rows, min(MAX_ROWS_FACTOR * rows, fitting))


def joinable(cache, attention_mask: torch.Tensor) -> bool:
    """Whether `cache` is a plain key/value cache holding `attention_mask`'s columns."""
    if not replayable(cache):
        return False
    columns = attention_mask.shape[1]
    return all(
        layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[-2] == columns
        for layer in cache.layers
    )


def join_rows(
    cache, attention_mask: torch.Tensor, joining_cache, joining_mask: torch.Tensor
) -> torch.Tensor:
    """Append `joining_cache`'s rows to `cache` (in place) and return the joint attention mask.
    The side with fewer columns is padded on its left: masked columns attended by no row."""
    columns = max(attention_mask.shape[1], joining_mask.shape[1])
    for layer, joining in zip(cache.layers, joining_cache.layers, strict=True):
        device = layer.keys.device
        layer.keys = torch.cat(
            [_pad_left(layer.keys, columns), _pad_left(joining.keys.to(device), columns)]
        )
        layer.values = torch.cat(
            [_pad_left(layer.values, columns), _pad_left(joining.values.to(device), columns)]
        )
    joining_mask = joining_mask.to(attention_mask.device, attention_mask.dtype)
    return torch.cat([_pad_left(attention_mask, columns), _pad_left(joining_mask, columns)])


def refilled_passes(batches: Sequence[tuple[Sequence[int], int]]) -> int:
    """The passes a generation without drafts takes when batches are refilled, as the engine
    (`generation._generate_batch`) runs them: each batch is the tokens each of its rows needs
    (its first from the batch's first pass, one more per pass after it) and the rows a run it
    opens may grow to (0: it takes in no batch). For pricing the way not taken."""
    queue = deque(batches)
    passes = 0
    while queue:
        needs, limit = queue.popleft()
        passes += 1
        left = [need - 1 for need in needs]  # passes each row needs after its first
        while True:
            while queue and len(left) + len(queue[0][0]) <= limit:
                joined, _ = queue.popleft()
                passes += 1
                left += [need - 1 for need in joined]
            left = [steps for steps in left if steps > 0]
            if not left:
                break
            passes += 1
            left = [steps - 1 for steps in left]
    return passes


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """Zeros in front of the column dimension (the last of a mask, the third of keys/values)."""
    missing = columns - (tensor.shape[1] if tensor.dim() == 2 else tensor.shape[-2])
    if missing <= 0:
        return tensor
    padding = (missing, 0) if tensor.dim() == 2 else (0, 0, missing, 0)
    return functional.pad(tensor, padding)


__all__ = [
    "MAX_ROWS_FACTOR",
    "cache_bytes",
    "join_rows",
    "joinable",
    "refilled_passes",
    "row_limit",
]
