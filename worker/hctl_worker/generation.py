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
  each of which reads every weight, are shared by more rows;
- a decode step's output head computes in float32 only the tokens that can be the greedy one
  (`head_screen.py`, where that measured faster).

`Verdicts` counts the refusals decided so far, so a caller can stop a trial that can no longer
matter (`pruning.py`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hctl_worker.draft_policy import observe_generation
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
from hctl_worker.head_screen import choosing
from hctl_worker.prefix import SharedPrefix
from hctl_worker.refill import join_rows, joinable, row_limit
from hctl_worker.replies import Reply, accept
from hctl_worker.static_decode import Decoding
from hctl_worker.stop_tokens import stop_token_ids
from hctl_worker.tallies import GenerationStats, Verdicts

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel


@dataclass
class Lane:
    """One trial's part of a generation: what its batches' first passes run with (`context`: its
    prefix and start layer), its verdicts, and its batches whose first pass already ran (by
    id). Several lanes share a generation when their trials are applied together
    (`Ablator.apply_together`): each batch's first pass runs for its own lane, and the decode
    steps carry rows of every lane, so the lanes share each step's weight reads."""

    context: Context
    verdicts: Verdicts | None = None
    started: Mapping[int, StartedBatch] = field(default_factory=dict)
    first_logits: list[torch.Tensor] | None = None  # the batches' first-token logits go here

    @property
    def shares_steps(self) -> bool:
        """Whether its decode steps can carry other lanes' rows: not while it drafts (its rows'
        passes carry drafts) or decodes on static buffers (a fixed batch)."""
        decoder = self.context.decoder
        return not self.context.drafting and not (decoder is not None and decoder.static)

    def stopped(self) -> bool:
        """Whether the lane's verdicts reached their limit (then they say so, `stopped`)."""
        if self.verdicts is not None and self.verdicts.stop():
            self.verdicts.stopped = True
        return self.verdicts is not None and self.verdicts.stopped


# Which lane every row of the next pass runs: one lane for the whole pass, or one per row.
Select = Callable[[int | Sequence[int]], None]


@dataclass
class _Group:
    """One batch of a generation: its lane, its first pass, its replies, and the rows a run that
    it opens may grow to without drafts (0: it takes in no other batch)."""

    lane: int
    begun: StartedBatch
    replies: list[Reply]
    limit: int


def _generate_batch(
    loaded: LoadedModel,
    lanes: Sequence[Lane],
    item: tuple[int, EncodedBatch],
    max_new_tokens: int,
    markers: tuple[str, ...] | None = None,
    stats: GenerationStats | None = None,
    following: deque[tuple[int, EncodedBatch]] | None = None,
    select: Select | None = None,
) -> list[_Group]:
    """Greedy replies for one batch of one lane (`item`); rows leave the batch at EOS or, with
    `markers`, as soon as their normalised text contains one (the reply is then a refusal
    whatever follows). A batch in its lane's `started` (by id) has had its first pass run
    already (under the same edit). With `following` and a context that refills, batches from
    its front join this one as its rows finish (`refill.py`), whatever their lane (`select`
    then gives each row of a pass its lane's edit); a lane whose verdicts reach their limit
    stops. Every batch that ran is returned, with its replies."""
    context = lanes[item[0]].context
    model, tokenizer = loaded.model, loaded.tokenizer
    stats = stats if stats is not None else GenerationStats()
    stop_ids = stop_token_ids(loaded)
    pad = pad_id(loaded)
    if max_new_tokens <= 0 and lanes[item[0]].first_logits is None:
        return []
    depth = loaded.n_layers
    groups: list[_Group] = []
    decoder = context.decoder
    # Passes of one token per row (no drafts follow) may run on static buffers, or a CUDA graph.
    static_plain = decoder is not None and decoder.static

    def begin(item: tuple[int, EncodedBatch]) -> tuple[StartedBatch, list[Reply]]:
        lane_index, batch = item
        lane = lanes[lane_index]
        if select is not None:
            select(lane_index)
        begun = lane.started.get(id(batch)) or start_batch(loaded, batch, lane.context)
        first = begun.first
        fed = int(first.attention_mask[:, -first.input_ids.shape[1] :].sum())
        stats.count_pass(fed, fed * depth * begun.share)
        if lane.first_logits is not None:
            # The prompt's last logits are the first-token distribution KL needs: one pass.
            lane.first_logits.append(begun.first_logits)
        begun_replies = [
            Reply(index, int(first.position_ids[row, -first.draft_width - 1]) + 1, lane_index)
            for row, index in enumerate(batch.indices)
        ]
        # The rows a run this batch opens may grow to, run without drafts (for the policy too);
        # trials sharing it hold each a batch they would have held alone (a budget each).
        refills = context.refill_bytes > 0 and not static_plain
        limit = (
            row_limit(
                begun.cache,
                len(begun_replies),
                first.attention_mask.shape[1],
                max_new_tokens,
                context.refill_bytes * len(lanes),
            )
            if refills and joinable(begun.cache, first.attention_mask)
            else 0
        )
        groups.append(_Group(lane_index, begun, begun_replies, limit))
        return begun, begun_replies

    opening, replies = begin(item)
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
        verdicts = lanes[reply.lane].verdicts
        if verdicts is not None:
            verdicts.decide(refused)

    while True:
        while refilling and _drop_stopped(following, lanes):
            if len(active) + len(following[0][1].indices) > limit:
                break
            index, batch = following[0]
            queued = lanes[index].started.get(id(batch))
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
        stopped = {index for index, lane in enumerate(lanes) if lane.stopped()}
        for reply in replies:  # a lane at its limit stops: its replies stay as they are
            if reply.lane in stopped:
                reply.done = True
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
        most = context.draft_room(len(active))
        for row in active:
            reply = replies[row]
            if reply.done or context.drafts is None or not drafting:
                drafts.append([])
                continue
            room = max_new_tokens - len(reply.tokens) - 1
            room = room if most is None else min(room, most)
            drafts.append(context.drafts.draft(reply.index, reply.tokens, room))
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
        if select is not None:
            select([replies[row].lane for row in active])
        pass_started, pass_cells = time.perf_counter(), inputs.numel()
        with choosing(context.head):  # only the greedy tokens are read of these logits
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


def _drop_stopped(queue: deque[tuple[int, EncodedBatch]] | None, lanes: Sequence[Lane]) -> bool:
    """Drop the batches of lanes that stopped from `queue`; whether any batch is left."""
    if queue and any(lane.stopped() for lane in lanes):
        kept = [item for item in queue if not lanes[item[0]].stopped()]
        queue.clear()
        queue.extend(kept)
    return bool(queue)


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
    lane = Lane(context or Context(prefix=prefix), verdicts, started or {}, first_logits)
    return generate_together(loaded, [lane], batches, max_new_tokens, markers, stats)[0]


def generate_together(
    loaded: LoadedModel,
    lanes: Sequence[Lane],
    batches: Sequence[EncodedBatch],
    max_new_tokens: int,
    markers: tuple[str, ...] | None = None,
    stats: GenerationStats | None = None,
    select: Select | None = None,
) -> list[list[str]]:
    """Every lane's replies to the same batches (see `generate`), each in the callers' order.
    With several lanes, `select` gives each pass's rows their lane's edit, and the lanes'
    batches take turns, so a batch's decode steps take in the other lanes' rows as soon as
    the refill budget allows; the lanes must not draft or decode on static buffers."""
    if len(lanes) > 1:
        if select is None:
            raise ValueError("lanes sharing a generation need `select`")
        if not all(lane.shares_steps for lane in lanes):
            raise ValueError("lanes sharing a generation cannot draft or decode statically")
    total = sum(len(batch.indices) for batch in batches)
    replies = [[""] * total for _ in lanes]
    queue = deque((index, batch) for batch in batches for index in range(len(lanes)))
    groups: list[_Group] = []
    with torch.inference_mode():
        while _drop_stopped(queue, lanes):
            groups += _generate_batch(
                loaded, lanes, queue.popleft(), max_new_tokens, markers, stats, queue, select
            )
    for group in groups:
        for reply in group.replies:
            text = loaded.tokenizer.decode(reply.tokens, skip_special_tokens=True)
            replies[group.lane][reply.index] = text
    for index, lane in enumerate(lanes):
        store, policy = lane.context.drafts, lane.context.policy
        complete = not lane.stopped()
        if store is not None and max_new_tokens > 0:
            own = [group for group in groups if group.lane == index]
            if policy is not None and complete:
                observe_generation(policy, own, max_new_tokens, lane.context, loaded.n_layers)
            for group in own:  # after pricing: the drafts were what the store held before
                for reply in group.replies:
                    store.add(reply.index, reply.tokens)
        if policy is not None:
            policy.finish(lane.context.drafting, complete)
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
    "Lane",
    "Select",
    "generate",
    "generate_together",
    "position_ids_for",
]
