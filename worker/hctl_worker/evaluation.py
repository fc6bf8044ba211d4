"""Measuring the model as it is now, for the scorers: replies, and divergences from the original.

`Evaluator` is built once per job, on the unmodified model: it tokenises the evaluation prompts,
checks whether their shared prefix can be reused, and measures the original's references (the
first-token distributions and, when a scorer needs them, the greedy continuations and their
distributions). `Evaluator.evaluate()` then gives a `TrialEvaluation` for the model as it is
(the trial's edit applied): the context scorers read (`scorers.base.ScoringContext`). It
computes each thing once, when the first scorer asks for it:

- replies to the harmful / harmless prompts (the generation engine, `generation.py`; a reply
  stops at a refusal marker when every scorer reading those replies decides by markers alone),
- per-prompt KL of the first reply token (one prompt pass per batch),
- per-token KL along the original's continuations (one teacher-forced pass per batch,
  `continuations.py`).

These are the seams for speed work: how each is computed can change without touching a scorer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional

from hctl_worker.continuations import (
    ForcedBatch,
    forced_batches,
    forced_logprobs,
    greedy_continuations,
    position_divergences,
)
from hctl_worker.errors import OutOfMemoryError
from hctl_worker.generation import (
    EncodedBatch,
    GenerationStats,
    SharedPrefix,
    encode_texts,
    first_token_logits,
    generate,
)
from hctl_worker.model import free_memory, is_out_of_memory
from hctl_worker.scorers.base import PromptSet, TokenDivergences

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

# The shared prefix is used only if it changes the first-token distribution by less than this
# KL (nats) on the unmodified model: rounding differences, never a different computation.
PREFIX_TOLERANCE = 1e-4
PREFIX_TOLERANCE_16_BIT = 2e-3


@dataclass(frozen=True)
class EvaluationPrompts:
    """One evaluation prompt set: the user's words and their chat-templated texts."""

    prompts: list[str]
    texts: list[str]


def kl_divergence(current_logprobs: torch.Tensor, base_logprobs: torch.Tensor) -> float:
    """Mean over prompts of KL(base ‖ current) from log-probabilities (heretic's batchmean)."""
    return float(
        functional.kl_div(
            current_logprobs.float(), base_logprobs.float(), reduction="batchmean", log_target=True
        )
    )


class Evaluator:
    """Measures the model as it is now against the unmodified model measured at construction."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        harmless: EvaluationPrompts,
        harmful: EvaluationPrompts,
        max_response_length: int,
        batch_size: int,
        harmless_response_length: int | None = None,
        continuation_tokens: int = 0,
        stop_markers: Mapping[PromptSet, tuple[str, ...] | None] | None = None,
        share_prefix: bool = True,
    ) -> None:
        if not harmless.texts or not harmful.texts:
            raise ValueError("the evaluator needs harmless and harmful prompts")
        self.loaded = loaded
        self.prompts: dict[PromptSet, EvaluationPrompts] = {
            "harmful": harmful,
            "harmless": harmless,
        }
        self.reply_lengths: dict[PromptSet, int] = {
            "harmful": int(max_response_length),
            "harmless": int(harmless_response_length or max_response_length),
        }
        self.stop_markers = dict(stop_markers or {})
        self.batch_size = max(1, int(batch_size))
        self.stats = GenerationStats()
        self._batches: dict[PromptSet, list[EncodedBatch]] = {
            name: encode_texts(loaded, prompts.texts, self.batch_size)
            for name, prompts in self.prompts.items()
        }
        self._prefix = self._checked_prefix() if share_prefix else None
        self.base_logprobs = self._first_token_logprobs()
        self._forced: list[ForcedBatch] = []
        self._base_forced: list[torch.Tensor] = []
        if continuation_tokens > 0:
            self._measure_continuations(continuation_tokens)

    def _checked_prefix(self) -> SharedPrefix | None:
        """The prompts' shared prefix, if reusing its keys and values gives this model's own
        results (compared on the first harmless batch); None otherwise."""
        texts = self.prompts["harmless"].texts + self.prompts["harmful"].texts
        prefix = SharedPrefix.find(self.loaded, texts)
        if prefix is None:
            return None
        try:
            prefix.refresh(self.loaded.model)
            if not prefix.supported():
                return None
            with torch.inference_mode():
                batch = self._batches["harmless"][0]
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

    def _measure_continuations(self, tokens: int) -> None:
        """The original's greedy continuations of the harmless prompts and its distributions
        along them (kept on the CPU: they can be large)."""
        batches = self._batches["harmless"]
        pad = self.loaded.tokenizer.pad_token_id or 0
        with _translated_out_of_memory():
            continuations = greedy_continuations(self.loaded, batches, tokens)
            self._forced = forced_batches(batches, continuations, pad)
            with torch.inference_mode():
                self._base_forced = [
                    forced_logprobs(self.loaded, batch).cpu() for batch in self._forced
                ]

    @property
    def shares_prefix(self) -> int:
        """How many prompt tokens each prefill skips (0 when the prefix is not shared)."""
        return self._prefix.length if self._prefix is not None else 0

    @property
    def continuation_tokens(self) -> int:
        """Tokens of the original's continuations scored (0 when none were measured)."""
        return int(sum(int(batch.lengths.sum()) for batch in self._forced))

    def evaluate(self) -> TrialEvaluation:
        """The context for scoring the model as it is now (call it with the trial's edit on):
        the shared prefix's keys and values are computed here, for this state of the model."""
        if self._prefix is not None:
            with _translated_out_of_memory():
                self._prefix.refresh(self.loaded.model)
        return TrialEvaluation(self)

    # -- what a trial's evaluation computes, each once -----------------------------------------

    def replies(self, prompt_set: PromptSet) -> list[str]:
        """Greedy replies to one prompt set, in its order."""
        with _translated_out_of_memory():
            return generate(
                self.loaded,
                self._batches[prompt_set],
                self.reply_lengths[prompt_set],
                self.stop_markers.get(prompt_set),
                self.stats,
                prefix=self._prefix,
            )

    def _first_token_logprobs(self) -> torch.Tensor:
        pieces = []
        with torch.inference_mode(), _translated_out_of_memory():
            for batch in self._batches["harmless"]:
                logits = first_token_logits(self.loaded, batch, self._prefix)
                pieces.append(functional.log_softmax(logits, dim=-1))
        # Rows come back in length order; the reference has the same order, so the permutation
        # never needs undoing.
        return torch.cat(pieces, dim=0)

    def first_token_divergences(self) -> torch.Tensor:
        """Per harmless prompt (in batch order): KL(original ‖ now) of the first token."""
        current = self._first_token_logprobs()
        return position_divergences(current, self.base_logprobs.to(current.device)).cpu()

    def continuation_divergences(self) -> TokenDivergences:
        """Per harmless prompt (in batch order) and continuation position: KL(original ‖ now)."""
        if not self._forced:
            raise ValueError("no continuations were measured (continuation_tokens = 0)")
        width = max(batch.positions for batch in self._forced)
        values, masks = [], []
        with torch.inference_mode(), _translated_out_of_memory():
            for batch, original in zip(self._forced, self._base_forced, strict=True):
                current = forced_logprobs(self.loaded, batch)
                divergence = position_divergences(current, original.to(current.device)).cpu()
                missing = width - batch.positions  # shorter batches: pad on the left
                values.append(functional.pad(divergence, (missing, 0)))
                masks.append(functional.pad(batch.mask(), (missing, 0)))
        return TokenDivergences(torch.cat(values, dim=0), torch.cat(masks, dim=0))

    def responses(self, texts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy replies (no early stop), in the order given: for chat and debugging."""
        with _translated_out_of_memory():
            return generate(
                self.loaded, encode_texts(self.loaded, texts, self.batch_size), max_new_tokens
            )


class TrialEvaluation:
    """The model as it is in one trial, as scorers see it: each measurement made once."""

    def __init__(self, evaluator: Evaluator) -> None:
        self._evaluator = evaluator
        self.harmful_prompts = evaluator.prompts["harmful"].prompts
        self.harmless_prompts = evaluator.prompts["harmless"].prompts
        self._replies: dict[PromptSet, list[str]] = {}
        self._first_token: torch.Tensor | None = None
        self._continuation: TokenDivergences | None = None

    def harmful_replies(self) -> list[str]:
        if "harmful" not in self._replies:
            self._replies["harmful"] = self._evaluator.replies("harmful")
        return self._replies["harmful"]

    def harmless_replies(self) -> list[str]:
        if "harmless" not in self._replies:
            self._replies["harmless"] = self._evaluator.replies("harmless")
        return self._replies["harmless"]

    def first_token_divergences(self) -> torch.Tensor:
        if self._first_token is None:
            self._first_token = self._evaluator.first_token_divergences()
        return self._first_token

    def continuation_divergences(self) -> TokenDivergences:
        if self._continuation is None:
            self._continuation = self._evaluator.continuation_divergences()
        return self._continuation


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


__all__ = ["EvaluationPrompts", "Evaluator", "TrialEvaluation", "kl_divergence"]
