"""The job's scorers together: which run, in what order, what the search does with each.

`Scoring` runs its scorers on one trial's context and returns the trial's named `Score`s. The
scorers that need replies (generation: most of a trial's time) run last, and are skipped when
the damage objective already shows a broken model (`kl_skip_threshold`). A guard scorer (the
refusals on harmless prompts) gets a limit from the unmodified model's own value: a trial above
it is not acceptable (see `trials.Trial.acceptable` and the study's constraint).

The guards are not measured for a trial the current front already beats on every objective
(`score(front=...)`): it cannot be on the front whether or not it is acceptable, so its guard
scores are left unmeasured (None), as a pruned trial's are.

Pruning (`pruning.py`) stops a trial's harmful replies once its refusals put it behind the
front. It is sound only where the front is the two objectives the refusal count and its damage
measure, and the count is decided while the replies are generated (markers): `can_prune` says
so. A pruned trial keeps the count that stopped it (a lower bound) and skips the reply scorers
left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hctl_worker.scorers.base import REPLIES, PromptSetName, Reading, Scorer, ScoringContext
from hctl_worker.trials import Direction, Score, Trial, behind_front


@dataclass(frozen=True)
class Begun:
    """A trial's scoring half done (`Scoring.begin`): the values so far, and whether the reply
    scorers are skipped (a broken model)."""

    values: dict[str, float | None]
    skip: bool


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

    def stop_markers(self, prompt_set: PromptSetName) -> tuple[str, ...] | None:
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

    @property
    def can_prune(self) -> bool:
        """Two objectives, refusals and damage, with the refusals counted by markers while the
        harmful replies are generated: then a trial behind the front can stop early."""
        roles = sorted(entry.scorer.role for entry in self.objectives)
        refusals = next((e for e in self.objectives if e.scorer.role == "refusals"), None)
        return (
            roles == ["damage", "refusals"]
            and refusals is not None
            and refusals.scorer.reads == frozenset({"harmful_replies"})
            and self.stop_markers("harmful") is not None
        )

    def score(
        self,
        context: ScoringContext,
        refusal_limit: Callable[[float], int | None] | None = None,
        front: Sequence[Trial] | None = None,
    ) -> dict[str, Score]:
        """Every scorer's score for the model as the context sees it, in the settings' order.
        `refusal_limit(damage)` is the refusal count at which the trial stops mattering (used
        only when `can_prune`). With `front` (the current Pareto front), the guards are not
        measured for a trial that front already beats on every objective: whether it is
        acceptable cannot change the front, now or later (`trials.behind_front`)."""
        return self.finish(context, self.begin(context, refusal_limit), front)

    def begin(
        self,
        context: ScoringContext,
        refusal_limit: Callable[[float], int | None] | None = None,
    ) -> Begun:
        """The first half of `score`: the scores that need no replies, and from the damage the
        refusal limit (set on the context) and whether the reply scorers are skipped."""
        values: dict[str, float | None] = {}
        cheap = [entry for entry in self.active if not entry.scorer.reads & REPLIES]
        for entry in cheap:
            values[entry.scorer.name] = entry.scorer.score(context)
        damage = self._damage(values)
        skip = (
            self.kl_skip_threshold is not None
            and damage is not None
            and not (damage <= self.kl_skip_threshold)
        )
        if refusal_limit is not None and damage is not None and self.can_prune and not skip:
            context.limit_refusals(refusal_limit(damage))
        return Begun(values, skip)

    def reads_next(self, begun: Begun) -> frozenset[Reading]:
        """What `finish` reads whatever the replies say: the replies the scorers other than the
        guards read (nothing when they are skipped)."""
        if begun.skip:
            return frozenset()
        rest = [
            entry
            for entry in self.active
            if entry.scorer.name not in begun.values and entry.scorer.name not in self.limits
        ]
        return frozenset().union(*(entry.scorer.reads for entry in rest))

    def finish(
        self, context: ScoringContext, begun: Begun, front: Sequence[Trial] | None = None
    ) -> dict[str, Score]:
        """The second half of `score`: the reply scorers, then the guards."""
        values, skip = dict(begun.values), begun.skip
        stopped = False  # a scorer met the harmful replies stopped at the limit
        guards = [entry for entry in self.active if entry.scorer.name in self.limits]
        for entry in [entry for entry in self.active if entry not in guards] + guards:
            name = entry.scorer.name
            if name in values:
                continue
            if skip or stopped:
                values[name] = None
                continue
            if entry in guards and front is not None and self._behind(front, values, context):
                values[name] = None
                continue
            # Replies made before (for trials evaluated together) may have stopped already.
            reads_harmful = "harmful_replies" in entry.scorer.reads
            value = None if context.pruned and reads_harmful else entry.scorer.score(context)
            # The replies stopped at the limit: the count that stopped them is what is known.
            stopped = context.pruned and reads_harmful
            values[name] = context.refusals_so_far if stopped else value
        return {
            entry.scorer.name: self._record(entry, values[entry.scorer.name], context)
            for entry in self.active
        }

    def _behind(
        self, front: Sequence[Trial], values: dict[str, float | None], context: ScoringContext
    ) -> bool:
        """Whether the front beats a trial with these objective values on every one."""
        scores = {
            entry.scorer.name: self._record(entry, values.get(entry.scorer.name), context)
            for entry in self.objectives
        }
        return behind_front(front, Trial(number=0, scores=scores).objectives())

    def _damage(self, values: dict[str, float | None]) -> float | None:
        """The damage objective's value (the first one), if it was measured."""
        damage = next((e for e in self.objectives if e.scorer.role == "damage"), None)
        return values.get(damage.scorer.name) if damage is not None else None

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
