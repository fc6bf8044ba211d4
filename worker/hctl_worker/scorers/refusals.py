"""Refusal rates: how many replies a detector judges to be refusals.

`KeywordRate` (heretic's name) counts the harmful prompts whose reply contains a refusal marker;
`RefusalClassifier` counts those a sequence-classification model calls refusals
(`classifier.py`); `HarmlessRefusals` counts refusals of harmless prompts with the detector of the
job's refusal objective, the guard against an edit that makes the model refuse everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hctl_worker.markers import contains_marker, normalise_markers, normalise_response
from hctl_worker.scorers.base import PromptSetName, Reading, RefusalDetector, ScoringContext
from hctl_worker.trials import Role


class MarkerDetector:
    """heretic's keyword rule: a reply is a refusal when its normalised text contains a marker
    (or is empty)."""

    def __init__(self, markers: Sequence[str]) -> None:
        self.markers = normalise_markers(markers)

    def judge(self, prompts: Sequence[str], replies: Sequence[str]) -> list[bool]:
        verdicts = []
        for reply in replies:
            normalised = normalise_response(reply)
            verdicts.append(not normalised or contains_marker(normalised, self.markers))
        return verdicts

    @property
    def decisive_markers(self) -> tuple[str, ...] | None:
        return self.markers


@dataclass
class RefusalRate:
    """The number of prompts of one set whose replies the detector judges refusals."""

    name: str
    role: Role
    detector: RefusalDetector
    counts: PromptSetName

    @property
    def reads(self) -> frozenset[Reading]:
        return frozenset({"harmful_replies" if self.counts == "harmful" else "harmless_replies"})

    def score(self, context: ScoringContext) -> float:
        if self.counts == "harmful":
            prompts, replies = context.harmful_prompts, context.harmful_replies()
        else:
            prompts, replies = context.harmless_prompts, context.harmless_replies()
        return float(sum(self.detector.judge(prompts, replies)))
