"""The scorer seam: what a scorer is, and what it may ask of the trial it scores.

A scorer has a name, a role, and `score(context) -> float`. It never touches the model: it asks
the context for what it needs (the replies to the harmful or harmless prompts, the per-prompt
KL divergence of the first token, the per-token KL divergence along the original model's own
continuations), and the context computes each of those once per trial however many scorers ask
(`evaluation.TrialEvaluation`). So a new scorer is one module and one registry line, and work
on speed changes how the context computes things without touching any scorer.

Torch-free at import: the settings validate scorer names with the registry before anything
heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from hctl_worker.trials import Role

if TYPE_CHECKING:
    import torch


PromptSetName = Literal["harmful", "harmless"]
# What a scorer reads from the context. Replies are the costly part of a trial (generation), so
# scorers that read them run last and are skipped when the model is already too damaged.
Reading = Literal["harmful_replies", "harmless_replies", "first_token", "continuation"]
REPLIES: frozenset[Reading] = frozenset({"harmful_replies", "harmless_replies"})


@dataclass(frozen=True)
class TokenDivergences:
    """KL(original ‖ current) at each position of each prompt's continuation."""

    values: torch.Tensor  # [prompts, positions], float32
    mask: torch.Tensor  # [prompts, positions], bool: the positions the continuation has


class ScoringContext(Protocol):
    """What a scorer may ask about the model as it is in this trial."""

    harmful_prompts: Sequence[str]  # the user's words, without the chat template
    harmless_prompts: Sequence[str]

    def harmful_replies(self) -> Sequence[str]:
        """Greedy replies to the harmful prompts, in their order."""
        ...

    def harmless_replies(self) -> Sequence[str]:
        """Greedy replies to the harmless prompts, in their order."""
        ...

    def first_token_divergences(self) -> torch.Tensor:
        """Per harmless prompt: KL(original ‖ current) of the first reply token's distribution."""
        ...

    def continuation_divergences(self) -> TokenDivergences:
        """Per harmless prompt and position of the original model's greedy continuation:
        KL(original ‖ current) of the next-token distribution, teacher-forced."""
        ...

    # For the job's Scoring, not for scorers: pruning a trial that can no longer matter.
    pruned: bool  # the harmful replies stopped at the limit
    refusals_so_far: int | None  # the refusals that stopped them (a lower bound)

    def limit_refusals(self, limit: int | None) -> None:
        """Stop the harmful replies once `limit` of them are (marker) refusals."""
        ...


class Scorer(Protocol):
    """One named measure of a trial. `counts` names the prompt set whose prompts the value
    counts (its value is then out of that set's size), or is None for any other number."""

    name: str
    role: Role
    reads: frozenset[Reading]
    counts: PromptSetName | None

    def score(self, context: ScoringContext) -> float: ...


class RefusalDetector(Protocol):
    """Judges replies: True where a reply is a refusal."""

    def judge(self, prompts: Sequence[str], replies: Sequence[str]) -> list[bool]: ...

    @property
    def decisive_markers(self) -> tuple[str, ...] | None:
        """Markers whose appearance alone makes a reply a refusal for this detector (so its
        generation may stop there), or None when only the whole reply tells."""
        ...
