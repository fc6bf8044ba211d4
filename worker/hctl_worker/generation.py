"""The generation engine: the prompt pass and greedy generation with a KV cache.

Speed matters here more than anywhere: refusal scoring is most of a trial's time. Prompts are
tokenised once and grouped by length (`encoding.py`), and generated greedily in a hand-written
loop that drops a row from the batch as soon as its verdict is certain (a refusal marker
appeared, or the row ended), and stops the batch when every row is decided (`replies.py`).
These make a trial cheaper without changing its replies:

- the prefix all prompts share is run once per model state (`prefix.py`);
- a batch's first pass (its prompts and a draft reply per row, `first_pass.py`) can start above
  the layers the trial leaves unchanged (`replay.py`);
- each pass feeds a draft of the reply (`drafts.py`) and keeps it for as long as every drafted
  token is the model's own greedy choice, so one pass can produce many tokens; a prompt set
  drafts only while that measures cheaper (`draft_policy.py`: on a CPU, rarely);
- a batch whose first pass already ran (the KL pass over the harmless prompts, kept) continues
  from it (`started`);
- as a batch's rows finish, the next batch's rows join it (`refill.py`), so the decode steps,
  each of which reads every weight, are shared by more rows.

`Verdicts` counts the refusals decided so far, so a caller can stop a trial that can no longer
matter (`pruning.py`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hctl_worker.draft_policy import DraftPolicy, FinishedReply
from hctl_worker.encoding import (
    EncodedBatch,
    cache_option,
    encode_texts,
    forward_options,
    position_ids_for,
    returned_cache,
)
from hctl_worker.first_pass import (
    Context,
    FirstPass,
    StartedBatch,
    pad_id,
    start_batch,
)
from hctl_worker.prefix import SharedPrefix
from hctl_worker.refill import join_rows, joinable, refilled_passes, row_limit
from hctl_worker.replies import Reply, accept
from hctl_worker.static_decode import Decoding
from hctl_worker.stop_tokens import stop_token_ids

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel


@dataclass
class GenerationStats:
    """Counters for benchmarks: tokens generated, forward passes run, work done."""

    tokens: int = 0
    forward_passes: int = 0
    rows: int = 0
    input_tokens: int = 0  # tokens fed to the model (prompts, drafts, generated)
    layer_tokens: int = 0  # input tokens times the layers that computed them (not replayed)
    drafted: int = 0  # draft tokens fed
    accepted: int = 0  # draft tokens that were the model's own choice
    static_passes: int = 0  # passes run on static buffers (or replayed as a CUDA graph)

    def count_pass(self, fed: int, layer_tokens: float, static: bool = False) -> None:
        """One forward pass: `fed` tokens, through `layer_tokens` token-layers (not replayed)."""
        self.forward_passes += 1
        self.static_passes += int(static)
        self.input_tokens += fed
        self.layer_tokens += round(layer_tokens)


@dataclass
class Verdicts:
    """Replies decided so far; `stop()` once `limit` of them are refusals (None: never)."""

    limit: int | None = None
    refusals: int = 0
    decided: int = 0
    stopped: bool = False

    def decide(self, refused: bool) -> None:
        self.decided += 1
        self.refusals += int(refused)

    def stop(self) -> bool:
        return self.limit is not None and self.refusals >= self.limit


@dataclass
class _Group:
    """One batch of a generation: its first pass, its replies, and the rows a run that it opens
    may grow to without drafts (0: it takes in no other batch)."""

    begun: StartedBatch
    replies: list[Reply]
    limit: int


def _generate_batch(
    loaded: LoadedModel,
    batch: EncodedBatch,
    max_new_tokens: int,
    markers: tuple[str, ...] | None = None,
    stats: GenerationStats | None = None,
    first_logits: list[torch.Tensor] | None = None,
    context: Context | None = None,
    verdicts: Verdicts | None = None,
    started: Mapping[int, StartedBatch] | None = None,
    following: deque[EncodedBatch] | None = None,
) -> list[_Group]:
    """Greedy replies for one batch; rows leave the batch at EOS or, with `markers`, as soon as
    their normalised text contains one (the reply is then a refusal whatever follows). A batch
    in `started` (by id) has had its first pass run already (under the same edit). With
    `following` and a context that refills, batches from its front join this one as its rows
    finish (`refill.py`); every batch that ran is returned, with its replies."""
    context = context or Context()
    started = started or {}
    model, tokenizer = loaded.model, loaded.tokenizer
    stats = stats if stats is not None else GenerationStats()
    stop_ids = stop_token_ids(loaded)
    pad = pad_id(loaded)
    if max_new_tokens <= 0 and first_logits is None:
        return []
    depth = loaded.n_layers
    groups: list[_Group] = []
    decoder = context.decoder
    # Passes of one token per row (no drafts follow) may run on static buffers, or a CUDA graph.
    static_plain = decoder is not None and decoder.static

    def begin(batch: EncodedBatch) -> tuple[StartedBatch, list[Reply]]:
        begun = started.get(id(batch)) or start_batch(loaded, batch, context)
        first = begun.first
        fed = int(first.attention_mask[:, -first.input_ids.shape[1] :].sum())
        stats.count_pass(fed, fed * depth * begun.share)
        if first_logits is not None:
            # The prompt's last logits are the first-token distribution KL needs: one pass.
            first_logits.append(begun.first_logits)
        begun_replies = [
            Reply(index, int(first.position_ids[row, -first.draft_width - 1]) + 1)
            for row, index in enumerate(batch.indices)
        ]
        # The rows a run this batch opens may grow to, run without drafts (for the policy too).
        refills = context.refill_bytes > 0 and not static_plain
        limit = (
            row_limit(
                begun.cache,
                len(begun_replies),
                first.attention_mask.shape[1],
                max_new_tokens,
                context.refill_bytes,
            )
            if refills and joinable(begun.cache, first.attention_mask)
            else 0
        )
        groups.append(_Group(begun, begun_replies, limit))
        return begun, begun_replies

    opening, replies = begin(batch)
    if max_new_tokens <= 0:
        return groups
    replies = list(replies)
    first, cache, drafting = opening.first, opening.cache, opening.drafting
    rows = len(replies)
    attention_mask = first.attention_mask.clone()
    active = list(range(rows))  # the reply held in each cache slot
    pending_drafts = first.drafts
    can_drop_rows = hasattr(cache, "batch_select_indices")
    choices = opening.choices  # [slots, 1 + draft width]: the greedy token at each column
    static = static_plain and not (context.drafts is not None and drafting)
    # Batches join only one made of passes of one token per row, on a cache that can take them.
    refilling = (
        bool(following)
        and context.refill_bytes > 0
        and not static
        and not drafting
        and can_drop_rows
    )
    limit = groups[0].limit if refilling else rows  # the rows the batch may grow to
    decoding: Decoding | None = None

    def finish(reply: Reply, refused: bool) -> None:
        reply.done, reply.refused = True, refused
        if verdicts is not None:
            verdicts.decide(refused)

    while True:
        while refilling and following and len(active) + len(following[0].indices) <= limit:
            queued = started.get(id(following[0]))
            if (queued is not None and queued.drafting) or not joinable(cache, attention_mask):
                refilling = False
                break
            begun, joined = begin(following.popleft())
            if not joinable(begun.cache, begun.first.attention_mask):
                raise RuntimeError("a batch's first pass left a cache that cannot be joined")
            attention_mask = join_rows(
                cache, attention_mask, begun.cache, begun.first.attention_mask
            )
            active.extend(range(len(replies), len(replies) + len(joined)))
            replies.extend(joined)
            choices = [*choices, *begun.choices]  # accepted below, like the others'
            rows += len(joined)
        width = len(choices[0])
        for slot, row in enumerate(active):
            reply = replies[row]
            if reply.done:  # a finished row the cache could not drop
                continue
            draft = pending_drafts[slot] if slot < len(pending_drafts) else []
            kept = accept(
                reply, choices[slot], draft, stop_ids, max_new_tokens, tokenizer, markers, finish
            )
            stats.drafted += len(draft)
            stats.accepted += min(kept, len(draft))
            # The columns of rejected draft tokens (and padding) are never attended to again.
            first_rejected = attention_mask.shape[1] - width + 1 + kept
            attention_mask[slot, first_rejected:] = 0
            reply.position += kept
        if verdicts is not None and verdicts.stop():
            verdicts.stopped = True
            break
        keep = [slot for slot, row in enumerate(active) if not replies[row].done]
        if not keep:
            break
        if static and decoding is None:
            decoding = Decoding.start(loaded, cache, attention_mask, max_new_tokens, decoder)
            static = decoding is not None
        if decoding is not None:  # every row stays; finished ones compute and are ignored
            pass_started = time.perf_counter()
            choices = decoding.step_replies(replies, pad)
            if context.cost is not None:
                context.cost.observe(rows, time.perf_counter() - pass_started)
            stats.count_pass(len(keep), len(keep) * depth, static=True)
            pending_drafts = []
            continue
        if can_drop_rows and len(keep) < len(active):
            selection = torch.tensor(keep, dtype=torch.long)  # a CPU index suits any device
            try:
                cache.batch_select_indices(selection)
            except Exception:  # A cache kind that cannot drop rows: keep computing them.
                can_drop_rows = refilling = False
            else:
                attention_mask = attention_mask[selection.to(attention_mask.device)]
                active = [active[slot] for slot in keep]
        # The next pass: each live row's newest token, then its draft (if any).
        drafts = []
        for row in active:
            reply = replies[row]
            if reply.done or context.drafts is None or not drafting:
                drafts.append([])
                continue
            limit = max_new_tokens - len(reply.tokens) - 1
            drafts.append(context.drafts.draft(reply.index, reply.tokens, limit))
        draft_width = max(len(draft) for draft in drafts)
        inputs = torch.full((len(active), 1 + draft_width), pad, dtype=torch.long)
        new_mask = torch.zeros_like(inputs)
        positions = torch.zeros_like(inputs)
        for slot, row in enumerate(active):
            reply = replies[row]
            tokens = [reply.tokens[-1] if reply.tokens else pad, *drafts[slot]]
            inputs[slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            new_mask[slot, : len(tokens)] = 0 if reply.done else 1
            positions[slot] = reply.position + torch.arange(1 + draft_width)
            reply.position += 1
        device = first.input_ids.device
        attention_mask = torch.cat([attention_mask, new_mask.to(attention_mask.device)], dim=1)
        pass_started, pass_cells = time.perf_counter(), inputs.numel()
        outputs = model(
            input_ids=inputs.to(device),
            attention_mask=attention_mask,
            position_ids=positions.to(device),
            use_cache=True,
            **cache_option(model, cache),
            **forward_options(model, 1 + draft_width),
        )
        cache = returned_cache(outputs, cache)
        choices = outputs.logits[:, -(1 + draft_width) :, :].argmax(dim=-1).tolist()
        if context.cost is not None:
            context.cost.observe(pass_cells, time.perf_counter() - pass_started)
        fed = int(new_mask.sum())
        stats.count_pass(fed, fed * depth)
        pending_drafts = drafts
    stats.tokens += sum(len(reply.tokens) for reply in replies)
    stats.rows += rows
    return groups


def _observe(
    policy: DraftPolicy,
    groups: Sequence[_Group],
    max_new_tokens: int,
    context: Context,
    n_layers: int,
) -> None:
    """Price a finished generation both ways for `policy`, batch by batch (each way's first pass
    from its own recording, if any); without drafts its batches would be refilled, so they share
    some passes (`refill.refilled_passes`)."""
    needs = []
    for group in groups:
        finished = [
            FinishedReply(reply.index, reply.tokens, reply.stopped) for reply in group.replies
        ]
        recorded = group.begun.recorded
        plain = recorded.with_drafts_cut(0)
        policy.observe_batch(
            finished,
            recorded.input_ids.shape[1] - recorded.draft_width,
            context.share_for(recorded, n_layers),
            max_new_tokens,
            context.drafts,
            recorded.drafts,
            plain.cells,
            context.share_for(plain, n_layers),
        )
        needs.append(([len(reply.tokens) + reply.stopped for reply in finished], group.limit))
    alone = sum(max(need) for need, _ in needs if need)
    policy.share_passes(alone - refilled_passes(needs))


def generate(
    loaded: LoadedModel,
    batches: Sequence[EncodedBatch],
    max_new_tokens: int,
    markers: tuple[str, ...] | None = None,
    stats: GenerationStats | None = None,
    first_logits: list[torch.Tensor] | None = None,
    prefix: SharedPrefix | None = None,
    context: Context | None = None,
    verdicts: Verdicts | None = None,
    started: Mapping[int, StartedBatch] | None = None,
) -> list[str]:
    """Replies for every batch, in the callers' original order. With `first_logits`, each
    batch's first-token logits are appended to it (in batch order, not the callers'). With
    `verdicts`, generation stops once its limit of refusals is reached (the replies not yet
    finished are then cut short, and `verdicts.stopped` says so). `started` holds batches
    (by id) whose first pass has run already under the same edit."""
    context = context or Context(prefix=prefix)
    total = sum(len(batch.indices) for batch in batches)
    replies = [""] * total
    queue = deque(batches)
    groups: list[_Group] = []
    with torch.inference_mode():
        while queue:
            if verdicts is not None and verdicts.stop():
                verdicts.stopped = True
                break
            groups += _generate_batch(
                loaded,
                queue.popleft(),
                max_new_tokens,
                markers,
                stats,
                first_logits,
                context,
                verdicts,
                started,
                following=queue,
            )
    for group in groups:
        for reply in group.replies:
            replies[reply.index] = loaded.tokenizer.decode(reply.tokens, skip_special_tokens=True)
    store = context.drafts
    if store is not None and max_new_tokens > 0:
        complete = verdicts is None or not verdicts.stopped
        if context.policy is not None and complete:
            _observe(context.policy, groups, max_new_tokens, context, loaded.n_layers)
        for group in groups:  # after pricing: the drafts were what the store held before
            for reply in group.replies:
                store.add(reply.index, reply.tokens)
    return replies


__all__ = [
    "Context",
    "EncodedBatch",
    "FirstPass",
    "GenerationStats",
    "SharedPrefix",
    "Verdicts",
    "cache_option",
    "encode_texts",
    "forward_options",
    "generate",
    "position_ids_for",
]
