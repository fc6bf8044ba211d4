"""What every trial reuses of the prompts it is asked, prepared once on the unmodified model.

The evaluator asks the same prompts in every trial: the harmless ones for KL, the harmful ones for
refusals. `Reuse` prepares, once, what no trial changes:

- the prefix all prompts share (`prefix.py`), checked to give the model's own numbers, and
  computed once per edit;
- the unmodified model's greedy reply to each prompt that is generated, which becomes the draft
  of every trial's reply (`drafts.py`), and the replies of earlier trials, added as they come;
- each batch's first pass (prompt + draft), packed where that saves padding (`packing.py`) and
  recorded layer by layer within a memory budget (`replay.py`), so a trial starts computing at
  its first edited layer.

Each shortcut is compared with the plain computation before it is relied on (`agreement.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hctl_worker.agreement import agree, passes_agree
from hctl_worker.architecture import find_layers
from hctl_worker.draft_policy import DraftPolicy, PassCost
from hctl_worker.drafts import DraftStore
from hctl_worker.encoding import (
    EncodedBatch,
    cache_option,
    forward_options,
    new_cache,
    returned_cache,
)
from hctl_worker.first_pass import (
    Context,
    FirstPass,
    first_token_logits,
    pad_id,
    start_cache,
)
from hctl_worker.head_screen import ArgmaxHead
from hctl_worker.model_errors import is_out_of_memory
from hctl_worker.packing import attention_weight, attention_window
from hctl_worker.prefix import SharedPrefix
from hctl_worker.replay import DepthPlan, Recording, plan_depth, record, replayable
from hctl_worker.static_decode import DecodeMode, StaticDecoder

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel
    from hctl_worker.prompt_set import PromptSet

# What the recordings may hold, as a fraction of the model's own size, but at least
# MINIMUM_REPLAY_BYTES (small models' recordings are small whatever the fraction).
DEFAULT_REPLAY_MEMORY = 0.25
MINIMUM_REPLAY_BYTES = 64 * 2**20

# How many draft columns the check of a replay compares (with the prompts' last column).
CHECKED_DRAFT_COLUMNS = 4


@dataclass(frozen=True)
class ReuseOptions:
    """Which shortcuts a job's trials take; none of them changes a measurement.

    `share_prefix`: compute the prompts' shared prefix once per edit. `replay_memory`: what the
    recordings of the layers below the first edited one may hold (a fraction of the model's
    size; 0 records nothing). `drafts`: verify earlier replies as drafts. `decode_graphs`: how
    passes of one token per row run (`static_decode.py`). `pack`: pack the first passes' prompts
    where that saves padding and the check agrees. `refill`: a batch whose replies finish takes
    in the next batch's rows (`refill.py`). `screen_head`: decode steps find their greedy tokens
    through the output head's screen where that measures faster (`head_screen.py`).
    """

    share_prefix: bool = True
    replay_memory: float = DEFAULT_REPLAY_MEMORY
    drafts: bool = True
    decode_graphs: DecodeMode = "off"
    pack: bool = True
    refill: bool = True
    screen_head: bool = True

    @classmethod
    def plain(cls) -> ReuseOptions:
        """No shortcut at all: what the shortcuts are compared with."""
        return cls(
            share_prefix=False,
            replay_memory=0,
            drafts=False,
            pack=False,
            refill=False,
            screen_head=False,
        )


class Reuse:
    """What every trial reuses: the shared prefix, first passes recorded below the edits, drafts.

    `unchanged_layers()` says how many leading layers the model's current edit leaves as they
    were (the ablator knows); 0 means replay nothing. `new_edit()` says the edit may have changed
    (the evaluator calls it for each trial): the shared prefix is then computed again, once.
    `options` says which shortcuts to take (`ReuseOptions`).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        texts: Sequence[str],
        options: ReuseOptions = ReuseOptions(),
        *,
        unchanged_layers: Callable[[], int] | None = None,
    ) -> None:
        self.loaded = loaded
        self.layers = find_layers(loaded.model)
        # Drafts and replays write columns into the cache that later masks hide or fill; only a
        # plain key/value cache keeps nothing else (a convolution or recurrent state would be
        # changed by a rejected draft token for good).
        plain_cache = self.plain_cache = self._plain_cache()
        self.decoder = StaticDecoder.for_model(loaded, options.decode_graphs, plain_cache)
        # A graphed pass of one token per row costs little: drafts would only add tokens.
        self.use_drafts = options.drafts and plain_cache and not self.decoder.graphs
        self.unchanged_layers = unchanged_layers or (lambda: 0)
        self.replay_memory = options.replay_memory if plain_cache else 0
        self.prefix = SharedPrefix.find(loaded, texts) if options.share_prefix else None
        # The start layer the prefix was last refreshed from under the current edit (None: it
        # must be refreshed; `new_edit` says the edit may have changed).
        self._prefix_start: int | None = None
        self.plan = DepthPlan(0, ())
        self.first_passes: dict[int, FirstPass] = {}
        self.screen_head = options.screen_head
        self.head: ArgmaxHead | None = None
        # Packed prompts need a plain key/value cache to put back in the padded layout.
        self.pack = options.pack and plain_cache
        # Joining a batch's rows to a running one needs a plain key/value cache too.
        self.refill = options.refill and plain_cache
        self.packed = False  # whether the first passes run packed (checked in `prepare`)
        self.pass_cost = PassCost()  # what a forward pass costs here, for the draft policies
        # The budgets are read for every pass of every trial; the model's size never changes.
        self._model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        self._logit_bytes = _logit_bytes(loaded.model)

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

    def new_edit(self) -> None:
        """The model's edit may have changed since the last pass: refresh the prefix."""
        self._prefix_start = None

    def check_prefix(self, batch: EncodedBatch) -> None:
        """Keep the shared prefix only if it gives this model's own first-token logits."""
        self.new_edit()  # refreshed here, outside `context`
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
        if not agree(self.loaded, plain, shared):
            self.prefix = None

    def context(
        self, drafts: DraftStore | None = None, policy: DraftPolicy | None = None
    ) -> Context:
        """The context of a pass under the model's current edit (the prefix is refreshed once
        per edit: see `new_edit`)."""
        start = self.plan.start_for(self.unchanged_layers()) if self.plan.enabled else 0
        if self.prefix is not None and self._prefix_start != start:
            self.prefix.refresh(self.loaded.model, self.layers, start)
            self._prefix_start = start
        return Context(
            prefix=self.prefix,
            layers=self.layers,
            start=start,
            drafts=drafts,
            first_passes=self.first_passes,
            policy=policy,
            cost=self.pass_cost if drafts is not None else None,
            decoder=self.decoder,
            refill_bytes=self.refill_budget(),
            head=self.head,
            most_logits=self.memory_budget() // self._logit_bytes,
        )

    def prepare(self, sets: Sequence[PromptSet]) -> None:
        """Build each batch's first pass (with its rows' drafts where the set drafts its first
        pass) and record them all on the (unmodified) model within the memory budget; keep the
        recordings only if a replayed pass gives the model's own numbers."""
        batches = [batch for prompt_set in sets for batch in prompt_set.batches]
        self.new_edit()  # the checks below refresh the prefix outside `context`
        self._build_first_passes(sets, pack=self.pack)
        if self.pack and not self._packing_agrees():
            self._build_first_passes(sets, pack=False)
        try:
            self._record(batches)
        except Exception as error:
            if is_out_of_memory(error):
                raise
            self._forget_recordings()
        if self.screen_head and batches:  # measured on the first batch's first tokens
            self.head = ArgmaxHead.probed(
                self.loaded.model, lambda: first_token_logits(self.loaded, batches[0])
            )

    def _build_first_passes(self, sets: Sequence[PromptSet], pack: bool) -> None:
        pad = pad_id(self.loaded)
        weight = attention_weight(self.loaded.model, self.layers) if pack else None
        window = attention_window(self.loaded.model.config)
        for prompt_set in sets:
            drafts = prompt_set.draft_tokens() if prompt_set.draft_first_pass else {}
            for batch in prompt_set.batches:
                rows = [drafts.get(index, []) for index in batch.indices]
                # A sliding window narrower than the padded batch hides keys the packed mask
                # would show: such a batch runs padded.
                fits = window is None or batch.input_ids.shape[1] <= window
                self.first_passes[id(batch)] = FirstPass.build(
                    batch, self.prefix, rows, pad, weight if fits else None
                )
        self.packed = any(
            (first.prompts_only or first).packing is not None
            for first in self.first_passes.values()
        )

    def _packing_agrees(self) -> bool:
        """A packed pass gives the padded pass's logits, and the next token's (checked on the
        first batch that packs)."""
        pad = pad_id(self.loaded)
        for first in self.first_passes.values():
            packed = first.with_drafts_cut(0)
            if packed.packing is None:
                continue
            padded = FirstPass.build(first.batch, self.prefix, None, pad)
            try:
                return passes_agree(self.loaded, self.prefix, padded, packed)
            except Exception as error:
                if is_out_of_memory(error):
                    raise
                return False
        return True

    def _record(self, batches: Sequence[EncodedBatch]) -> None:
        """Record the first passes within the budget, those that passes without drafts run
        first: the plan (how deep, how many checkpoints) is bought for them, and a pass with
        drafts beside a packed prompts-only pass of its own is recorded too only if it fits
        what is left. Unrecorded, it starts at layer 0 when it drafts (`Context.start_for`)."""
        n_layers = len(self.layers)
        if self.replay_memory <= 0 or n_layers < 2 or not batches:
            return
        model = self.loaded.model
        passes = [self.first_passes[id(batch)] for batch in batches]
        plain = [first.prompts_only or first for first in passes]
        drafted = [first for first in passes if first.prompts_only is not None]
        with torch.inference_mode():
            every_layer = DepthPlan(n_layers - 1, tuple(range(1, n_layers)))
            recording, probe = self._recorded(plain[0], every_layer)
            if not replayable(probe):
                return
            # What one layer's keys and values, and one checkpoint, cost per token.
            key_value = (recording.keys[0].nbytes + recording.values[0].nbytes) / plain[0].cells
            hidden = next(iter(recording.hidden.values())).nbytes / plain[0].cells
            tokens = sum(first.cells for first in plain) + (
                self.prefix.length if self.prefix else 0
            )
            budget = self.memory_budget()
            plan = plan_depth(n_layers, int(key_value * tokens), int(hidden * tokens), budget)
            if not plan.enabled:
                return
            recording.trim(plan)
            plain[0].recording = recording
            per_token = key_value * plan.recorded_layers + hidden * len(plan.checkpoints)
            left = budget - per_token * tokens
            for first in plain[1:]:
                first.recording, _ = self._recorded(first, plan)
            for first in drafted:
                if per_token * first.cells <= left:
                    left -= per_token * first.cells
                    first.recording, _ = self._recorded(first, plan)
            if self.prefix is not None:
                self.prefix.record(model, self.layers, plan.checkpoints, plan.recorded_layers)
            self.plan = plan
            checked = passes[0] if passes[0].recording is not None else plain[0]
            if not self._replay_agrees(checked):
                self._forget_recordings()

    def _recorded(self, first: FirstPass, plan: DepthPlan) -> tuple[Recording, Any]:
        """`first` run on the unmodified model, recorded as `plan` says, and the cache it left."""
        model = self.loaded.model
        cache = start_cache(model, self.prefix, first.cache_rows)
        recording = record(
            self.layers,
            cache,
            lambda: first.run(model, cache, logits=1, packed_cache=True),
            plan.checkpoints,
            plan.recorded_layers,
        )
        return recording, cache

    def _replay_agrees(self, first: FirstPass) -> bool:
        """A replay from the middle checkpoint gives the plain pass's logits: at the prompts'
        last tokens and the first few draft tokens (every column's logits, twice, can be more
        than the model: 100 columns x 32 prompts x 49k tokens is 630 MB in float32)."""
        first = first.with_drafts_cut(CHECKED_DRAFT_COLUMNS)
        start = self.plan.checkpoints[len(self.plan.checkpoints) // 2]
        model = self.loaded.model
        keep = first.draft_width + 1
        plain = first.run(model, start_cache(model, self.prefix, first.cache_rows))
        if self.prefix is not None:
            self.prefix.refresh(model, self.layers, start)
        replayed = first.run(
            model, start_cache(model, self.prefix, first.cache_rows), self.layers, start
        )
        if self.prefix is not None:
            self.prefix.refresh(model)
        return agree(
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
        packed = "packed prompts" if self.packed else "padded prompts"
        head = "; output head screened in bfloat16" if self.head is not None else ""
        return f"reuse: {prefix}; {replay}; {packed}; {drafts}; {self.decoder.describe()}{head}"

    def keep_budget(self) -> int:
        """Bytes a trial may keep of its prompt passes for its replies (the replay budget; none
        for caches that are not plain keys and values, or with replay off)."""
        return self.memory_budget() if self.replay_memory > 0 and self.plain_cache else 0

    def refill_budget(self) -> int:
        """Bytes the keys and values of a batch that takes in others' rows may hold (1 with
        replay off: a batch never grows past its rows; 0 when batches are not refilled)."""
        if not self.refill:
            return 0
        return self.memory_budget() if self.replay_memory > 0 else 1

    def memory_budget(self) -> int:
        """What the recordings may hold: `replay_memory` of the model's size, at least
        MINIMUM_REPLAY_BYTES."""
        return int(max(self.replay_memory * self._model_bytes, MINIMUM_REPLAY_BYTES))

    def recorded_bytes(self) -> int:
        recordings = [
            first.recording
            for outer in self.first_passes.values()
            for first in (outer, outer.prompts_only)
            if first is not None
        ]
        if self.prefix is not None:
            recordings.append(self.prefix.recording)
        return sum(recording.nbytes() for recording in recordings if recording is not None)


def _logit_bytes(model: torch.nn.Module) -> int:
    """The bytes of one position's logits, taken as float32 (some models upcast them)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    vocabulary = weight.shape[0] if torch.is_tensor(weight) else None
    vocabulary = vocabulary or getattr(getattr(model, "config", None), "vocab_size", None) or 1
    return 4 * int(vocabulary)


__all__ = ["DEFAULT_REPLAY_MEMORY", "Reuse", "ReuseOptions"]
