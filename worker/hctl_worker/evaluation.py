"""Scoring a trial: first-token KL on harmless prompts and the refusal rate on harmful ones.

The replies come from the generation engine (`generation.py`), which stops a reply as soon as
its verdict is certain. The unmodified model's first-token distribution (the KL reference) comes
from the same passes that generate its harmless baseline replies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional

from hctl_worker.errors import OutOfMemoryError
from hctl_worker.generation import (
    EncodedBatch,
    GenerationStats,
    SharedPrefix,
    encode_texts,
    first_token_logits,
    generate,
)
from hctl_worker.markers import contains_marker, normalise_markers, normalise_response
from hctl_worker.model import free_memory, is_out_of_memory

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

# The shared prefix is used only if it changes the first-token distribution by less than this
# KL (nats) on the unmodified model: rounding differences, never a different computation.
PREFIX_TOLERANCE = 1e-4
PREFIX_TOLERANCE_16_BIT = 2e-3


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
    return not normalised or contains_marker(normalised, markers)


class _translated_out_of_memory:
    """Turns an allocation failure into OutOfMemoryError (with its hint) where it happens."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if (
            error is not None
            and not isinstance(error, OutOfMemoryError)
            and is_out_of_memory(error)
        ):
            free_memory()
            raise OutOfMemoryError(f"out of memory while evaluating: {error}") from error
        return False


__all__ = ["Baseline", "Evaluator", "Score", "kl_divergence"]
