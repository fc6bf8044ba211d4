"""The job's scorers together: which run, in what order, what the search does with each.

`Scoring` runs its scorers on one trial's context and returns the trial's named `Score`s. The
scorers that need replies (generation: most of a trial's time) run last, and are skipped when
the damage objective already shows a broken model (`kl_skip_threshold`). A guard scorer (the
refusals on harmless prompts) gets a limit from the unmodified model's own value: a trial above
it is not acceptable (see `trials.Trial.acceptable` and the study's constraint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hctl_worker.scorers.base import REPLIES, PromptSet, Reading, Scorer, ScoringContext
from hctl_worker.trials import Direction, Score


@dataclass(frozen=True)
class ActiveScorer:
    scorer: Scorer
    direction: Direction


@dataclass
class Scoring:
    """The job's scorers, in the settings' order."""

    active: Sequence[ActiveScorer]
    kl_skip_threshold: float | None = None  # skip the reply scorers above this damage
    harmless_margin: float | None = None  # a guard's limit: the original's rate + this
    limits: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [entry.scorer.name for entry in self.active]

    @property
    def objectives(self) -> list[ActiveScorer]:
        return [entry for entry in self.active if entry.direction != "report"]

    @property
    def reads(self) -> frozenset[Reading]:
        return frozenset().union(*(entry.scorer.reads for entry in self.active))

    def stop_markers(self, prompt_set: PromptSet) -> tuple[str, ...] | None:
        """Markers at which a reply to this prompt set may stop: only when every scorer that
        reads those replies decides by the same markers alone."""
        reading = "harmful_replies" if prompt_set == "harmful" else "harmless_replies"
        found: set[tuple[str, ...] | None] = set()
        for entry in self.active:
            if reading in entry.scorer.reads:
                detector = getattr(entry.scorer, "detector", None)
                found.add(getattr(detector, "decisive_markers", None))
        if len(found) == 1:
            return next(iter(found))
        return None

    def score(self, context: ScoringContext) -> dict[str, Score]:
        """Every scorer's score for the model as the context sees it, in the settings' order."""
        values: dict[str, float | None] = {}
        cheap = [entry for entry in self.active if not entry.scorer.reads & REPLIES]
        for entry in cheap:
            values[entry.scorer.name] = entry.scorer.score(context)
        skip = self._too_damaged(values)
        for entry in self.active:
            if entry.scorer.name not in values:
                values[entry.scorer.name] = None if skip else entry.scorer.score(context)
        return {
            entry.scorer.name: self._record(entry, values[entry.scorer.name], context)
            for entry in self.active
        }

    def _too_damaged(self, values: dict[str, float | None]) -> bool:
        if self.kl_skip_threshold is None:
            return False
        damage = next(
            (entry for entry in self.objectives if entry.scorer.role == "damage"),
            None,
        )
        value = values.get(damage.scorer.name) if damage is not None else None
        return value is not None and not (value <= self.kl_skip_threshold)

    def _record(self, entry: ActiveScorer, value: float | None, context: ScoringContext) -> Score:
        scorer = entry.scorer
        of = None
        if scorer.counts == "harmful":
            of = len(context.harmful_prompts)
        elif scorer.counts == "harmless":
            of = len(context.harmless_prompts)
        return Score(
            value=value,
            of=of,
            direction=entry.direction,
            role=scorer.role,
            limit=self.limits.get(scorer.name),
        )

    def set_baseline(self, baseline: dict[str, Score]) -> None:
        """Set the guards' limits from the unmodified model's scores: its own harmless refusals
        plus the margin (a share of the prompts)."""
        self.limits.clear()
        if self.harmless_margin is None:
            return
        for name, score in baseline.items():
            if score.role == "harmless_refusals" and score.value is not None and score.of:
                self.limits[name] = score.value + self.harmless_margin * score.of


__all__ = ["ActiveScorer", "Scoring"]
