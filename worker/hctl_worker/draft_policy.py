"""Whether draft replies pay, decided by measurement, per prompt set.

A draft (`drafts.py`) never changes a reply, only how it is computed: each drafted token is fed
to the model, and kept when it is the model's own greedy choice. That saves forward passes but
costs the drafted tokens' compute, kept or not. Where a pass costs about the same whatever it
carries (a GPU reading its weights) drafts pay almost always; where compute grows with every
token fed (a CPU) they pay only when nearly all of a batch's drafts are kept, which depends on
how far the trials' edits move the replies.

So the worker measures both sides:

- `PassCost`: seconds per forward pass as a fixed part plus a part per token fed (times the share
  of the layers computed), fitted by least squares to every pass the generation times;
- `DraftPolicy`: after each trial, the passes and tokens the same replies would have taken with
  and without drafts (the engine is deterministic given the replies, so both are counted
  exactly, `passes_needed`), priced by `PassCost`; the next trial drafts when drafting was the
  cheaper of the two over the recent trials (before any trial was priced, it does not).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hctl_worker.drafts import DraftStore
from hctl_worker.refill import refilled_passes

if TYPE_CHECKING:
    from hctl_worker.first_pass import Context

# How many recent trials' estimates decide (the search's trials change slowly).
RECENT_TRIALS = 8


class PassCost:
    """seconds ≈ fixed + per_cell × cells, fitted to measured passes (cells: tokens fed times
    the share of the layers computed)."""

    def __init__(self) -> None:
        self._n = 0
        self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, cells: float, seconds: float) -> None:
        self._n += 1
        self._x += cells
        self._y += seconds
        self._xx += cells * cells
        self._xy += cells * seconds

    def fitted(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per cell), both at least 0; None until passes of different
        sizes were measured."""
        if self._n < 2:
            return None
        spread = self._n * self._xx - self._x * self._x
        if spread <= 1e-9 * max(self._xx, 1.0):
            return None
        per_cell = max(0.0, (self._n * self._xy - self._x * self._y) / spread)
        fixed = max(0.0, (self._y - per_cell * self._x) / self._n)
        return fixed, per_cell

    def estimate(self, passes: float, cells: float) -> float | None:
        fit = self.fitted()
        return None if fit is None else fit[0] * passes + fit[1] * cells


@dataclass(frozen=True)
class FinishedReply:
    """A reply as the engine produced it: its tokens, and whether the model then chose a stop
    token (one more choice the engine had to compute)."""

    index: int  # the prompt's index in its set
    tokens: Sequence[int]
    stopped: bool


def passes_needed(
    replies: Sequence[FinishedReply],
    prompt_columns: int,
    first_share: float,
    max_new_tokens: int,
    store: DraftStore | None,
    first_drafts: Sequence[Sequence[int]] = (),
    plain_prompt_cells: float | None = None,
) -> tuple[int, float]:
    """(passes, cells) the engine needs for one batch's `replies`: without drafts when `store`
    is None, else drafting from `store` (as it was before these replies were added), the first
    pass carrying `first_drafts` (one per row). `first_share` is the share of the layers the
    first pass computes (the rest are replayed); `plain_prompt_cells` what the first pass
    computes without drafts (fewer than rows x `prompt_columns` when the prompts are packed)."""
    rows = len(replies)
    choices = [list(reply.tokens) + ([-1] if reply.stopped else []) for reply in replies]
    drafts = [list(draft) for draft in first_drafts] if store is not None else []
    drafts += [[] for _ in range(rows - len(drafts))]
    width = max((len(draft) for draft in drafts), default=0)
    cells = rows * (prompt_columns + width) * first_share
    if store is None and plain_prompt_cells is not None:
        cells = plain_prompt_cells * first_share
    got = [_accepted(draft, wanted) + 1 for draft, wanted in zip(drafts, choices, strict=True)]
    passes = 1
    while True:
        active = [row for row in range(rows) if got[row] < len(choices[row])]
        if not active:
            return passes, cells
        fed = {}
        for row in active:
            reply = replies[row]
            limit = max_new_tokens - got[row] - 1
            fed[row] = (
                store.draft(reply.index, choices[row][: got[row]], limit)
                if store is not None
                else []
            )
        width = 1 + max(len(draft) for draft in fed.values())
        cells += len(active) * width
        passes += 1
        for row in active:
            got[row] += _accepted(fed[row], choices[row][got[row] :]) + 1


def _accepted(draft: Sequence[int], wanted: Sequence[int]) -> int:
    kept = 0
    for drafted, token in zip(draft, wanted, strict=False):
        if drafted != token:
            break
        kept += 1
    return kept


class DraftPolicy:
    """Whether one prompt set's next generation drafts: the cheaper way over recent trials."""

    def __init__(self, cost: PassCost, recent: int = RECENT_TRIALS) -> None:
        self.cost = cost
        self._with: deque[float] = deque(maxlen=recent)
        self._without: deque[float] = deque(maxlen=recent)
        self._pending = [0.0, 0.0]  # this generation's estimates so far (with, without)
        self._priced = True
        self.drafted = self.plain = 0  # generations run each way

    @property
    def drafting(self) -> bool:
        """Draft once measurement says it is the cheaper way. Until a trial's replies were
        priced, do not: a trial's drafts cost their compute for sure and save only what its
        replies keep (and a trial whose replies are skipped or pruned keeps nothing)."""
        return bool(self._with) and sum(self._with) < sum(self._without)

    def observe_batch(
        self,
        replies: Sequence[FinishedReply],
        prompt_columns: int,
        first_share: float,
        max_new_tokens: int,
        store: DraftStore,
        first_drafts: Sequence[Sequence[int]],
        plain_prompt_cells: float | None = None,
        plain_share: float | None = None,
    ) -> None:
        """Price one finished batch both ways (before its replies join `store`): `first_share`
        is the share of the layers its first pass computes with drafts, `plain_share` without
        (when its recordings differ: a pass with drafts may have none)."""
        shares = (first_share, first_share if plain_share is None else plain_share)
        for slot, chosen in enumerate((store, None)):
            passes, cells = passes_needed(
                replies,
                prompt_columns,
                shares[slot],
                max_new_tokens,
                chosen,
                first_drafts,
                plain_prompt_cells,
            )
            estimate = self.cost.estimate(passes, cells)
            if estimate is None:
                self._priced = False
            else:
                self._pending[slot] += estimate

    def share_passes(self, passes: int) -> None:
        """The batches priced one by one without drafts share `passes` of their passes when run
        refilled (`refill.py`): that many fewer passes, the same tokens."""
        fit = self.cost.fitted()
        if fit is None:
            self._priced = False
        else:
            self._pending[1] -= fit[0] * passes

    def finish(self, drafted: bool, complete: bool) -> None:
        """One generation is over: count it, and keep its estimates if every batch ran."""
        if drafted:
            self.drafted += 1
        else:
            self.plain += 1
        if complete and self._priced:
            self._with.append(self._pending[0])
            self._without.append(self._pending[1])
        self._pending = [0.0, 0.0]
        self._priced = True

    def describe(self) -> str:
        return f"{self.drafted} drafted, {self.plain} plain"


def observe_generation(
    policy: DraftPolicy,
    groups: Sequence[Any],
    max_new_tokens: int,
    context: Context,
    n_layers: int,
) -> None:
    """Price a finished generation both ways for `policy`, batch by batch (each way's first pass
    from its own recording, if any); without drafts its batches would be refilled, so they share
    some passes (`refill.refilled_passes`). `groups` are the generation's batches
    (`generation._Group`: their first pass, replies and refill limit)."""
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


__all__ = ["DraftPolicy", "FinishedReply", "PassCost", "observe_generation", "passes_needed"]
