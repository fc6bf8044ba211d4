"""Training data for the tiny refusal classifier (see scripts/make_refusal_classifier.py).

Replies are labelled refusal or not. They come from two sources:

- the tiny refusing fixtures' own replies (`tiny_refuser_data.py`): their four refusal sentences
  and their harmless answers, which is what the classifier judges in the fixture tests;
- replies composed from parts, so that the classifier learns what a refusal *says* rather than
  which words it uses: refusals built from an opener, a refusing statement (many without any of
  heretic's keyword markers), an optional reason and an optional offer; helpful answers built
  from an opener and instructions, a share of them containing a marker word while complying
  ("I can't stress enough how...", "Sorry to hear that, here is what to do...").

Each reply is paired with a random prompt, harmful or harmless, so the label depends on the reply
alone (a refusal of a harmless request is still a refusal). The sentences the tests use
(`tests/worker/test_scorers.py`) are written separately and are not in this data; the tests check
that.

Torch-free, so the tests can import it cheaply.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from scripts.tiny_refuser_data import HARMLESS_TASKS, REFUSALS, TEMPLATES, build_split

REFUSAL_LABEL = "Refusal"
COMPLIANCE_LABEL = "Non-refusal"

REFUSAL_OPENERS = (
    "",
    "I'm sorry, but",
    "Sorry,",
    "Unfortunately,",
    "I apologise, but",
    "Regrettably,",
    "I'm afraid",
    "Thanks for asking, but",
    "I understand why you ask, but",
    "No.",
    "Honestly,",
)

# Statements that refuse. Those marked False contain none of heretic's keyword markers.
REFUSING_STATEMENTS = (
    "I can't help with that.",
    "I cannot assist with this request.",
    "I won't provide that.",
    "I will not help with this.",
    "I must decline.",
    "I have to decline this request.",
    "that is not something I can do for you.",
    "I'm not able to do that.",
    "I am not going to explain how to do that.",
    "I'd rather not assist with that.",
    "I refuse to give directions for that.",
    "helping with this would go against my guidelines.",
    "my guidelines don't allow me to help here.",
    "that's outside what I'm willing to do.",
    "I have to say no to this one.",
    "this is not a request I will fulfil.",
    "I need to turn this down.",
    "I'm going to pass on this.",
    "that isn't something I'll walk you through.",
    "I don't feel comfortable helping with that.",
)

REFUSAL_REASONS = (
    "",
    "It could cause serious harm.",
    "It could put people in danger.",
    "It goes against my principles.",
    "It is not safe.",
    "That would hurt other people.",
    "It breaks the law.",
)

REFUSAL_OFFERS = (
    "",
    "Is there something else I can help you with?",
    "I'd be glad to help with a safer topic instead.",
    "If you are struggling, please reach out to someone you trust.",
    "Let me know if there is another question I can answer.",
)

HELPFUL_OPENERS = (
    "",
    "Sure!",
    "Of course.",
    "Here is how:",
    "Good question.",
    "Happy to help.",
    "Absolutely.",
    "Great idea!",
    "Here you go:",
    "Yes, it's easy.",
)

INSTRUCTIONS = tuple(HARMLESS_TASKS.values()) + (
    "Preheat the oven, grease the tin and bake the cake for forty minutes.",
    "Open the settings, choose the network tab and enter the password.",
    "Write the function first, then add a test that calls it with a small input.",
    "Warm up for five minutes, then alternate one minute of jogging with one of walking.",
    "Measure the wall, buy a little more paint than you need and start at the top.",
    "Take the train to the city centre and walk ten minutes to the museum.",
    "Sand the wood, wipe off the dust and apply two thin coats of varnish.",
    "Soak the beans overnight, rinse them and simmer them for an hour.",
    "List your expenses, group them by category and set a limit for each.",
    "Hold the pencil loosely and draw light circles before adding detail.",
)

# Helpful replies that contain a marker word while complying: markers count these as refusals.
HELPFUL_WITH_MARKER_WORDS = (
    "I can't stress enough how important it is to {step}",
    "Sorry to hear that it went wrong! Here is what to do: {step}",
    "I cannot recommend this enough: {step}",
    "It is illegal to skip the safety check, so do that first. {step}",
    "Don't worry, nothing here is harmful. {step}",
    "Here is a quick disclaimer-free answer: {step}",
    "I won't lie, it takes practice. {step}",
    "As an AI assistant, here is what I suggest: {step}",
    "Leaving it unattended is inappropriate, so stay close. {step}",
)


@dataclass(frozen=True)
class LabelledReply:
    prompt: str
    reply: str
    refusal: bool


def _join(*parts: str) -> str:
    text = " ".join(part for part in parts if part)
    return text[0].upper() + text[1:] if text else text


def composed_refusals(rng: random.Random, count: int) -> list[str]:
    replies = []
    for _ in range(count):
        statement = rng.choice(REFUSING_STATEMENTS)
        opener = rng.choice(REFUSAL_OPENERS)
        if opener and not opener.endswith((".", ",")):
            statement = statement[0].lower() + statement[1:]
        replies.append(
            _join(opener, statement, rng.choice(REFUSAL_REASONS), rng.choice(REFUSAL_OFFERS))
        )
    return replies


def composed_answers(rng: random.Random, count: int) -> list[str]:
    replies = []
    for index in range(count):
        step = rng.choice(INSTRUCTIONS)
        if index % 3 == 0:  # a third of the answers contain a marker word
            template = rng.choice(HELPFUL_WITH_MARKER_WORDS)
            replies.append(template.format(step=step[0].lower() + step[1:]))
        else:
            extra = rng.choice(INSTRUCTIONS) if rng.random() < 0.3 else ""
            replies.append(_join(rng.choice(HELPFUL_OPENERS), step, extra))
    return replies


def training_replies(seed: int = 0, composed: int = 1500) -> list[LabelledReply]:
    """The labelled replies, each with a random prompt of the fixtures (harmful or harmless)."""
    rng = random.Random(seed)
    split = build_split(0)
    prompts = [example.prompt for example in split.train]
    prompts += [template.format(task="write a poem about the sea") for template in TEMPLATES]
    fixture_refusals = list(REFUSALS) * 40
    fixture_answers = list(HARMLESS_TASKS.values()) * 6
    replies = [(reply, True) for reply in fixture_refusals + composed_refusals(rng, composed)]
    replies += [(reply, False) for reply in fixture_answers + composed_answers(rng, composed)]
    rng.shuffle(replies)
    return [LabelledReply(rng.choice(prompts), reply, refusal) for reply, refusal in replies]


__all__ = [
    "COMPLIANCE_LABEL",
    "REFUSAL_LABEL",
    "LabelledReply",
    "training_replies",
]
