"""Damage: how far the edited model's next-token distributions moved from the original's.

`KLDivergence` (heretic's name) is the mean over harmless prompts of KL(original ‖ current) for
the first reply token. `MultiTokenKL` follows the original model's own greedy continuation of
each harmless prompt for up to `kl_tokens` tokens and averages the KL over every position of
it, so damage that only shows a few tokens into a reply counts too. With one token it is the
first-token KL.
"""

from __future__ import annotations

from hctl_worker.scorers.base import Reading, ScoringContext
from hctl_worker.trials import Role


class FirstTokenKL:
    """KL(original ‖ now) of the first reply token, averaged over the harmless prompts."""

    name = "KLDivergence"
    role: Role = "damage"
    reads: frozenset[Reading] = frozenset({"first_token"})
    counts = None

    def score(self, context: ScoringContext) -> float:
        return float(context.first_token_divergences().mean())


class MultiTokenKL(FirstTokenKL):
    """KL(original ‖ now) at every position of the original's continuations, each token
    weighing the same."""

    name = "MultiTokenKL"
    reads: frozenset[Reading] = frozenset({"continuation"})

    def score(self, context: ScoringContext) -> float:
        divergences = context.continuation_divergences()
        positions = divergences.mask.sum()
        if int(positions) == 0:
            return 0.0
        return float((divergences.values * divergences.mask).sum() / positions)
