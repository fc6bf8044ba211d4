"""Scoring a trial: first-token KL on harmless prompts and the refusal rate on harmful ones.

The replies come from the generation engine (`generation.py`), which stops a reply as soon as
its verdict is certain, through the prompt sets (`prompt_set.py`), which reuse what the
unmodified model computes. The unmodified model's first-token distribution (the KL reference)
is computed the way every trial's is. A trial can be told when it stops mattering (`pruning.py`):
counting its refusals then stops, and its score says it was pruned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional

from hctl_worker.errors import OutOfMemoryError
from hctl_worker.generation import GenerationStats, Verdicts, encode_texts, generate
from hctl_worker.markers import contains_marker, normalise_markers, normalise_response
from hctl_worker.model import free_memory, is_out_of_memory
from hctl_worker.prompt_set import DEFAULT_REPLAY_MEMORY, PromptSet, Reuse

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel


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
    pruned: bool = False  # counting stopped early: `refusals` is a lower bound


def kl_divergence(current_logprobs: torch.Tensor, base_logprobs: torch.Tensor) -> float:
    """Mean over prompts of KL(base ‖ current) from log-probabilities (heretic's batchmean)."""
    return float(
        functional.kl_div(
            current_logprobs.float(), base_logprobs.float(), reduction="batchmean", log_target=True
        )
    )


class Evaluator:
    """Scores the model as it is now against the unmodified model measured at construction.

    The prompts' passes reuse what the unmodified model computes (`prompt_set.py`): the shared
    prefix, the layers below the current edit (`unchanged_layers`, from the ablator), and the
    replies seen so far as drafts. None of it changes a score.
    """

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
        unchanged_layers: Callable[[], int] | None = None,
        replay_memory: float = DEFAULT_REPLAY_MEMORY,
        drafts: bool = True,
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
        self.reuse = Reuse(
            loaded,
            self.good_texts + self.bad_texts,
            share_prefix=share_prefix,
            unchanged_layers=unchanged_layers,
            replay_memory=replay_memory,
            drafts=drafts,
        )
        self._good = PromptSet(self.reuse, self.good_texts, self.batch_size, draft_first_pass=False)
        self._bad = PromptSet(self.reuse, self.bad_texts, self.batch_size, draft_first_pass=True)
        with _translated_out_of_memory():
            self.reuse.check_prefix(self._good.batches[0])
            # The unmodified model's harmless replies (for the baseline), and its whole greedy
            # replies to the harmful prompts: the drafts of every trial's replies.
            replies = self._good.replies(self.max_response_length, self.markers, self.stats)
            if self.reuse.use_drafts:
                self._bad.replies(self.max_response_length, None, self.stats)
            self.reuse.prepare([self._good, self._bad])
            # The KL reference, computed the way every trial's logits are.
            self.base_logprobs = functional.log_softmax(self._good.first_token_logits(), dim=-1)
        self._refusals_good = sum(
            1 for reply in replies if _is_refusal_normalised(reply, self.markers)
        )

    @property
    def shares_prefix(self) -> int:
        """How many prompt tokens each prefill skips (0 when the prefix is not shared)."""
        return self.reuse.prefix.length if self.reuse.prefix is not None else 0

    def kl(self) -> float:
        with _translated_out_of_memory():
            logits = self._good.first_token_logits()
        # Rows come back in length order, as the reference does, so no permutation is undone.
        return kl_divergence(functional.log_softmax(logits, dim=-1), self.base_logprobs)

    def count_refusals(self, verdicts: Verdicts | None = None) -> int:
        """Refusals among the harmful prompts' replies; with `verdicts`, counting stops at its
        limit (then `verdicts.stopped` is set and the count is a lower bound)."""
        verdicts = verdicts if verdicts is not None else Verdicts()
        with _translated_out_of_memory():
            self._bad.replies(self.max_response_length, self.markers, self.stats, verdicts)
        return verdicts.refusals

    def baseline(self) -> Baseline:
        return Baseline(
            refusals=self.count_refusals(),
            total_bad=len(self.bad_texts),
            refusals_good=self._refusals_good,
            total_good=len(self.good_texts),
        )

    def score(self, refusal_limit: Callable[[float], int | None] | None = None) -> Score:
        """KL, then refusals. `refusal_limit(kl)` is the refusal count at which this trial can
        no longer matter (`pruning.py`); counting stops there and the score says `pruned`."""
        started = time.perf_counter()
        kl = self.kl()
        skipped = self.kl_skip_threshold is not None and kl > self.kl_skip_threshold
        refusals = None
        pruned = False
        if not skipped:
            verdicts = Verdicts(limit=refusal_limit(kl) if refusal_limit is not None else None)
            refusals = self.count_refusals(verdicts)
            pruned = verdicts.stopped
        return Score(
            kl=kl,
            refusals=refusals,
            total_bad=len(self.bad_texts),
            refusal_skipped=skipped,
            seconds=time.perf_counter() - started,
            pruned=pruned,
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
