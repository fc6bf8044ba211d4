"""Pruning: stop evaluating a trial once it can no longer reach the Pareto front.

A trial's KL divergence is measured first, then its refusals are counted reply by reply. The
count only grows, so once some trial on the current front has a KL no higher than this trial's
and at least `margin` fewer refusals than this trial has already shown, the trial is behind the
front whatever its remaining replies say: it is dominated, and it stays dominated (the front
only gets better). Its evaluation stops there.

A pruned trial is a real result: it is recorded with its KL and its refusal count so far (a
lower bound), flagged `pruned`, reported in events, and told to Optuna as PRUNED, which TPE
counts among its poor trials. It never enters the front. The margin keeps trials that are only
just behind the front fully measured, so the sampler still learns how close they came.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from hctl_worker.trials import Trial, pareto_front

DEFAULT_MARGIN = 0.05  # of the harmful prompts


class PruningBar:
    """The refusal count at which a trial of a given KL is behind the front by the margin."""

    def __init__(self, trials: Iterable[Trial], margin: int = 0) -> None:
        self.front = [
            (trial.refusals, trial.kl)
            for trial in pareto_front(trials)
            if trial.refusals is not None and math.isfinite(trial.kl)
        ]
        self.margin = max(0, int(margin))

    @classmethod
    def for_prompts(cls, trials: Iterable[Trial], total_bad: int, margin: float) -> PruningBar:
        """With the margin as a fraction of the harmful prompts (rounded up)."""
        return cls(trials, math.ceil(max(0.0, margin) * total_bad))

    def refusal_limit(self, kl: float) -> int | None:
        """Refusals at which a trial with KL `kl` is behind the front; None: it cannot be (no
        front trial has a KL as low, or the KL is not a number)."""
        if not math.isfinite(kl):
            return None
        within = [refusals for refusals, front_kl in self.front if front_kl <= kl]
        if not within:
            return None
        return min(within) + self.margin


__all__ = ["DEFAULT_MARGIN", "PruningBar"]
