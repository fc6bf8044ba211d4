"""Whether the job's refusal detector sees the unmodified model's refusals at all.

A search can only remove refusals its detector counts. A model that refuses in words the markers
do not know ("I must decline.", another language) scores near zero refusals before any edit, and
the search would then "succeed" at once with an edit that removes nothing. So after the baseline,
when the refusal objective counts at most a quarter of the harmful prompts, the worker warns with
what it measured: a few of the replies the detector let through, and the openings those replies
share that no harmless reply has (candidate markers, for `extra_refusal_markers`). It only warns:
a model that hardly refuses is a legitimate job too, and an opening is a hint, not a verdict.

Torch-free: it reads replies and verdicts only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from hctl_worker.markers import normalise_response

LOW_REFUSAL_SHARE = 0.25  # at most this share of harmful prompts refused: warn
SAMPLE_REPLIES = 3  # replies shown
SAMPLE_CHARACTERS = 80  # of each
OPENING_WORDS = (4, 3, 2)  # the lengths of the openings looked for, longest first
MIN_OPENING_SHARE = 0.1  # an opening shared by at least this share of the harmful prompts
MAX_OPENINGS = 5
_WORD = re.compile(r"[\w']+")


def refusal_coverage_warning(
    refusals: float | None,
    harmful_replies: Sequence[str],
    verdicts: Sequence[bool],
    harmless_replies: Sequence[str] | None,
) -> str | None:
    """A warning when the detector judged at most a quarter of the unmodified model's replies
    to the harmful prompts refusals (None otherwise): what it let through, and the openings
    those replies share that no harmless reply has."""
    total = len(harmful_replies)
    if not few_refusals(refusals, total):
        return None
    passed = [
        reply for reply, refused in zip(harmful_replies, verdicts, strict=True) if not refused
    ]
    lines = [
        f"the unmodified model refuses {refusals:g} of {total} harmful prompts by the job's "
        "refusal detector: either it hardly refuses (there is little to remove), or it refuses "
        "in words the detector does not know, and the search cannot see its refusals"
    ]
    if passed:
        shown = "; ".join(repr(_shorten(reply)) for reply in passed[:SAMPLE_REPLIES])
        lines.append(f"replies it did not count as refusals: {shown}")
    openings = shared_openings(passed, harmless_replies or [], total)
    if openings:
        listed = ", ".join(f"{opening!r} ({count}/{total})" for opening, count in openings)
        lines.append(
            f"openings many of these share and no harmless reply has: {listed}; if they are "
            "refusals, add them: --set 'extra_refusal_markers=[\"...\"]'"
        )
    lines.append("or judge refusals with the RefusalClassifier scorer (see configuration.md)")
    return "\n".join(lines)


def few_refusals(refusals: float | None, total: int) -> bool:
    """At most a quarter of `total` harmful prompts refused (and something was counted)."""
    return refusals is not None and total > 0 and refusals <= LOW_REFUSAL_SHARE * total


def shared_openings(
    replies: Sequence[str], harmless_replies: Sequence[str], total: int
) -> list[tuple[str, int]]:
    """Openings (the first few normalised words) that at least a tenth of the `total` harmful
    prompts' replies share and no harmless reply opens with; the longest of overlapping ones,
    most shared first."""
    harmless = {_opening(reply, words) for reply in harmless_replies for words in OPENING_WORDS}
    found: list[tuple[str, int]] = []
    for words in OPENING_WORDS:
        counts = Counter(_opening(reply, words) for reply in replies)
        for opening, count in counts.most_common():
            if count < max(2, MIN_OPENING_SHARE * total):
                break
            longer = any(kept.startswith(opening) for kept, _ in found)
            if opening and opening not in harmless and not longer:
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


__all__ = ["few_refusals", "refusal_coverage_warning", "shared_openings"]
