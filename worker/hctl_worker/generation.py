"""The generation engine: tokenising prompts, the prompt pass, and greedy generation with a KV cache.

Speed matters here more than anywhere: refusal scoring is most of a trial's time. Prompts are
tokenised once, grouped by length (little padding), and generated greedily with a KV cache in a
hand-written loop that drops a row from the batch as soon as its verdict is certain (a refusal
marker appeared, or the row ended), and stops the batch when every row is decided. The prefix
all prompts share (the chat template's system turn) can be run once per model state and its keys
and values copied to every row (`SharedPrefix`); the evaluator checks that this gives the model's
own numbers before it relies on it.

Used by the evaluation (replies and first-token logits), the directions (residuals of the prompt
pass) and the batch-size search.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hctl_worker.markers import contains_marker, normalise_response
from hctl_worker.model import is_out_of_memory

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

# How many of a reply's latest tokens are decoded each step to look for a marker.
MARKER_WINDOW_TOKENS = 32


@dataclass
class GenerationStats:
    """Counters for benchmarks: tokens generated and forward passes run."""

    tokens: int = 0
    forward_passes: int = 0
    rows: int = 0


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


def forward_options(model: torch.nn.Module) -> dict[str, int]:
    """`logits_to_keep=1` where the model's forward takes it: only the last position's logits
    are used, and full [batch, length, vocab] logits are a prefill's biggest tensor."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def cache_option(model: torch.nn.Module, cache) -> dict:
    """transformers 5 calls the KV cache argument `cache` (`past_key_values` is deprecated)."""
    if "cache" in _forward_parameters(model):
        return {"cache": cache}
    return {"past_key_values": cache}


def first_token_logits(
    loaded: LoadedModel, batch: EncodedBatch, prefix: SharedPrefix | None = None
) -> torch.Tensor:
    """Raw next-token logits after each prompt: [rows, vocab], float32."""
    if prefix is not None:
        outputs, _, _, _ = _prefill(loaded.model, batch, prefix)
        return outputs.logits[:, -1, :].float()
    outputs = loaded.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_for(batch.attention_mask),
        use_cache=False,
        **forward_options(loaded.model),
    )
    return outputs.logits[:, -1, :].float()


class SharedPrefix:
    """Tokens every prompt starts with (usually the chat template's system turn).

    Their keys and values are computed once per model state (`refresh`) and copied to every
    row of a batch, so a prefill only runs the rest of each prompt. A row then reads
    prefix + padding + its own tokens, with positions continuing from the prefix, which is
    the same computation as the left-padded prompt. The Evaluator checks that on the model
    before it relies on it.
    """

    MINIMUM_TOKENS = 4

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids  # [1, length] on the input device
        self.cache = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @classmethod
    def find(cls, loaded: LoadedModel, texts: Sequence[str]) -> SharedPrefix | None:
        """The longest token prefix of all texts, leaving every text at least one token."""
        ids = loaded.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if not ids or any(not row for row in ids):
            return None
        length = min(len(row) for row in ids) - 1
        first = ids[0]
        for row in ids[1:]:
            same = 0
            while same < length and row[same] == first[same]:
                same += 1
            length = same
        if length < cls.MINIMUM_TOKENS:
            return None
        return cls(torch.tensor([first[:length]], dtype=torch.long, device=loaded.input_device))

    def refresh(self, model: torch.nn.Module) -> None:
        """Compute the prefix's keys and values with the model as it is now."""
        cache = _new_cache(model)
        with torch.inference_mode():
            outputs = model(
                input_ids=self.input_ids,
                attention_mask=torch.ones_like(self.input_ids),
                position_ids=torch.arange(self.length, device=self.input_ids.device)[None],
                use_cache=True,
                **cache_option(model, cache),
                **forward_options(model),
            )
        self.cache = _returned_cache(outputs, cache)

    def supported(self) -> bool:
        """Only full-attention key/value caches can be copied row by row like this."""
        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)

    def copy_for(self, model: torch.nn.Module, rows: int):
        cache = _new_cache(model)
        for index, layer in enumerate(self.cache.layers):
            cache.update(
                layer.keys.expand(rows, -1, -1, -1).contiguous(),
                layer.values.expand(rows, -1, -1, -1).contiguous(),
                index,
            )
        return cache


def _prefill(model: torch.nn.Module, batch: EncodedBatch, prefix: SharedPrefix | None):
    """The prompt pass of a generation: (outputs, cache, attention mask, last positions)."""
    if prefix is None:
        cache = _new_cache(model)
        attention_mask = batch.attention_mask
        position_ids = position_ids_for(attention_mask)
        arguments = {
            "input_ids": batch.input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": True,
            **forward_options(model),
        }
        try:
            outputs = model(**arguments, **cache_option(model, cache))
        except Exception as error:
            if is_out_of_memory(error):
                raise
            # Remote-code models older than transformers' Cache objects build their own.
            outputs = model(**arguments)
            cache = None
        return outputs, _returned_cache(outputs, cache), attention_mask, position_ids[:, -1:]
    # A left-padded row is padding + prefix + rest; without the prefix's columns it is
    # padding + rest, still left-padded, and the prefix moves in front of the padding.
    rows, width = batch.input_ids.shape
    rest = width - prefix.length
    columns = torch.arange(rest, device=batch.input_ids.device)[None, :]
    padding = (batch.attention_mask == 0).sum(dim=1, keepdim=True)
    source = columns + prefix.length * (columns >= padding)
    rest_ids = batch.input_ids.gather(1, source)
    rest_mask = batch.attention_mask.gather(1, source)
    attention_mask = torch.cat([rest_mask.new_ones((rows, prefix.length)), rest_mask], dim=1)
    position_ids = position_ids_for(attention_mask)[:, prefix.length :]
    cache = prefix.copy_for(model, rows)
    outputs = model(
        input_ids=rest_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **cache_option(model, cache),
        **forward_options(model),
    )
    return outputs, _returned_cache(outputs, cache), attention_mask, position_ids[:, -1:]


def _new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _stop_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    eos = loaded.tokenizer.eos_token_id
    if eos is not None:
        ids.add(int(eos))
    config_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, (list, tuple)):
        ids.update(int(token) for token in config_eos)
    return ids


def _returned_cache(outputs, cache):
    """The cache to pass on: the model's own when it returns one (legacy tuples are new objects
    every step), else the Cache object that was updated in place."""
    # transformers 5 names it `cache` (reading `past_key_values` warns); older ones did not.
    returned = outputs["cache"] if "cache" in outputs else getattr(outputs, "past_key_values", None)
    return returned if returned is not None else cache


def generate_batch(
    loaded: LoadedModel,
    batch: EncodedBatch,
    max_new_tokens: int,
    markers: tuple[str, ...] | None = None,
    stats: GenerationStats | None = None,
    first_logits: list[torch.Tensor] | None = None,
    prefix: SharedPrefix | None = None,
) -> list[str]:
    """Greedy replies for one batch; rows leave the batch at EOS or, with `markers`, as soon as
    their normalised text contains one (the reply is then a refusal whatever follows)."""
    model = loaded.model
    tokenizer = loaded.tokenizer
    stop_ids = _stop_token_ids(loaded)
    rows = len(batch.indices)
    generated: list[list[int]] = [[] for _ in range(rows)]
    if max_new_tokens <= 0 and first_logits is None:
        return ["" for _ in range(rows)]
    input_device = batch.input_ids.device
    active = list(range(rows))  # the row held in each cache slot
    done: set[int] = set()
    outputs, cache, attention_mask, last_positions = _prefill(model, batch, prefix)
    if first_logits is not None:
        # The prefill's last logits are the first-token distribution KL needs: one pass for both.
        first_logits.append(outputs.logits[:, -1, :].float())
    next_positions = last_positions + 1
    forward_passes = 1
    can_drop_rows = hasattr(cache, "batch_select_indices")
    for step in range(max_new_tokens):
        # With several GPUs the logits live on the last one; inputs go to the first.
        tokens = outputs.logits[:, -1, :].argmax(dim=-1).to(input_device)
        token_list = tokens.tolist()
        keep: list[int] = []
        for slot, row in enumerate(active):
            if row in done:
                continue
            token = token_list[slot]
            if token in stop_ids:
                done.add(row)
                continue
            generated[row].append(token)
            if markers is not None:
                # Only the recent tokens can complete a marker; a longer miss is harmless,
                # because every verdict is taken on the whole reply at the end.
                recent = generated[row][-MARKER_WINDOW_TOKENS:]
                text = normalise_response(tokenizer.decode(recent, skip_special_tokens=True))
                if contains_marker(text, markers) and contains_marker(
                    normalise_response(tokenizer.decode(generated[row], skip_special_tokens=True)),
                    markers,
                ):
                    done.add(row)
                    continue
            keep.append(slot)
        if not keep or step == max_new_tokens - 1:
            break
        if can_drop_rows and len(keep) < len(active):
            # A CPU index works for cache layers on any device.
            selection = torch.tensor(keep, dtype=torch.long)
            try:
                cache.batch_select_indices(selection)
            except Exception:  # A cache kind that cannot drop rows: keep computing them.
                can_drop_rows = False
            else:
                on_input = selection.to(input_device)
                tokens = tokens[on_input]
                attention_mask = attention_mask[on_input]
                next_positions = next_positions[on_input]
                active = [active[slot] for slot in keep]
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1
        )
        outputs = model(
            input_ids=tokens.unsqueeze(-1),
            attention_mask=attention_mask,
            position_ids=next_positions,
            use_cache=True,
            **cache_option(model, cache),
            **forward_options(model),
        )
        cache = _returned_cache(outputs, cache)
        next_positions = next_positions + 1
        forward_passes += 1
    if stats is not None:
        stats.tokens += sum(len(row) for row in generated)
        stats.forward_passes += forward_passes
        stats.rows += rows
    return [tokenizer.decode(row, skip_special_tokens=True) for row in generated]


def generate(
    loaded: LoadedModel,
    batches: Sequence[EncodedBatch],
    max_new_tokens: int,
    markers: tuple[str, ...] | None = None,
    stats: GenerationStats | None = None,
    first_logits: list[torch.Tensor] | None = None,
    prefix: SharedPrefix | None = None,
) -> list[str]:
    """Replies for every batch, in the callers' original order. With `first_logits`, each
    batch's first-token logits are appended to it (in batch order, not the callers')."""
    total = sum(len(batch.indices) for batch in batches)
    replies = [""] * total
    with torch.inference_mode():
        for batch in batches:
            for index, reply in zip(
                batch.indices,
                generate_batch(loaded, batch, max_new_tokens, markers, stats, first_logits, prefix),
                strict=True,
            ):
                replies[index] = reply
    return replies


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding shifts them)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_(min=0)


__all__ = [
    "EncodedBatch",
    "GenerationStats",
    "SharedPrefix",
    "cache_option",
    "encode_texts",
    "first_token_logits",
    "forward_options",
    "generate",
    "generate_batch",
    "position_ids_for",
]
