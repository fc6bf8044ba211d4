"""A set of prompts asked in every trial, batched once, with the two calls the evaluation makes:
first-token logits under the current edit, and replies (with early stop) under the current edit.
What every trial reuses of them is `reuse.py`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from hctl_worker.draft_policy import DraftPolicy
from hctl_worker.drafts import DraftStore
from hctl_worker.encoding import encode_texts
from hctl_worker.first_pass import StartedBatch, first_token_logits, start_batch
from hctl_worker.generation import (
    GenerationStats,
    Lane,
    Select,
    Verdicts,
    generate,
    generate_together,
)
from hctl_worker.reuse import Reuse


class PromptSet:
    """One set of prompts asked in every trial, batched once."""

    def __init__(
        self, reuse: Reuse, texts: Sequence[str], batch_size: int, *, draft_first_pass: bool
    ) -> None:
        self.reuse = reuse
        # Whether the first pass carries each prompt's most frequent reply as a draft (for sets
        # that are answered; a set only read for its first-token logits would pay for nothing).
        self.draft_first_pass = draft_first_pass
        self.texts = list(texts)
        self.batches = encode_texts(reuse.loaded, self.texts, batch_size)
        # Replies seen so far to these prompts (indices into `texts`), as drafts, and whether
        # drafting pays (measured once the first passes carry drafts).
        self.drafts = DraftStore() if reuse.use_drafts else None
        self.policy = DraftPolicy(reuse.pass_cost)
        # Batches whose first pass ran for the KL under the current edit, for its replies.
        self._started: dict[int, StartedBatch] = {}
        self.drafted_batches: list[bool] = []

    def forget_started(self) -> None:
        """Drop the kept first passes (the edit is about to change)."""
        self._started.clear()

    def first_token_logits(
        self, keep_for_replies: bool = False, draft: bool | None = None
    ) -> torch.Tensor:
        """Next-token logits after each prompt under the current edit, [prompts, vocab], float32,
        in batch order (prompts sorted by length). With `keep_for_replies`, the passes are the
        replies' first passes (with their drafts when the set drafts; `draft=True` makes it),
        kept within the memory budget for the replies of the same edit, which then start from
        them. `drafted_batches` says afterwards which batches' passes carried drafts."""
        self.forget_started()
        budget = self.reuse.keep_budget() if keep_for_replies else 0
        policy = None if draft else self._policy()
        context = self.reuse.context(self.drafts if budget else None, policy if budget else None)
        pieces, kept = [], 0
        self.drafted_batches = []
        with torch.inference_mode():
            for batch in self.batches:
                if kept >= budget:
                    pieces.append(first_token_logits(self.reuse.loaded, batch, context=context))
                    self.drafted_batches.append(False)
                    continue
                started = start_batch(self.reuse.loaded, batch, context)
                pieces.append(started.first_logits)
                self.drafted_batches.append(started.first.draft_width > 0)
                self._started[id(batch)] = started
                kept += started.cache_bytes()
        return torch.cat(pieces, dim=0)

    def _policy(self) -> DraftPolicy | None:
        """The draft policy, once the first passes carry drafts (prepared), for edited models:
        the unmodified model's replies are the drafts themselves, which says nothing about
        how a trial's replies will go (it drafts, and teaches the policy nothing)."""
        prepared = self.drafts is not None and self.reuse.first_passes
        edited = self.reuse.unchanged_layers() < len(self.reuse.layers)
        return self.policy if prepared and edited else None

    def replies(
        self,
        max_new_tokens: int,
        markers: tuple[str, ...] | None = None,
        stats: GenerationStats | None = None,
        verdicts: Verdicts | None = None,
        first_logits: list[torch.Tensor] | None = None,
    ) -> list[str]:
        """Greedy replies under the current edit, in the texts' order; with `markers` a reply
        stops once it is certainly a refusal, with `verdicts` the whole set stops at its limit."""
        policy = self._policy()
        context = self.reuse.context(self.drafts, policy)
        started, self._started = self._started, {}
        replies = generate(
            self.reuse.loaded,
            self.batches,
            max_new_tokens,
            markers,
            stats,
            first_logits,
            context=context,
            verdicts=verdicts,
            started=started,
        )
        return replies

    def lane(self, verdicts: Verdicts | None = None) -> Lane:
        """This set's part in a generation shared with other trials (`replies_together`), for the
        trial the model runs now: the context of its passes (with the shared prefix as it is
        refreshed now, kept) and its verdicts. It does not draft: sharing the decode steps cuts
        the passes instead, exactly (a drafted token costs its compute when it is rejected)."""
        context = self.reuse.context(self.drafts, self._policy())
        prefix = context.prefix.kept() if context.prefix is not None else None
        return Lane(dataclasses.replace(context, prefix=prefix, no_drafts=True), verdicts)

    def replies_together(
        self,
        lanes: Sequence[Lane],
        max_new_tokens: int,
        select: Select,
        markers: tuple[str, ...] | None = None,
        stats: GenerationStats | None = None,
    ) -> list[list[str]]:
        """Each lane's greedy replies (see `replies`), the lanes sharing every decode step;
        `select` gives a pass's rows their lane's edit."""
        self.forget_started()
        return generate_together(
            self.reuse.loaded, lanes, self.batches, max_new_tokens, markers, stats, select
        )

    def draft_tokens(self) -> dict[int, list[int]]:
        """The most frequent reply seen so far to each prompt (for the first passes' drafts)."""
        store = self.drafts
        if store is None:
            return {}
        return {
            index: store.draft(index, [], 1 << 30)
            for batch in self.batches
            for index in batch.indices
        }


__all__ = ["PromptSet"]
