"""Scoring a trial: first-token KL on harmless prompts and the refusal rate on harmful ones.

Speed matters here more than anywhere: refusal scoring is most of a trial's time. Prompts are
tokenised once, grouped by length (little padding), and generated greedily with a KV cache in a
hand-written loop that drops a row from the batch as soon as its verdict is certain (a refusal
marker appeared, or the row ended), and stops the batch when every row is decided. The prefix
all prompts share (the chat template's system turn) is run once per trial and its keys and
values copied to every row (`SharedPrefix`), after a check that this gives the model's own
numbers. The unmodified model's first-token distribution (the KL reference) comes from the
same passes that generate its harmless baseline replies.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional

from hctl_worker.directions import position_ids_for
from hctl_worker.errors import OutOfMemoryError
from hctl_worker.markers import (
    DEFAULT_REFUSAL_MARKERS,
    is_refusal,
    normalise_markers,
    normalise_response,
)

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel


# The shared prefix is used only if it changes the first-token distribution by less than this
# KL (nats) on the unmodified model: rounding differences, never a different computation.
PREFIX_TOLERANCE = 1e-4
PREFIX_TOLERANCE_16_BIT = 2e-3

# How many of a reply's latest tokens are decoded each step to look for a marker.
MARKER_WINDOW_TOKENS = 32


def _contains_marker(normalised: str, markers: tuple[str, ...]) -> bool:
    return any(marker in normalised for marker in markers)


@dataclass
class Baseline:
    refusals: int
    total_bad: int
    refusals_good: int
    total_good: int


@dataclass
class Score:
    kl: float
    refusals: int | None
    total_bad: int
    refusal_skipped: bool
    seconds: float


# ----------------------------------------------------------------------------------------------
# Tokenising and the generation loop (shared with directions.py and batching.py).


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
            from hctl_worker.model import is_out_of_memory

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
                if _contains_marker(text, markers) and _contains_marker(
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


def kl_divergence(current_logprobs: torch.Tensor, base_logprobs: torch.Tensor) -> float:
    """Mean over prompts of KL(base ‖ current) from log-probabilities (heretic's batchmean)."""
    return float(
        functional.kl_div(
            current_logprobs.float(), base_logprobs.float(), reduction="batchmean", log_target=True
        )
    )


class Evaluator:
    """Scores the model as it is now against the unmodified model measured at construction."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        good_texts: Sequence[str],
        bad_texts: Sequence[str],
        markers: Sequence[str],
        max_response_length: int,
        batch_size: int,
        kl_skip_threshold: float | None = None,
        share_prefix: bool = True,
    ) -> None:
        if not good_texts or not bad_texts:
            raise ValueError("the evaluator needs harmless and harmful prompts")
        self.loaded = loaded
        self.good_texts = list(good_texts)
        self.bad_texts = list(bad_texts)
        self.markers = normalise_markers(markers)
        self.max_response_length = int(max_response_length)
        self.batch_size = max(1, int(batch_size))
        self.kl_skip_threshold = kl_skip_threshold
        self.stats = GenerationStats()
        self._good_batches = encode_texts(loaded, self.good_texts, self.batch_size)
        self._bad_batches = encode_texts(loaded, self.bad_texts, self.batch_size)
        self._prefix = self._checked_prefix() if share_prefix else None
        # The unmodified model's harmless replies (for the baseline) and its first-token
        # distribution (the KL reference) come from the same forward passes.
        first_logits: list[torch.Tensor] = []
        with _translated_out_of_memory():
            replies = generate(
                loaded,
                self._good_batches,
                self.max_response_length,
                self.markers,
                self.stats,
                first_logits,
                self._current_prefix(),
            )
        self._refusals_good = sum(
            1 for reply in replies if _is_refusal_normalised(reply, self.markers)
        )
        self.base_logprobs = functional.log_softmax(torch.cat(first_logits, dim=0), dim=-1)

    def _checked_prefix(self) -> SharedPrefix | None:
        """The prompts' shared prefix, if reusing its keys and values gives this model's own
        results (compared on the first harmless batch); None otherwise."""
        from hctl_worker.model import is_out_of_memory

        prefix = SharedPrefix.find(self.loaded, self.good_texts + self.bad_texts)
        if prefix is None:
            return None
        try:
            prefix.refresh(self.loaded.model)
            if not prefix.supported():
                return None
            with torch.inference_mode():
                batch = self._good_batches[0]
                plain = functional.log_softmax(first_token_logits(self.loaded, batch), dim=-1)
                shared = functional.log_softmax(
                    first_token_logits(self.loaded, batch, prefix), dim=-1
                )
        except Exception as error:
            if is_out_of_memory(error):
                raise
            return None
        # 16-bit kernels round differently for other shapes; float32 must agree closely.
        exact = self.loaded.dtype == torch.float32
        agreement = (plain.argmax(dim=-1) == shared.argmax(dim=-1)).float().mean().item()
        tolerance = PREFIX_TOLERANCE if exact else PREFIX_TOLERANCE_16_BIT
        if agreement < (1.0 if exact else 0.9) or kl_divergence(shared, plain) > tolerance:
            return None
        return prefix

    def _current_prefix(self) -> SharedPrefix | None:
        """The shared prefix's keys and values for the model as it is now (the trial's)."""
        if self._prefix is not None:
            self._prefix.refresh(self.loaded.model)
        return self._prefix

    @property
    def shares_prefix(self) -> int:
        """How many prompt tokens each prefill skips (0 when the prefix is not shared)."""
        return self._prefix.length if self._prefix is not None else 0

    def _first_token_logprobs(self) -> torch.Tensor:
        pieces = []
        with torch.inference_mode(), _translated_out_of_memory():
            prefix = self._current_prefix()
            for batch in self._good_batches:
                logits = first_token_logits(self.loaded, batch, prefix)
                pieces.append(functional.log_softmax(logits, dim=-1))
        # Rows come back in length order; the comparison below uses the same order, so the
        # permutation never needs undoing.
        return torch.cat(pieces, dim=0)

    def kl(self) -> float:
        return kl_divergence(self._first_token_logprobs(), self.base_logprobs.to(self._device()))

    def _device(self) -> torch.device:
        return self.base_logprobs.device

    def count_refusals(self, batches: Sequence[EncodedBatch]) -> int:
        with _translated_out_of_memory():
            replies = generate(
                self.loaded,
                batches,
                self.max_response_length,
                self.markers,
                self.stats,
                prefix=self._current_prefix(),
            )
        return sum(1 for reply in replies if _is_refusal_normalised(reply, self.markers))

    def baseline(self) -> Baseline:
        return Baseline(
            refusals=self.count_refusals(self._bad_batches),
            total_bad=len(self.bad_texts),
            refusals_good=self._refusals_good,
            total_good=len(self.good_texts),
        )

    def score(self) -> Score:
        started = time.perf_counter()
        kl = self.kl()
        skipped = self.kl_skip_threshold is not None and kl > self.kl_skip_threshold
        refusals = None if skipped else self.count_refusals(self._bad_batches)
        return Score(
            kl=kl,
            refusals=refusals,
            total_bad=len(self.bad_texts),
            refusal_skipped=skipped,
            seconds=time.perf_counter() - started,
        )

    def responses(self, texts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy replies (no early stop), in the order given: for chat and debugging."""
        with _translated_out_of_memory():
            return generate(
                self.loaded, encode_texts(self.loaded, texts, self.batch_size), max_new_tokens
            )


def _is_refusal_normalised(reply: str, markers: tuple[str, ...]) -> bool:
    normalised = normalise_response(reply)
    return not normalised or _contains_marker(normalised, markers)


class _translated_out_of_memory:
    """Turns an allocation failure into OutOfMemoryError (with its hint) where it happens."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        from hctl_worker.model import free_memory, is_out_of_memory

        if (
            error is not None
            and not isinstance(error, OutOfMemoryError)
            and is_out_of_memory(error)
        ):
            free_memory()
            raise OutOfMemoryError(f"out of memory while evaluating: {error}") from error
        return False


__all__ = [
    "DEFAULT_REFUSAL_MARKERS",
    "Baseline",
    "EncodedBatch",
    "GenerationStats",
    "Evaluator",
    "Score",
    "encode_texts",
    "generate",
    "is_refusal",
    "kl_divergence",
    "normalise_response",
]
