"""Prompts as model inputs: tokenised once, batched by length, left-padded; and the forward-call
details every pass shares (positions, the cache argument, logits for the last positions only).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel


@dataclass
class EncodedBatch:
    indices: list[int]  # positions of these rows in the caller's text list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __iter__(self) -> Iterator:
        return iter((self.indices, self.input_ids, self.attention_mask))


def encode_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int) -> list[EncodedBatch]:
    """Tokenise once, sort by length (so a batch holds similar lengths), left-pad per batch.

    Chat-templated text already holds the model's special tokens, so none are added.
    """
    tokenizer = loaded.tokenizer
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = loaded.input_device
    batches = []
    size = max(1, int(batch_size))
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        width = max(1, max(len(ids[i]) for i in chunk))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            tokens = ids[index]
            if tokens:
                input_ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
                attention_mask[row, width - len(tokens) :] = 1
        batches.append(EncodedBatch(chunk, input_ids.to(device), attention_mask.to(device)))
    return batches


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count each row's real tokens from 0 (padding and masked columns do not
    advance them)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_(min=0)


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def _forward_parameters(model: torch.nn.Module) -> frozenset[str]:
    key = type(model)
    if key not in _FORWARD_PARAMETERS:
        try:
            names = frozenset(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            names = frozenset()
        _FORWARD_PARAMETERS[key] = names
    return _FORWARD_PARAMETERS[key]


def forward_options(model: torch.nn.Module, keep: int = 1) -> dict[str, int]:
    """`logits_to_keep=keep` where the model's forward takes it: only the last positions' logits
    are used, and full [batch, length, vocab] logits are a prefill's biggest tensor."""
    return {"logits_to_keep": keep} if "logits_to_keep" in _forward_parameters(model) else {}


def cache_option(model: torch.nn.Module, cache) -> dict:
    """transformers 5 calls the KV cache argument `cache` (`past_key_values` is deprecated)."""
    if "cache" in _forward_parameters(model):
        return {"cache": cache}
    return {"past_key_values": cache}


def new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def returned_cache(outputs, cache):
    """The cache to pass on: the model's own when it returns one (legacy tuples are new objects
    every step), else the Cache object that was updated in place."""
    # transformers 5 names it `cache` (reading `past_key_values` warns); older ones did not.
    returned = outputs["cache"] if "cache" in outputs else getattr(outputs, "past_key_values", None)
    return returned if returned is not None else cache


__all__ = [
    "EncodedBatch",
    "cache_option",
    "encode_texts",
    "forward_options",
    "new_cache",
    "position_ids_for",
    "returned_cache",
]
