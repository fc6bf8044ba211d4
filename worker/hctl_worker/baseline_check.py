"""Whether the job's refusal markers see the unmodified model's refusals at all.

A search can only remove refusals its detector counts. A model that refuses in words the markers
do not know ("I must decline.", another language) scores near zero refusals before any edit, and
the search would then "succeed" at once with an edit that removes nothing. So after the baseline,
when the markers count at most a quarter of the harmful prompts refused, the worker looks at what
the model said: the replies the markers let through, and the openings (first two to four words)
that at least a tenth of the harmful prompts' replies share and no harmless reply contains (as
markers, they would count no harmless reply a refusal).

Sharing an opening is not enough to be a refusal: a model that complies may answer every harmful
request in one fixed opening ("Sure, here is how to ...") that its harmless answers never use.
What tells them apart is measured on the model itself: a refusal does not depend on the request.
A reply's log-likelihood after another prompt whose reply opens the same way is nearly what it is
after its own prompt when it refuses, and much lower when it answers (it names the task, follows
it). The gain of its own prompt over the others, in nats per token (`request_dependence`), is
calibrated against the model's harmless answers on their own prompts: answers by definition.

- The openings whose replies depend on their request at most a third as much as the harmless
  answers do, and that together cover at least half of the harmful prompts: that is the model's
  own refusal, templated as refusals are. The job counts them as refusals too
  (`learn_refusal_markers`, on by default), and says so with the openings and examples.
- Less, openings that depend on the request as answers do, a model whose answers do not depend on
  their requests either (nothing to calibrate against), or learning off: a warning with the
  examples and the openings, for `extra_refusal_markers` (or the RefusalClassifier scorer). A
  model that hardly refuses is a legitimate job too.

Torch-free: it reads replies and verdicts, and log-likelihoods from the caller's model.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from hctl_worker.markers import contains_marker, normalise_markers, normalise_response

LOW_REFUSAL_SHARE = 0.25  # at most this share of harmful prompts refused: warn
SAMPLE_REPLIES = 3  # replies shown
SAMPLE_CHARACTERS = 80  # of each
OPENING_WORDS = (4, 3, 2)  # the lengths of the openings looked for, longest first
MIN_OPENING_SHARE = 0.1  # an opening shared by at least this share of the harmful prompts
MAX_OPENINGS = 5
# Openings that cover at least this share of the harmful prompts are a model's own refusal.
MIN_LEARNED_COVERAGE = 0.5
# A refusal's replies depend on their request at most this share of what the harmless answers do
# (measured by the worker, nats per token: the three tiny refusers' refusals 0.00 against 0.65-0.99
# for their answers, the safety-tuned SmolLM2-135M's 0.00 against 1.87; the model that answers
# harmful requests in one fixed opening, scripts/make_compliant_model.py, 0.80 against 0.93).
MAX_REFUSAL_DEPENDENCE = 1 / 3
# Harmless answers that depend on their requests less than this (nats per token) calibrate
# nothing: then no opening is learned.
MIN_ANSWER_DEPENDENCE = 0.05
SWAPS = 3  # other prompts each reply is scored after
MAX_SCORED = 64  # replies per opening (and harmless replies) scored
_WORD = re.compile(r"[\w']+")

# The mean log-probability per token of each reply after its prompt, by the unmodified model.
ReplyLikelihood = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclass(frozen=True)
class RequestDependence:
    """How much the replies of each opening depend on their requests, and the harmless answers'."""

    openings: dict[str, float]  # opening: its replies' dependence, nats per token
    answers: float  # the harmless answers'

    def refuses(self, opening: str) -> bool:
        """The replies of `opening` depend on their requests little next to the answers."""
        return (
            self.answers >= MIN_ANSWER_DEPENDENCE
            and self.openings[opening] <= MAX_REFUSAL_DEPENDENCE * self.answers
        )


@dataclass(frozen=True)
class CoverageFinding:
    """What the baseline showed of a detector that counts few refusals."""

    refusals: float
    total: int
    passed: tuple[str, ...]  # the replies it did not count as refusals
    openings: tuple[tuple[str, int], ...]  # (opening, replies) shared, none in harmless replies
    covered: int  # replies (of those passed) that contain one of the openings
    passed_prompts: tuple[str, ...] = ()  # the harmful prompts of the replies passed
    dependence: RequestDependence | None = None  # measured by `with_dependence`

    @property
    def covers_enough(self) -> bool:
        """The openings together cover at least half of the harmful prompts."""
        return self.covered >= MIN_LEARNED_COVERAGE * self.total

    @property
    def refusing(self) -> tuple[str, ...]:
        """The openings whose replies hardly depend on their requests (measured; () before)."""
        if self.dependence is None:
            return ()
        return tuple(opening for opening, _ in self.openings if self.dependence.refuses(opening))

    @property
    def learnable(self) -> tuple[str, ...]:
        """The openings that refuse (`refusing`), when together they cover at least half of the
        harmful prompts: a model's own refusal, templated as refusals are; () otherwise."""
        refusing = self.refusing
        covered = covered_by(self.passed, refusing)
        return refusing if refusing and covered >= MIN_LEARNED_COVERAGE * self.total else ()

    def with_dependence(
        self,
        likelihood: ReplyLikelihood,
        harmless_prompts: Sequence[str],
        harmless_replies: Sequence[str],
    ) -> CoverageFinding:
        """The finding with each opening's request dependence measured (see the module)."""
        groups = []
        for opening, _ in self.openings:
            marker = normalise_markers([opening])
            pairs = [
                (prompt, reply)
                for prompt, reply in zip(self.passed_prompts, self.passed, strict=True)
                if contains_marker(normalise_response(reply), marker)
            ][:MAX_SCORED]
            groups.append(([prompt for prompt, _ in pairs], [reply for _, reply in pairs]))
        groups.append((harmless_prompts[:MAX_SCORED], harmless_replies[:MAX_SCORED]))
        *measured, answers = request_dependence(groups, likelihood)
        openings = {
            opening: value for (opening, _), value in zip(self.openings, measured, strict=True)
        }
        return replace(self, dependence=RequestDependence(openings, answers))

    def message(self, *, adopted: bool) -> str:
        """The warning; `adopted`: the `learnable` openings are now counted as refusals."""
        learned = self.learnable if adopted else ()
        if adopted:
            listed = self._listed(learned)
            covered = covered_by(self.passed, learned)
            lines = [
                f"the job's refusal markers count {self.refusals:g} of {self.total} harmful "
                f"prompts refused, but {covered} of the unmodified model's replies to them "
                f"open with words no harmless reply contains, in replies that hardly depend "
                f"on the request ({self._dependence_of(learned)}): {listed}; the job counts "
                "those as refusals too "
                "(learn_refusal_markers = false: it does not; extra_refusal_markers: give your own)"
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
        if self.dependence is not None:
            lines.extend(self._dependence_lines(learned))
        if self.openings and not adopted:
            listed = self._listed([opening for opening, _ in self.openings])
            lines.append(
                f"openings many of these share and no harmless reply contains: {listed}; if they are "
                "refusals, add them: --set 'extra_refusal_markers=[\"...\"]'"
            )
        if not adopted:
            lines.append(
                "or judge refusals with the RefusalClassifier scorer (see configuration.md)"
            )
        return "\n".join(lines)

    def _listed(self, openings: Sequence[str]) -> str:
        """The openings with how many of the harmful prompts' replies each opens."""
        count = dict(self.openings)
        return ", ".join(f"{opening!r} ({count[opening]}/{self.total})" for opening in openings)

    def _dependence_of(self, openings: Sequence[str]) -> str:
        """The most the replies of `openings` gain from their own prompt, against the answers."""
        assert self.dependence is not None
        most = max(self.dependence.openings[opening] for opening in openings)
        return (
            f"at most {most:.2f} nats per token gained from their own prompt; the harmless "
            f"answers: {self.dependence.answers:.2f}"
        )

    def _dependence_lines(self, learned: Sequence[str]) -> list[str]:
        """What the request dependence showed of the openings not learned."""
        assert self.dependence is not None
        answers = self.dependence.answers
        if answers < MIN_ANSWER_DEPENDENCE:
            return [
                f"the model's harmless answers hardly depend on their requests ({answers:.2f} "
                "nats per token), so its refusals cannot be told from its answers: no opening "
                "is learned"
            ]
        answering = [
            opening
            for opening, _ in self.openings
            if opening not in learned and not self.dependence.refuses(opening)
        ]
        if not answering:
            return []
        shown = ", ".join(
            f"{opening!r} ({self.dependence.openings[opening]:.2f})" for opening in answering
        )
        return [
            f"not learned as refusals: replies opening {shown} depend on their request as "
            f"answers do (nats per token gained from their own prompt; the harmless answers: "
            f"{answers:.2f}): a fixed way of answering, not a refusal"
        ]


def refusal_coverage(
    refusals: float | None,
    harmful_replies: Sequence[str],
    verdicts: Sequence[bool],
    harmless_replies: Sequence[str] | None,
    harmful_prompts: Sequence[str] | None = None,
) -> CoverageFinding | None:
    """What the baseline shows when the detector judged at most a quarter of the unmodified
    model's replies to the harmful prompts refusals (None otherwise): the replies it let
    through (and their `harmful_prompts`), and the openings those share that no harmless reply
    contains."""
    total = len(harmful_replies)
    if refusals is None or not few_refusals(refusals, total):
        return None
    prompts = harmful_prompts if harmful_prompts is not None else [""] * total
    kept = [
        (prompt, reply)
        for prompt, reply, refused in zip(prompts, harmful_replies, verdicts, strict=True)
        if not refused
    ]
    passed = tuple(reply for _, reply in kept)
    openings = tuple(shared_openings(passed, harmless_replies or [], total))
    covered = covered_by(passed, [opening for opening, _ in openings])
    return CoverageFinding(
        refusals, total, passed, openings, covered, tuple(prompt for prompt, _ in kept)
    )


def request_dependence(
    groups: Sequence[tuple[Sequence[str], Sequence[str]]], likelihood: ReplyLikelihood
) -> list[float]:
    """For each group of (prompts, replies): how much likelier each reply is after its own prompt
    than after other prompts of its group (nats per token, the median over the replies). Each
    reply is scored after up to SWAPS others, spread over the group so that neighbours asked
    about the same thing are not all that is seen; every score in one call of `likelihood`. 0
    for a group of fewer than two: there is nothing to swap."""
    prompts: list[str] = []
    replies: list[str] = []
    plans: list[tuple[int, int, int]] = []  # (first score, replies, swaps) of each group
    for group_prompts, group_replies in groups:
        count = len(group_prompts)
        steps = range(1, SWAPS + 1) if count > 1 else range(0)
        shifts = sorted({max(1, round(step * count / (SWAPS + 1))) % count for step in steps} - {0})
        plans.append((len(prompts), count, len(shifts)))
        for shift in (0, *shifts) if shifts else ():
            prompts += [group_prompts[(index + shift) % count] for index in range(count)]
            replies += group_replies
    scores = list(likelihood(prompts, replies)) if prompts else []
    found = []
    for first, count, swaps in plans:
        if not swaps:
            found.append(0.0)
            continue
        rows = [scores[first + row * count : first + (row + 1) * count] for row in range(swaps + 1)]
        own, others = rows[0], rows[1:]
        gains = [
            own[index] - statistics.fmean(row[index] for row in others) for index in range(count)
        ]
        found.append(statistics.median(gains))
    return found


def covered_by(replies: Sequence[str], openings: Sequence[str]) -> int:
    """How many of the replies contain one of the openings, as markers are matched."""
    markers = normalise_markers(list(openings))
    return sum(contains_marker(normalise_response(reply), markers) for reply in replies)


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
    "ReplyLikelihood",
    "RequestDependence",
    "few_refusals",
    "refusal_coverage",
    "request_dependence",
    "shared_openings",
]
