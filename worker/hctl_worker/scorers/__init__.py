"""Scorers: the named measures of a trial, and the registry the settings choose from.

```
name               role               measures                                          reads
KeywordRate        refusals           harmful prompts whose reply has a refusal marker   harmful replies
RefusalClassifier  refusals           harmful prompts a classifier says were refused     harmful replies
HarmlessRefusals   harmless_refusals  harmless prompts refused (the objective's detector) harmless replies
KLDivergence       damage             first-token KL(original ‖ edited), harmless prompts first token
MultiTokenKL       damage             KL along the original's own continuations          continuation
```

The settings' `scorers` list says which run and, for each, whether the search minimises it,
maximises it or only reports it; the names are heretic's where heretic has the scorer. A new
scorer is a module with a class following `base.Scorer` and one line in `SCORERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from hctl_worker.scorers.base import RefusalDetector, Scorer
from hctl_worker.scorers.divergence import FirstTokenKL, MultiTokenKL
from hctl_worker.scorers.refusals import MarkerDetector, RefusalRate
from hctl_worker.scorers.scoring import ActiveScorer, Scoring
from hctl_worker.trials import Direction, Role

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel
    from hctl_worker.settings import WorkerSettings

DetectorKind = Literal["markers", "classifier"]


@dataclass
class Workshop:
    """What building scorers may use: the settings, the model (for its device), and refusal
    detectors built once and shared by the scorers that use them."""

    settings: WorkerSettings
    loaded: LoadedModel | None = None
    refusal_detector: DetectorKind = "markers"  # the one the refusal objective uses
    detectors: dict[str, RefusalDetector] = field(default_factory=dict)

    def detector(self, kind: DetectorKind) -> RefusalDetector:
        if kind not in self.detectors:
            self.detectors[kind] = self._build_detector(kind)
        return self.detectors[kind]

    def _build_detector(self, kind: DetectorKind) -> RefusalDetector:
        if kind == "markers":
            from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS

            markers = self.settings.refusal_markers or DEFAULT_REFUSAL_MARKERS
            return MarkerDetector([*markers, *self.settings.extra_refusal_markers])
        from hctl_worker.scorers.classifier import ClassifierDetector

        device = self.loaded.input_device if self.loaded is not None else "cpu"
        return ClassifierDetector(self.settings.refusal_classifier, device)


@dataclass(frozen=True)
class ScorerEntry:
    role: Role
    build: Callable[[Workshop], Scorer]
    detector: DetectorKind | None = None  # the refusal detector it judges replies with


SCORERS: dict[str, ScorerEntry] = {
    "KeywordRate": ScorerEntry(
        "refusals",
        lambda shop: RefusalRate("KeywordRate", "refusals", shop.detector("markers"), "harmful"),
        detector="markers",
    ),
    "RefusalClassifier": ScorerEntry(
        "refusals",
        lambda shop: RefusalRate(
            "RefusalClassifier", "refusals", shop.detector("classifier"), "harmful"
        ),
        detector="classifier",
    ),
    "HarmlessRefusals": ScorerEntry(
        "harmless_refusals",
        lambda shop: RefusalRate(
            "HarmlessRefusals",
            "harmless_refusals",
            shop.detector(shop.refusal_detector),
            "harmless",
        ),
    ),
    "KLDivergence": ScorerEntry("damage", lambda shop: FirstTokenKL()),
    "MultiTokenKL": ScorerEntry("damage", lambda shop: MultiTokenKL()),
}


def refusal_detector_of(choices: Sequence[tuple[str, Direction]]) -> DetectorKind:
    """The detector of the first refusal objective (else of the first refusal scorer)."""
    refusal = [(name, direction) for name, direction in choices if SCORERS[name].detector]
    chosen = next((name for name, direction in refusal if direction != "report"), None)
    if chosen is None and refusal:
        chosen = refusal[0][0]
    return SCORERS[chosen].detector or "markers" if chosen else "markers"


def build_scoring(
    settings: WorkerSettings,
    loaded: LoadedModel | None = None,
    choices: Sequence[tuple[str, Direction]] | None = None,
) -> Scoring:
    """The scorers the settings choose (or `choices`: name and direction pairs), built."""
    if choices is None:
        choices = [(choice.name, choice.optimization) for choice in settings.scorers]
    shop = Workshop(settings, loaded, refusal_detector_of(choices))
    margin = settings.harmless_refusal_margin
    return Scoring(
        [ActiveScorer(SCORERS[name].build(shop), direction) for name, direction in choices],
        kl_skip_threshold=settings.kl_skip_threshold or None,
        harmless_margin=margin if margin < 1 else None,
    )


__all__ = [
    "SCORERS",
    "ActiveScorer",
    "ScorerEntry",
    "Scoring",
    "Workshop",
    "build_scoring",
    "refusal_detector_of",
]
