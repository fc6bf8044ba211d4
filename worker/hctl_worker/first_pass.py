"""A batch's first forward pass, and what a generation may reuse around it.

The first pass runs a batch's prompts (less the shared prefix) followed by a draft reply per row.
It is the same in every trial, so it can be recorded once on the unmodified model and replayed
below a trial's first edited layer (`replay.py`). `Context` gathers what one generation reuses:
the refreshed shared prefix, the replay's start layer, the first passes, and the draft store.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hctl_worker.draft_policy import DraftPolicy, PassCost
from hctl_worker.drafts import DraftStore
from hctl_worker.encoding import (
    EncodedBatch,
    cache_option,
    forward_options,
    new_cache,
    position_ids_for,
    returned_cache,
)
from hctl_worker.model_errors import is_out_of_memory
from hctl_worker.packing import Packing, plan_packing
from hctl_worker.prefix import SharedPrefix
from hctl_worker.refill import cache_bytes
from hctl_worker.replay import Recording, replaying
from hctl_worker.static_decode import StaticDecoder

if TYPE_CHECKING:
    from hctl_worker.head_screen import ArgmaxHead
    from hctl_worker.model import LoadedModel


@dataclass
class FirstPass:
    """A batch's first forward pass: its prompts (less the shared prefix) followed by a draft
    reply per row (padded to one width). Fixed across trials, so it can be recorded once on the
    unmodified model and replayed below a trial's first edited layer."""

    batch: EncodedBatch
    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # prefix columns included
    position_ids: torch.Tensor
    drafts: list[list[int]]
    recording: Recording | None = None
    # Run packed (no drafts), in the padded layout above; or, for a pass with drafts, the
    # prompts alone, packed (with a recording of its own).
    packing: Packing | None = None
    prompts_only: FirstPass | None = None
    _shortened: dict[int, FirstPass] = field(default_factory=dict, repr=False)

    @property
    def draft_width(self) -> int:
        return max((len(draft) for draft in self.drafts), default=0)

    @property
    def cache_rows(self) -> int:
        """Rows of the cache the pass starts from (a packed pass has fewer)."""
        return self.packing.rows if self.packing else len(self.batch.indices)

    @property
    def cells(self) -> int:
        """Token columns the pass computes, padding included."""
        return int(self.packing.input_ids.numel() if self.packing else self.input_ids.numel())

    def forget_recording(self) -> None:
        self.recording = None
        self._shortened.clear()  # the cut passes hold parts of it
        if self.prompts_only is not None:
            self.prompts_only.forget_recording()

    def with_drafts_cut(self, width: int) -> FirstPass:
        """The same pass with every draft cut to at most `width` tokens (0: the prompts alone,
        which is all a first-token measurement needs). The pass is causal, so the shorter pass
        computes exactly the columns it keeps, and its recording is the recording's first
        columns."""
        width = max(0, width)
        if width >= self.draft_width:
            return self
        if width == 0 and self.prompts_only is not None:
            return self.prompts_only
        if width not in self._shortened:
            columns = self.input_ids.shape[1] - self.draft_width + width
            cut = self.draft_width - width
            recording = self.recording.first_columns(columns) if self.recording else None
            self._shortened[width] = FirstPass(
                self.batch,
                self.input_ids[:, :columns],
                self.attention_mask[:, : self.attention_mask.shape[1] - cut],
                self.position_ids[:, :columns],
                [draft[:width] for draft in self.drafts],
                recording,
            )
        return self._shortened[width]

    @classmethod
    def build(
        cls,
        batch: EncodedBatch,
        prefix: SharedPrefix | None,
        drafts: Sequence[Sequence[int]] | None = None,
        pad_id: int = 0,
        attention_weight: float | None = None,
    ) -> FirstPass:
        """With `attention_weight` (see `packing.attention_weight`), the prompts are packed
        where that saves work."""
        rows, width = batch.input_ids.shape
        device = batch.input_ids.device
        drafts = [list(draft) for draft in drafts] if drafts else [[] for _ in range(rows)]
        if prefix is None:
            input_ids, attention_mask = batch.input_ids, batch.attention_mask
        else:
            # A left-padded row is padding + prefix + rest; without the prefix's columns it is
            # padding + rest, still left-padded, and the prefix moves in front of the padding.
            rest = width - prefix.length
            columns = torch.arange(rest, device=device)[None, :]
            padding = (batch.attention_mask == 0).sum(dim=1, keepdim=True)
            source = columns + prefix.length * (columns >= padding)
            input_ids = batch.input_ids.gather(1, source)
            rest_mask = batch.attention_mask.gather(1, source)
            attention_mask = torch.cat([rest_mask.new_ones((rows, prefix.length)), rest_mask], 1)
        packing = None
        if attention_weight is not None:
            rest = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1] :]
            length = prefix.length if prefix is not None else 0
            packing = plan_packing(input_ids, rest, length, pad_id, attention_weight)
        prompt_ids, prompt_mask = input_ids, attention_mask
        draft_width = max((len(draft) for draft in drafts), default=0)
        if draft_width:
            padded = torch.full((rows, draft_width), pad_id, dtype=torch.long)
            for row, draft in enumerate(drafts):
                padded[row, : len(draft)] = torch.tensor(draft, dtype=torch.long)
            input_ids = torch.cat([input_ids, padded.to(device)], dim=1)
            # Padding after a short draft is never kept (a draft is only short when it ended),
            # so it can stay visible here; it is masked once the pass is over.
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(padded.shape)], 1)
        positions = position_ids_for(attention_mask)[:, -input_ids.shape[1] :]
        if not draft_width:
            return cls(batch, input_ids, attention_mask, positions, drafts, packing=packing)
        prompts_only = None
        if packing is not None:
            prompt_positions = position_ids_for(prompt_mask)[:, -prompt_ids.shape[1] :]
            blank = [[] for _ in range(rows)]
            prompts_only = cls(
                batch, prompt_ids, prompt_mask, prompt_positions, blank, packing=packing
            )
        return cls(batch, input_ids, attention_mask, positions, drafts, prompts_only=prompts_only)

    def run(
        self,
        model,
        cache,
        layers: Sequence[torch.nn.Module] = (),
        start: int = 0,
        logits: int | None = None,
        packed_cache: bool = False,
    ):
        """The forward pass, starting at layer `start` when that is not 0, with the logits of
        the last `logits` columns (default: the prompt's last and every draft column's). A
        packed pass leaves the cache in the padded layout, unless `packed_cache` (to record
        it)."""
        replay = (
            replaying(layers, self.recording, start, cache)
            if start > 0 and self.recording is not None
            else nullcontext()
        )
        with replay:
            if self.packing is not None:
                return self.packing.run(model, cache, _dtype(model), regrid=not packed_cache)
            return model(
                input_ids=self.input_ids,
                attention_mask=self.attention_mask,
                position_ids=self.position_ids,
                use_cache=True,
                **cache_option(model, cache),
                **forward_options(model, logits or self.draft_width + 1),
            )


@dataclass
class Context:
    """What a generation may reuse: the shared prefix (already refreshed for the model as it is),
    the layers below `start` replayed from each first pass's recording, drafts (when `policy`
    says they pay; `cost` times the passes for it), how passes without drafts run, whether
    batches are refilled, and the output head's screen for decode steps."""

    prefix: SharedPrefix | None = None
    layers: Sequence[torch.nn.Module] = ()
    start: int = 0
    drafts: DraftStore | None = None
    first_passes: dict[int, FirstPass] = field(default_factory=dict)  # by id(batch)
    policy: DraftPolicy | None = None
    cost: PassCost | None = None
    decoder: StaticDecoder | None = None  # whether width-1 passes run statically
    # What the keys and values of a batch that takes in the next ones' rows may hold at most
    # (`refill.py`); 0: batches are not refilled.
    refill_bytes: int = 0
    # Never draft: the decode steps carry several trials' rows instead (`generation.Lane`).
    no_drafts: bool = False
    # How decode steps find their greedy tokens without every float32 logit (`head_screen.py`).
    head: ArgmaxHead | None = None
    # The most (row, column) logit vectors one pass may compute (0: no limit): a pass checking
    # drafts computes logits at every drafted column, so longer drafts are cut to fit (the rest
    # is checked in the next passes).
    most_logits: int = 0

    @property
    def drafting(self) -> bool:
        if self.drafts is None or self.no_drafts:
            return False
        return self.policy is None or self.policy.drafting

    def draft_room(self, rows: int) -> int | None:
        """The most draft tokens each of `rows` rows may carry in one pass (None: no limit)."""
        if self.most_logits <= 0:
            return None
        return max(0, self.most_logits // max(rows, 1) - 1)

    def start_for(self, first: FirstPass) -> int:
        """Where `first` starts computing: `start` when it was recorded, else layer 0."""
        return self.start if first.recording is not None else 0

    def share_for(self, first: FirstPass, n_layers: int) -> float:
        """The share of the layers `first` computes (the rest are replayed)."""
        return (n_layers - self.start_for(first)) / n_layers

    def first_pass(self, batch: EncodedBatch, pad_id: int) -> FirstPass:
        found = self.first_passes.get(id(batch))
        return found if found is not None else FirstPass.build(batch, self.prefix, None, pad_id)


@dataclass
class StartedBatch:
    """A batch whose first pass has run under the current edit: what its generation continues
    from (the KL pass of a set that is also answered is this pass, kept)."""

    recorded: FirstPass  # the first pass as prepared (every draft whole)
    first: FirstPass  # the first pass as run (drafts cut when not drafting)
    drafting: bool
    cache: Any
    choices: list[list[int]]  # [rows][1 + draft width]: the greedy token at each kept column
    first_logits: torch.Tensor  # [rows, vocab] float32: the next-token logits after each prompt
    share: float  # of the layers, the share the pass computed (the rest replayed)

    def cache_bytes(self) -> int:
        return cache_bytes(self.cache)


def start_batch(loaded: LoadedModel, batch: EncodedBatch, context: Context) -> StartedBatch:
    """Run a batch's first pass (prompts, and drafts when the context drafts) into a new cache."""
    drafting = context.drafting
    recorded = context.first_pass(batch, pad_id(loaded))
    room = context.draft_room(len(batch.indices)) if drafting else 0
    first = recorded if room is None else recorded.with_drafts_cut(room)
    share = context.share_for(first, loaded.n_layers)
    started = time.perf_counter()
    outputs, cache = _first_pass_outputs(loaded, first, context)
    logits = outputs.logits[:, -(first.draft_width + 1) :, :]
    choices = logits.argmax(dim=-1).tolist()
    if context.cost is not None:
        cells = first.cells * share
        context.cost.observe(cells, time.perf_counter() - started)
    # A copy: a view would keep every column's logits alive while the batch is kept.
    first_logits = logits[:, 0, :].float().clone()
    return StartedBatch(recorded, first, drafting, cache, choices, first_logits, share)


def first_token_logits(
    loaded: LoadedModel,
    batch: EncodedBatch,
    prefix: SharedPrefix | None = None,
    context: Context | None = None,
) -> torch.Tensor:
    """Raw next-token logits after each prompt: [rows, vocab], float32."""
    context = context or Context(prefix=prefix)
    model = loaded.model
    if context.prefix is None and not context.first_passes:
        outputs = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids_for(batch.attention_mask),
            use_cache=False,
            **forward_options(model),
        )
        return outputs.logits[:, -1, :].float()
    first = context.first_pass(batch, pad_id(loaded)).with_drafts_cut(0)
    cache = start_cache(model, context.prefix, first.cache_rows)
    outputs = first.run(model, cache, context.layers, context.start_for(first))
    return outputs.logits[:, -1, :].float()


def _first_pass_outputs(loaded: LoadedModel, first: FirstPass, context: Context):
    model = loaded.model
    cache = start_cache(model, context.prefix, first.cache_rows)
    try:
        outputs = first.run(model, cache, context.layers, context.start_for(first))
    except Exception as error:
        if is_out_of_memory(error) or context.prefix is not None or first.draft_width:
            raise
        # Remote-code models older than transformers' Cache objects build their own.
        outputs = model(
            input_ids=first.input_ids,
            attention_mask=first.attention_mask,
            position_ids=first.position_ids,
            use_cache=True,
            **forward_options(model),
        )
        cache = None
    return outputs, returned_cache(outputs, cache)


def _dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


def pad_id(loaded: LoadedModel) -> int:
    pad = loaded.tokenizer.pad_token_id
    return int(pad) if pad is not None else 0


def start_cache(model: torch.nn.Module, prefix: SharedPrefix | None, rows: int):
    return prefix.copy_for(model, rows) if prefix is not None else new_cache(model)


__all__ = [
    "Context",
    "FirstPass",
    "StartedBatch",
    "first_token_logits",
    "pad_id",
    "start_batch",
    "start_cache",
]
