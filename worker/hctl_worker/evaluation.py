"""Measuring the model as it is now, for the scorers: replies, and divergences from the original.

`Evaluator` is built once per job, on the unmodified model: it batches the evaluation prompts
into prompt sets that reuse what the unmodified model computes (`reuse.py`: the shared
prefix, the layers below an edit, draft replies), and measures the original's references (the
first-token distributions and, when a scorer needs them, the greedy continuations and their
distributions). `Evaluator.evaluate()` then gives a `TrialEvaluation` for the model as it is
(the trial's edit applied): the context scorers read (`scorers.base.ScoringContext`). It
computes each thing once, when the first scorer asks for it:

- replies to the harmful / harmless prompts (the generation engine, `generation.py`; a reply
  stops at a refusal marker when every scorer reading those replies decides by markers alone,
  and the harmful replies stop altogether once the trial can no longer matter, `pruning.py`),
- per-prompt KL of the first reply token (one prompt pass per batch),
- per-token KL along the original's continuations (one teacher-forced pass per batch,
  `continuations.py`).

These are the seams for speed work: how each is computed can change without touching a scorer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
from hctl_worker.first_pass import pad_id
from hctl_worker.generation import (
    GenerationStats,
    Lane,
    Select,
    Verdicts,
    encode_texts,
    generate,
)
from hctl_worker.model_errors import free_memory, is_out_of_memory
from hctl_worker.prompt_set import PromptSet
from hctl_worker.reuse import Reuse, ReuseOptions
from hctl_worker.scorers.base import PromptSetName, TokenDivergences

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel
    from hctl_worker.scorers import Scoring

BOTH: tuple[PromptSetName, ...] = ("harmful", "harmless")


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
    """Measures the model as it is now against the unmodified model measured at construction.

    `answered` names the prompt sets whose replies trials read; their first passes carry draft
    replies. `reuse` and `unchanged_layers` are the shortcuts of `reuse.py`; none of them changes
    a measurement.
    """

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
        stop_markers: Mapping[PromptSetName, tuple[str, ...] | None] | None = None,
        answered: Collection[PromptSetName] = BOTH,
        reuse: ReuseOptions = ReuseOptions(),
        unchanged_layers: Callable[[], int] | None = None,
    ) -> None:
        if not harmless.texts or not harmful.texts:
            raise ValueError("the evaluator needs harmless and harmful prompts")
        self.loaded = loaded
        self.prompts: dict[PromptSetName, EvaluationPrompts] = {
            "harmful": harmful,
            "harmless": harmless,
        }
        self.reply_lengths: dict[PromptSetName, int] = {
            "harmful": int(max_response_length),
            "harmless": int(harmless_response_length or max_response_length),
        }
        self.stop_markers = dict(stop_markers or {})
        self.batch_size = max(1, int(batch_size))
        self.answered = frozenset(answered)
        self.stats = GenerationStats()
        self.seconds: dict[str, float] = {}  # per measurement, summed (for benchmarks)
        self.reuse = Reuse(
            loaded, harmless.texts + harmful.texts, reuse, unchanged_layers=unchanged_layers
        )
        self._sets = {
            name: PromptSet(
                self.reuse,
                self.prompts[name].texts,
                self.batch_size,
                draft_first_pass=name in answered,
            )
            for name in BOTH
        }
        self._forced: list[ForcedBatch] = []
        self._base_forced: list[torch.Tensor] = []
        with _translated_out_of_memory():
            self.reuse.check_prefix(self._sets["harmless"].batches[0])
            if self.reuse.use_drafts:
                # The unmodified model's whole greedy replies: the drafts of every trial's.
                for name in answered:
                    self._sets[name].replies(self.reply_lengths[name], None, self.stats)
            self.reuse.prepare(list(self._sets.values()))
            # The KL references, computed the way a trial's logits are: from the prompts, and
            # where a trial's KL pass may carry the replies' drafts, from that pass too (the
            # same numbers but for rounding; the same shapes give exactly the same numbers).
            self.base_logprobs = self._first_token_logprobs()
            self._base_drafted: torch.Tensor | None = None
            if "harmless" in self.answered:
                drafted = self._first_token_logprobs(keep_for_replies=True, draft=True)
                if any(self._sets["harmless"].drafted_batches):
                    self._base_drafted = drafted
                self._sets["harmless"].forget_started()
        if continuation_tokens > 0:
            self._measure_continuations(continuation_tokens)

    @classmethod
    def for_scoring(
        cls,
        loaded: LoadedModel,
        scoring: Scoring,
        *,
        harmless: EvaluationPrompts,
        harmful: EvaluationPrompts,
        max_response_length: int,
        batch_size: int,
        kl_tokens: int = 16,
        **options: Any,
    ) -> Evaluator:
        """An evaluator that measures what the job's scorers read: continuations only when a
        scorer reads them, replies that stop at markers only where every scorer reading them
        decides by markers, drafts for the sets that are answered."""
        return cls(
            loaded,
            harmless=harmless,
            harmful=harmful,
            max_response_length=max_response_length,
            batch_size=batch_size,
            continuation_tokens=kl_tokens if "continuation" in scoring.reads else 0,
            stop_markers={name: scoring.stop_markers(name) for name in BOTH},
            answered=[name for name in BOTH if f"{name}_replies" in scoring.reads],
            **options,
        )

    def _measure_continuations(self, tokens: int) -> None:
        """The original's greedy continuations of the harmless prompts and its distributions
        along them (kept on the CPU: they can be large)."""
        batches = self._sets["harmless"].batches
        pad = pad_id(self.loaded)
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
        return self.reuse.prefix.length if self.reuse.prefix is not None else 0

    def draft_choices(self) -> dict[PromptSetName, str]:
        """How each answered set's generations ran (drafted or plain), for logs and benchmarks."""
        return {
            name: prompt_set.policy.describe()
            for name, prompt_set in self._sets.items()
            if prompt_set.drafts is not None and prompt_set.policy.drafted + prompt_set.policy.plain
        }

    @property
    def continuation_tokens(self) -> int:
        """Tokens of the original's continuations scored (0 when none were measured)."""
        return int(sum(int(batch.lengths.sum()) for batch in self._forced))

    def evaluate(self) -> TrialEvaluation:
        """The context for scoring the model as it is now (call it with the trial's edit on)."""
        self.edit_changed()
        return TrialEvaluation(self)

    def edit_changed(self) -> None:
        """The model's edit changed: forget what was kept under the last one."""
        for prompt_set in self._sets.values():
            prompt_set.forget_started()  # passes kept under an earlier edit
        self.reuse.new_edit()

    def lane(self, prompt_set: PromptSetName, verdicts: Verdicts | None = None) -> Lane:
        """The model's current trial's part in replies shared with other trials."""
        return self._sets[prompt_set].lane(verdicts)

    def replies_together(
        self, prompt_set: PromptSetName, lanes: Sequence[Lane], select: Select
    ) -> list[list[str]]:
        """Greedy replies to one prompt set for trials applied together, one lane each (see
        `replies`; each lane's verdicts stop that lane alone)."""
        with self._timed(f"{prompt_set}_replies"), _translated_out_of_memory():
            return self._sets[prompt_set].replies_together(
                lanes,
                self.reply_lengths[prompt_set],
                select,
                self.stop_markers.get(prompt_set),
                self.stats,
            )

    # -- what a trial's evaluation computes, each once -----------------------------------------

    @contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - started

    def replies(self, prompt_set: PromptSetName, verdicts: Verdicts | None = None) -> list[str]:
        """Greedy replies to one prompt set, in its order; with `verdicts`, generation stops
        once its limit of (marker) refusals is reached."""
        with self._timed(f"{prompt_set}_replies"), _translated_out_of_memory():
            return self._sets[prompt_set].replies(
                self.reply_lengths[prompt_set],
                self.stop_markers.get(prompt_set),
                self.stats,
                verdicts,
            )

    def _first_token_logprobs(
        self, keep_for_replies: bool = False, draft: bool | None = None
    ) -> torch.Tensor:
        """[harmless prompts, vocabulary], in batch order (the reference has the same order, so
        the permutation never needs undoing)."""
        with _translated_out_of_memory():
            logits = self._sets["harmless"].first_token_logits(keep_for_replies, draft)
        return functional.log_softmax(logits, dim=-1)

    def _reference(self) -> torch.Tensor:
        """The unmodified model's first-token log-probabilities, each batch from a pass shaped
        like the one its current logits came from."""
        harmless = self._sets["harmless"]
        if self._base_drafted is None or not any(harmless.drafted_batches):
            return self.base_logprobs
        pieces, row = [], 0
        for batch, drafted in zip(harmless.batches, harmless.drafted_batches, strict=True):
            source = self._base_drafted if drafted else self.base_logprobs
            pieces.append(source[row : row + len(batch.indices)])
            row += len(batch.indices)
        return torch.cat(pieces, dim=0)

    def first_token_divergences(self, keep_for_replies: bool = False) -> torch.Tensor:
        """Per harmless prompt (in batch order): KL(original ‖ now) of the first token. With
        `keep_for_replies` (and the harmless replies answered), the passes are kept as the
        first passes of the harmless replies under the same edit."""
        keep = keep_for_replies and "harmless" in self.answered
        with self._timed("first_token_kl"):
            current = self._first_token_logprobs(keep)
        return position_divergences(current, self._reference().to(current.device)).cpu()

    def continuation_divergences(self) -> TokenDivergences:
        """Per harmless prompt (in batch order) and continuation position: KL(original ‖ now)."""
        if not self._forced:
            raise ValueError("no continuations were measured (continuation_tokens = 0)")
        width = max(batch.positions for batch in self._forced)
        values, masks = [], []
        with self._timed("multi_token_kl"), torch.inference_mode(), _translated_out_of_memory():
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
    """The model as it is in one trial, as scorers see it: each measurement made once.

    `limit_refusals(n)` (set by the job's `Scoring` before any reply is read) stops the harmful
    replies once `n` of them are refusals: the trial is then `pruned`, and `refusals_so_far` is
    the count that stopped it (a lower bound).
    """

    def __init__(self, evaluator: Evaluator) -> None:
        self._evaluator = evaluator
        self.harmful_prompts = evaluator.prompts["harmful"].prompts
        self.harmless_prompts = evaluator.prompts["harmless"].prompts
        self._replies: dict[PromptSetName, list[str]] = {}
        self._first_token: torch.Tensor | None = None
        self._continuation: TokenDivergences | None = None
        self._refusal_limit: int | None = None
        self.pruned = False
        self.refusals_so_far: int | None = None

    def limit_refusals(self, limit: int | None) -> None:
        self._refusal_limit = limit

    def harmful_verdicts(self) -> Verdicts | None:
        """What counts the harmful replies' refusals against the limit (None: no limit)."""
        limit = self._refusal_limit
        return Verdicts(limit=limit) if limit is not None else None

    def keep_replies(
        self, prompt_set: PromptSetName, replies: list[str], verdicts: Verdicts | None = None
    ) -> None:
        """The replies to a prompt set, made for this trial elsewhere (with other trials')."""
        self._replies[prompt_set] = replies
        if verdicts is not None and verdicts.stopped:
            self.pruned, self.refusals_so_far = True, verdicts.refusals

    def harmful_replies(self) -> list[str]:
        if "harmful" not in self._replies:
            verdicts = self.harmful_verdicts()
            self.keep_replies("harmful", self._evaluator.replies("harmful", verdicts), verdicts)
        return self._replies["harmful"]

    def harmless_replies(self) -> list[str]:
        if "harmless" not in self._replies:
            self._replies["harmless"] = self._evaluator.replies("harmless")
        return self._replies["harmless"]

    def first_token_divergences(self) -> torch.Tensor:
        if self._first_token is None:
            self._first_token = self._evaluator.first_token_divergences(keep_for_replies=True)
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
