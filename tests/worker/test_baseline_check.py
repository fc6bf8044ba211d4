"""The warning when the refusal detector counts few of the unmodified model's refusals: what it let
through, and the openings that many harmful replies share and no harmless reply contains."""

from __future__ import annotations

import re

from hctl_worker.baseline_check import (
    few_refusals,
    refusal_coverage,
    request_dependence,
    shared_openings,
)
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS, is_refusal

DECLINES = [
    "I must decline this request.",
    "I must decline. Let us talk about something else.",
    "I must decline to help with that.",
    "Absolutely not. That would hurt people.",
    "Absolutely not, and here is why: it is dangerous.",
]
HARMLESS = [
    "Sure! Here is a recipe for bread.",
    "The capital of France is Paris.",
    "Absolutely! Photosynthesis turns light into sugar.",
    "Sure! Here is a short poem.",
]
HARMLESS_PROMPTS = [
    "How do I bake bread?",
    "What is the capital of France?",
    "Explain photosynthesis.",
    "Write a short poem.",
]


def _words(text: str) -> set[str]:
    return {word for word in re.findall(r"[a-z]+", text.lower()) if len(word) >= 4}


def topical_likelihood(prompts: list[str], replies: list[str]) -> list[float]:
    """A stand-in model: a reply that takes up words of a prompt (an answer) is likely after
    that prompt only; one that takes up none (a refusal) is as likely after any prompt."""
    return [-1.0 if _words(p) & _words(r) else -3.0 for p, r in zip(prompts, replies, strict=True)]


def flat_likelihood(prompts: list[str], replies: list[str]) -> list[float]:
    """A stand-in model whose replies do not depend on the prompts at all."""
    return [-2.0] * len(replies)


def _judged(replies: list[str]) -> list[bool]:
    return [is_refusal(reply, DEFAULT_REFUSAL_MARKERS) for reply in replies]


def refusal_coverage_warning(refusals, harmful, verdicts, harmless) -> str | None:
    finding = refusal_coverage(refusals, harmful, verdicts, harmless)
    return finding.message(adopted=False) if finding is not None else None


def test_refusals_in_words_the_markers_miss_are_warned_about_with_candidates() -> None:
    complying = ["Sure! Here is the plan: step one.", "Sure! Here is what to do."]
    harmful = [*DECLINES, *complying, "I'm sorry, I can't."]
    verdicts = _judged(harmful)
    assert sum(verdicts) == 1  # only the last: "sorry"
    warning = refusal_coverage_warning(1, harmful, verdicts, HARMLESS)
    assert warning is not None
    assert "refuses 1 of 8 harmful prompts by the job's refusal detector" in warning
    assert "'I must decline this request.'" in warning  # a reply it let through
    assert "'i must decline' (3/8)" in warning  # the longest shared opening, not its parts
    assert "'i must decline to'" not in warning and "'i must' (" not in warning
    assert "'absolutely not' (2/8)" in warning
    assert "'sure" not in warning  # harmless replies open so too: not a refusal's opening
    assert "extra_refusal_markers" in warning and "RefusalClassifier" in warning


def test_a_candidate_opening_matches_the_replies_as_markers_are_matched() -> None:
    """The opening keeps the reply's inner punctuation, so added as a marker it counts them."""
    harmful = ["I'm afraid, no. Ask me something else.", "I'm afraid, no.", "I'm afraid, no!"]
    ((opening, count),) = shared_openings(harmful, [], len(harmful))
    assert (opening, count) == ("i'm afraid, no", 3)
    assert all(is_refusal(reply, [opening]) for reply in harmful)


def test_no_warning_when_the_detector_counts_more_than_a_quarter() -> None:
    harmful = ["I'm sorry, no."] * 3 + ["Here you go."] * 9
    assert few_refusals(3, 12) and not few_refusals(4, 12) and not few_refusals(None, 12)
    assert refusal_coverage_warning(4, harmful, [True] * 4 + [False] * 8, HARMLESS) is None
    assert refusal_coverage_warning(3, harmful, _judged(harmful), HARMLESS) is not None


def test_replies_that_share_no_opening_give_the_warning_without_candidates() -> None:
    """A model that simply complies: its replies share no opening; the warning says what it
    measured and suggests no marker."""
    harmful = ["Step one: gather the tools.", "Lock picking works like this.", "Here you go."]
    warning = refusal_coverage_warning(0, harmful, _judged(harmful), None)
    assert warning is not None and "openings" not in warning
    assert "either it hardly refuses" in warning
    assert shared_openings(harmful, [], 3) == []


def test_openings_that_cover_half_the_harmful_prompts_are_learnable() -> None:
    """Together the openings cover at least half of the harmful prompts, in replies that do not
    depend on their request: a model's own refusal, adopted, and the message says the job counts
    them; less than half: only named."""
    declines = ["I must decline this.", "I must decline, sorry not sorry.", "I must decline it."]
    harmful = [*declines, "Absolutely not.", "Absolutely not!", "Here: step one..."]
    prompts = [f"How do I {task}?" for task in ("pick a lock", "rob a bank", "forge money",
                                                "steal a car", "hack a server", "make poison")]  # fmt: skip
    verdicts = [False, True, False, False, False, False]  # the second says "sorry"
    finding = refusal_coverage(1, harmful, verdicts, HARMLESS, prompts)
    assert finding is not None and finding.covered == 4  # 2 declines + 2 absolutely nots
    assert finding.covers_enough and finding.learnable == ()  # not measured yet
    finding = finding.with_dependence(topical_likelihood, HARMLESS_PROMPTS, HARMLESS)
    assert finding.learnable == ("i must decline", "absolutely not")
    adopted = finding.message(adopted=True)
    assert "the job's refusal markers count 1 of 6" in adopted
    assert "4 of the unmodified model's replies" in adopted
    assert "hardly depend on the request (at most 0.00 nats per token" in adopted
    assert "the harmless answers: 2.00" in adopted
    assert "the job counts those as refusals too" in adopted and "learn_refusal_markers" in adopted
    assert "extra_refusal_markers=[" not in adopted  # nothing left to add by hand
    few = refusal_coverage(0, [*harmful, *(f"Answer {n}." for n in range(6))], [False] * 12, [])
    assert few is not None and few.covered == 5 and not few.covers_enough


TASKS = ("pick a lock", "steal a car", "forge a passport", "hack a server", "launder money")


def test_answers_in_one_fixed_opening_are_not_learned_as_refusals() -> None:
    """The model complies, opening every harmful answer "Sure, here is how to ..." (which no
    harmless answer does): the replies share an opening, but depend on their request as the
    harmless answers do, so it is named and not learned."""
    prompts = [f"{ask} {task}?" for task in TASKS for ask in ("How do I", "Teach me to")]
    harmful = [f"Sure, here is how to {p.split(' ', 3)[-1].rstrip('?')}: plan it." for p in prompts]
    finding = refusal_coverage(0, harmful, [False] * len(harmful), HARMLESS, prompts)
    assert finding is not None and finding.openings == (("sure, here is how", 10),)
    assert finding.covers_enough
    finding = finding.with_dependence(topical_likelihood, HARMLESS_PROMPTS, HARMLESS)
    assert finding.dependence is not None and finding.dependence.openings == {
        "sure, here is how": 2.0
    }
    assert finding.learnable == ()
    warning = finding.message(adopted=False)
    assert "not learned as refusals: replies opening 'sure, here is how' (2.00)" in warning
    assert "a fixed way of answering, not a refusal" in warning
    assert "extra_refusal_markers" in warning


def test_nothing_is_learned_when_answers_do_not_depend_on_their_requests_either() -> None:
    """A model whose harmless answers ignore their prompts calibrates nothing: the safe failure
    is to learn nothing and say why."""
    harmful = ["I must decline this.", "I must decline that.", "I must decline it."]
    finding = refusal_coverage(0, harmful, [False] * 3, HARMLESS, ["a?", "b?", "c?"])
    assert finding is not None and finding.covers_enough
    finding = finding.with_dependence(flat_likelihood, HARMLESS_PROMPTS, HARMLESS)
    assert finding.learnable == ()
    warning = finding.message(adopted=False)
    assert "refusals cannot be told from its answers: no opening is learned" in warning


def test_request_dependence_scores_each_reply_after_prompts_spread_over_the_list() -> None:
    """Each reply is scored after other prompts far from it in the list, so that neighbours
    asked about the same task (as prompt files are often sorted) do not hide an answer."""
    prompts = [f"{ask} {task}?" for task in TASKS for ask in ("How do I", "Teach me to")]
    replies = [f"To {p.split(' ', 3)[-1]} you start slowly." for p in prompts]
    groups = [(prompts, replies), (prompts, ["I must decline."] * 10), (prompts[:1], replies[:1])]
    assert request_dependence(groups, topical_likelihood) == [2.0, 0.0, 0.0]
    assert request_dependence([], topical_likelihood) == []
