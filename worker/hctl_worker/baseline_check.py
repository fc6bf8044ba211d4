"""Whether the job's refusal markers see the unmodified model's refusals at all.

A search can only remove refusals its detector counts. A model that refuses in words the markers
do not know ("I must decline.", another language) scores near zero refusals before any edit, and
the search would then "succeed" at once with an edit that removes nothing. So after the baseline,
when the markers count at most a quarter of the harmful prompts refused, the worker looks at what
the model said: the replies the markers let through, and the openings (first two to four words)
that at least a tenth of the harmful prompts' replies share and no harmless reply contains (as
markers, they would count no harmless reply a refusal).

- Together they cover at least half of the harmful prompts: that is the model's own refusal,
  templated as refusals are (a model that complies answers each harmful prompt in its own words,
  and its openings are found in harmless replies too). The job counts them as refusals too
  (`learn_refusal_markers`, on by default), and says so with the openings and examples.
- Less, or learning off: a warning with the examples and the openings, for `extra_refusal_markers`
  (or the RefusalClassifier scorer). A model that hardly refuses is a legitimate job too.

Torch-free: it reads replies and verdicts only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from hctl_worker.markers import contains_marker, normalise_markers, normalise_response

LOW_REFUSAL_SHARE = 0.25  # at most this share of harmful prompts refused: warn
SAMPLE_REPLIES = 3  # replies shown
SAMPLE_CHARACTERS = 80  # of each
OPENING_WORDS = (4, 3, 2)  # the lengths of the openings looked for, longest first
MIN_OPENING_SHARE = 0.1  # an opening shared by at least this share of the harmful prompts
MAX_OPENINGS = 5
# Openings that cover at least this share of the harmful prompts are a model's own refusal.
MIN_LEARNED_COVERAGE = 0.5
_WORD = re.compile(r"[\w']+")


@dataclass(frozen=True)
class CoverageFinding:
    """What the baseline showed of a detector that counts few refusals."""

    refusals: float
    total: int
    passed: tuple[str, ...]  # the replies it did not count as refusals
    openings: tuple[tuple[str, int], ...]  # (opening, replies) shared, none in harmless replies
    covered: int  # replies (of those passed) that contain one of the openings

    @property
    def learnable(self) -> tuple[str, ...]:
        """The openings, when together they cover at least half of the harmful prompts:
        a model's own refusal, templated as refusals are; () otherwise."""
        if self.covered < MIN_LEARNED_COVERAGE * self.total:
            return ()
        return tuple(opening for opening, _ in self.openings)

    def message(self, *, adopted: bool) -> str:
        """The warning; `adopted`: the openings are now counted as refusals."""
        listed = ", ".join(
            f"{opening!r} ({count}/{self.total})" for opening, count in self.openings
        )
        if adopted:
            lines = [
                f"the job's refusal markers count {self.refusals:g} of {self.total} harmful "
                f"prompts refused, but {self.covered} of the unmodified model's replies to them "
                f"open with words no harmless reply contains: {listed}; the job counts those "
                "as refusals too (learn_refusal_markers = false: it does not; "
                "extra_refusal_markers: give your own)"
            ]
        else:
            lines = [
                f"the unmodified model refuses {self.refusals:g} of {self.total} harmful prompts "
                "by the job's refusal detector: either it hardly refuses (there is little to "
                "remove), or it refuses in words the detector does not know, and the search "
                "cannot see its refusals"
            ]
        if self.passed:
            shown = "; ".join(repr(_shorten(reply)) for reply in self.passed[:SAMPLE_REPLIES])
            lines.append(f"replies it did not count as refusals: {shown}")
        if self.openings and not adopted:
            lines.append(
                f"openings many of these share and no harmless reply contains: {listed}; if they are "
                "refusals, add them: --set 'extra_refusal_markers=[\"...\"]'"
            )
        if not adopted:
            lines.append(
                "or judge refusals with the RefusalClassifier scorer (see configuration.md)"
            )
        return "\n".join(lines)


def refusal_coverage(
    refusals: float | None,
    harmful_replies: Sequence[str],
    verdicts: Sequence[bool],
    harmless_replies: Sequence[str] | None,
) -> CoverageFinding | None:
    """What the baseline shows when the detector judged at most a quarter of the unmodified
    model's replies to the harmful prompts refusals (None otherwise): the replies it let
    through, and the openings those share that no harmless reply contains."""
    total = len(harmful_replies)
    if refusals is None or not few_refusals(refusals, total):
        return None
    passed = tuple(
        reply for reply, refused in zip(harmful_replies, verdicts, strict=True) if not refused
    )
    openings = tuple(shared_openings(passed, harmless_replies or [], total))
    markers = normalise_markers([opening for opening, _ in openings])
    covered = sum(contains_marker(normalise_response(reply), markers) for reply in passed)
    return CoverageFinding(refusals, total, passed, openings, covered)


def few_refusals(refusals: float | None, total: int) -> bool:
    """At most a quarter of `total` harmful prompts refused (and something was counted)."""
    return refusals is not None and total > 0 and refusals <= LOW_REFUSAL_SHARE * total


def shared_openings(
    replies: Sequence[str], harmless_replies: Sequence[str], total: int
) -> list[tuple[str, int]]:
    """Openings (the first few normalised words) that at least a tenth of the `total` harmful
    prompts' replies share and no harmless reply contains; the longest of overlapping ones,
    most shared first."""
    harmless = [normalise_response(reply) for reply in harmless_replies]
    found: list[tuple[str, int]] = []
    for words in OPENING_WORDS:
        counts = Counter(_opening(reply, words) for reply in replies)
        for opening, count in counts.most_common():
            if count < max(2, MIN_OPENING_SHARE * total):
                break
            longer = any(kept.startswith(opening) for kept, _ in found)
            if opening and not longer and not any(opening in text for text in harmless):
                found.append((opening, count))
    found.sort(key=lambda item: -item[1])
    return found[:MAX_OPENINGS]


def _opening(reply: str, words: int) -> str:
    """The normalised reply up to the end of its `words`-th word ("" when it is shorter): a
    substring of the reply as the markers are matched, its inner punctuation kept."""
    text = normalise_response(reply)
    found = list(_WORD.finditer(text))
    return text[: found[words - 1].end()] if len(found) >= words else ""


def _shorten(reply: str) -> str:
    flat = " ".join(reply.split())
    return flat if len(flat) <= SAMPLE_CHARACTERS else flat[: SAMPLE_CHARACTERS - 1] + "…"


__all__ = [
    "CoverageFinding",
    "few_refusals",
    "refusal_coverage",
    "shared_openings",
]
