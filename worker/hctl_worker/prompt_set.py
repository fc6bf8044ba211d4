"""Prompt sets asked in every trial, and what every trial can reuse of them.

The evaluator asks the same prompts in every trial: the harmless ones for KL, the harmful ones for
refusals. `Reuse` prepares, once, on the unmodified model, what no trial changes:

- the prefix all prompts share (`prefix.py`), checked to give the model's own numbers;
- the unmodified model's greedy reply to each prompt that is generated, which becomes the draft
  of every trial's reply (`drafts.py`), and the replies of earlier trials, added as they come;
- each batch's first pass (prompt + draft), recorded layer by layer within a memory budget
  (`replay.py`), so a trial starts computing at its first edited layer. A replayed pass is
  compared with a plain one before it is relied on.

`PromptSet` is one set of prompts with the two calls the evaluation makes: first-token logits
under the current edit, and replies (with early stop) under the current edit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional

from hctl_worker.architecture import find_layers
from hctl_worker.draft_policy import DraftPolicy, PassCost
from hctl_worker.drafts import DraftStore
from hctl_worker.encoding import (
    EncodedBatch,
    cache_option,
    encode_texts,
    forward_options,
    new_cache,
    returned_cache,
)
from hctl_worker.first_pass import Context, FirstPass, StartedBatch, start_batch, start_cache
from hctl_worker.generation import GenerationStats, Verdicts, first_token_logits, generate
from hctl_worker.model import is_out_of_memory
from hctl_worker.prefix import SharedPrefix
from hctl_worker.replay import DepthPlan, plan_depth, record, replayable
from hctl_worker.static_decode import DecodeMode, StaticDecoder

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

# A shortcut (shared prefix, replayed layers) is used only if it changes the first-token
# distribution by less than this KL (nats) on the unmodified model: rounding differences, never
# a different computation. 16-bit kernels round differently for other shapes.
TOLERANCE = 1e-4
TOLERANCE_16_BIT = 2e-3

# What the recordings may hold, as a fraction of the model's own size, but at least
# MINIMUM_REPLAY_BYTES (small models' recordings are small whatever the fraction).
DEFAULT_REPLAY_MEMORY = 0.25
MINIMUM_REPLAY_BYTES = 64 * 2**20

# How many draft columns the check of a replay compares (with the prompts' last column).
CHECKED_DRAFT_COLUMNS = 4

# How many logits `_agree` turns into float32 log-probabilities at once (16 MB).
AGREEMENT_CHUNK_ELEMENTS = 4 * 2**20


def _agree(loaded: LoadedModel, plain: torch.Tensor, other: torch.Tensor) -> bool:
    """Two passes' logits ([rows, vocabulary]) give the same distributions, but for rounding.
    Compared a few rows at a time: a float32 copy of all rows can be larger than the model's
    activations (17 draft positions x 64 prompts x 150k tokens is 650 MB)."""
    exact = loaded.dtype == torch.float32
    rows = plain.shape[0]
    step = max(1, AGREEMENT_CHUNK_ELEMENTS // max(1, plain.shape[-1]))
    matching, divergence = 0, 0.0
    for start in range(0, rows, step):
        plain_lp = functional.log_softmax(plain[start : start + step].float(), dim=-1)
        other_lp = functional.log_softmax(other[start : start + step].float(), dim=-1)
        matching += int((plain_lp.argmax(dim=-1) == other_lp.argmax(dim=-1)).sum())
        divergence += float(functional.kl_div(other_lp, plain_lp, reduction="sum", log_target=True))
    tolerance = TOLERANCE if exact else TOLERANCE_16_BIT
    agreement = matching / max(1, rows)
    return agreement >= (1.0 if exact else 0.9) and divergence / max(1, rows) <= tolerance


class Reuse:
    """What every trial reuses: the shared prefix, first passes recorded below the edits, drafts.

    `unchanged_layers()` says how many leading layers the model's current edit leaves as they
    were (the ablator knows); 0 means replay nothing.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        texts: Sequence[str],
        *,
        share_prefix: bool = True,
        unchanged_layers: Callable[[], int] | None = None,
        replay_memory: float = DEFAULT_REPLAY_MEMORY,
        drafts: bool = True,
        decode_graphs: DecodeMode = "off",
    ) -> None:
        self.loaded = loaded
        self.layers = find_layers(loaded.model)
        # Drafts and replays write columns into the cache that later masks hide or fill; only a
        # plain key/value cache keeps nothing else (a convolution or recurrent state would be
        # changed by a rejected draft token for good).
        plain_cache = self.plain_cache = self._plain_cache()
        self.decoder = StaticDecoder.for_model(loaded, decode_graphs, plain_cache)
        # A graphed pass of one token per row costs little: drafts would only add tokens.
        self.use_drafts = drafts and plain_cache and not self.decoder.graphs
        if not plain_cache:
            replay_memory = 0
        self.unchanged_layers = unchanged_layers or (lambda: 0)
        self.replay_memory = replay_memory
        self.prefix = SharedPrefix.find(loaded, texts) if share_prefix else None
        self.plan = DepthPlan(0, ())
        self.first_passes: dict[int, FirstPass] = {}
        self.pass_cost = PassCost()  # what a forward pass costs here, for the draft policies

    def _plain_cache(self) -> bool:
        model = self.loaded.model
        token = torch.zeros((1, 1), dtype=torch.long, device=self.loaded.input_device)
        cache = new_cache(model)
        try:
            with torch.inference_mode():
                outputs = model(
                    input_ids=token,
                    attention_mask=torch.ones_like(token),
                    use_cache=True,
                    **cache_option(model, cache),
                    **forward_options(model),
                )
        except Exception as error:
            if is_out_of_memory(error):
                raise
            return False
        return replayable(returned_cache(outputs, cache))

    def check_prefix(self, batch: EncodedBatch) -> None:
        """Keep the shared prefix only if it gives this model's own first-token logits."""
        if self.prefix is None:
            return
        try:
            self.prefix.refresh(self.loaded.model)
            if not self.prefix.supported():
                self.prefix = None
                return
            with torch.inference_mode():
                plain = first_token_logits(self.loaded, batch)
                shared = first_token_logits(self.loaded, batch, self.prefix)
        except Exception as error:
            if is_out_of_memory(error):
                raise
            self.prefix = None
            return
        if not _agree(self.loaded, plain, shared):
            self.prefix = None

    def context(
        self, drafts: DraftStore | None = None, policy: DraftPolicy | None = None
    ) -> Context:
        """The context of a pass under the model's current edit (refreshes the prefix)."""
        start = self.plan.start_for(self.unchanged_layers()) if self.plan.enabled else 0
        if self.prefix is not None:
            self.prefix.refresh(self.loaded.model, self.layers, start)
        return Context(
            prefix=self.prefix,
            layers=self.layers,
            start=start,
            drafts=drafts,
            first_passes=self.first_passes,
            policy=policy,
            cost=self.pass_cost if drafts is not None else None,
            decoder=self.decoder,
        )

    def prepare(self, sets: Sequence[PromptSet]) -> None:
        """Build each batch's first pass (with its rows' drafts where the set drafts its first
        pass) and record them all on the (unmodified) model within the memory budget; keep the
        recordings only if a replayed pass gives the model's own numbers."""
        pad = self.loaded.tokenizer.pad_token_id or 0
        batches = []
        for prompt_set in sets:
            drafts = prompt_set.draft_tokens() if prompt_set.draft_first_pass else {}
            for batch in prompt_set.batches:
                rows = [drafts.get(index, []) for index in batch.indices]
                self.first_passes[id(batch)] = FirstPass.build(batch, self.prefix, rows, pad)
                batches.append(batch)
        try:
            self._record(batches)
        except Exception as error:
            if is_out_of_memory(error):
                raise
            self._forget_recordings()

    def _record(self, batches: Sequence[EncodedBatch]) -> None:
        n_layers = len(self.layers)
        if self.replay_memory <= 0 or n_layers < 2 or not batches:
            return
        model = self.loaded.model
        passes = [self.first_passes[id(batch)] for batch in batches]
        every_layer = tuple(range(1, n_layers))
        with torch.inference_mode():
            probe = start_cache(model, self.prefix, len(passes[0].batch.indices))
            recording = record(
                self.layers,
                probe,
                lambda: passes[0].run(model, probe, logits=1),
                every_layer,
                n_layers - 1,
            )
            if not replayable(probe):
                return
            tokens = [first.input_ids.numel() for first in passes]
            scale = (sum(tokens) + (self.prefix.length if self.prefix else 0)) / tokens[0]
            key_value = (recording.keys[0].nbytes + recording.values[0].nbytes) * scale
            hidden = next(iter(recording.hidden.values())).nbytes * scale
            budget = self.memory_budget()
            plan = plan_depth(n_layers, int(key_value), int(hidden), budget)
            plan = DepthPlan(
                plan.recorded_layers, tuple(c for c in plan.checkpoints if c < n_layers)
            )
            if not plan.enabled:
                return
            recording.trim(plan)
            passes[0].recording = recording
            for first in passes[1:]:
                cache = start_cache(model, self.prefix, len(first.batch.indices))
                first.recording = record(
                    self.layers,
                    cache,
                    lambda first=first, cache=cache: first.run(model, cache, logits=1),
                    plan.checkpoints,
                    plan.recorded_layers,
                )
            if self.prefix is not None:
                self.prefix.record(model, self.layers, plan.checkpoints, plan.recorded_layers)
            self.plan = plan
            if not self._replay_agrees(passes[0]):
                self._forget_recordings()

    def _replay_agrees(self, first: FirstPass) -> bool:
        """A replay from the middle checkpoint gives the plain pass's logits: at the prompts'
        last tokens and the first few draft tokens (every column's logits, twice, can be more
        than the model: 100 columns x 32 prompts x 49k tokens is 630 MB in float32)."""
        first = first.with_drafts_cut(CHECKED_DRAFT_COLUMNS)
        start = self.plan.checkpoints[len(self.plan.checkpoints) // 2]
        model = self.loaded.model
        keep = first.draft_width + 1
        plain = first.run(model, start_cache(model, self.prefix, len(first.batch.indices)))
        if self.prefix is not None:
            self.prefix.refresh(model, self.layers, start)
        replayed = first.run(
            model, start_cache(model, self.prefix, len(first.batch.indices)), self.layers, start
        )
        if self.prefix is not None:
            self.prefix.refresh(model)
        return _agree(
            self.loaded,
            plain.logits[:, -keep:, :].flatten(0, 1),
            replayed.logits[:, -keep:, :].flatten(0, 1),
        )

    def _forget_recordings(self) -> None:
        self.plan = DepthPlan(0, ())
        for first in self.first_passes.values():
            first.forget_recording()
        if self.prefix is not None:
            self.prefix.recording = None

    def describe(self) -> str:
        """One log line: what trials reuse."""
        prefix = f"shared prefix {self.prefix.length} tokens" if self.prefix else "no shared prefix"
        if self.plan.enabled:
            spacing = (
                self.plan.checkpoints[1] - self.plan.checkpoints[0]
                if len(self.plan.checkpoints) > 1
                else 1
            )
            replay = (
                f"layers replayed below the first edited one (checkpoints every {spacing} up to "
                f"layer {self.plan.checkpoints[-1]}, {self.recorded_bytes() / 2**20:.0f} MiB)"
            )
        else:
            replay = "no layer replay"
        drafts = "draft replies" if self.use_drafts else "no draft replies"
        return f"reuse: {prefix}; {replay}; {drafts}; {self.decoder.describe()}"

    def keep_budget(self) -> int:
        """Bytes a trial may keep of its prompt passes for its replies (the replay budget; none
        for caches that are not plain keys and values, or with replay off)."""
        return self.memory_budget() if self.replay_memory > 0 and self.plain_cache else 0

    def memory_budget(self) -> int:
        """What the recordings may hold: `replay_memory` of the model's size, at least
        MINIMUM_REPLAY_BYTES."""
        model = self.loaded.model
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return int(max(self.replay_memory * model_bytes, MINIMUM_REPLAY_BYTES))

    def recorded_bytes(self) -> int:
        recordings = [first.recording for first in self.first_passes.values()]
        if self.prefix is not None:
            recordings.append(self.prefix.recording)
        return sum(recording.nbytes() for recording in recordings if recording is not None)


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
        if policy is not None:
            policy.finish(context.drafting, complete=verdicts is None or not verdicts.stopped)
        return replies

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


__all__ = ["DEFAULT_REPLAY_MEMORY", "PromptSet", "Reuse"]
