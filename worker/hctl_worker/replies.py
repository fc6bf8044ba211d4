"""One greedy reply as it grows, and the verdict on it.

A reply takes a pass's greedy tokens for as long as the drafted tokens match them, and ends at
the model's stop token, at its length limit, or (with refusal markers) at its first marker:
a reply holding a marker is a refusal whatever follows.
"""

from __future__ import annotations

from collections.abc import Callable

from hctl_worker.markers import contains_marker, normalise_response

# How many of a reply's latest tokens are decoded each step to look for a marker.
MARKER_WINDOW_TOKENS = 32


class Reply:
    """One row's reply as it grows, and whether (and how) it is finished."""

    def __init__(self, index: int, position: int, lane: int = 0) -> None:
        self.index = index  # the prompt's index in the caller's list
        self.lane = lane  # the trial it answers for, of those sharing a generation
        self.tokens: list[int] = []
        self.position = position  # position id of the next token to feed
        self.done = False
        self.refused = False
        self.stopped = False  # ended by the model's stop token


def accept(
    reply: Reply,
    choices: list[int],
    draft: list[int],
    stop_ids: set[int],
    max_new_tokens: int,
    tokenizer,
    markers: tuple[str, ...] | None,
    finish: Callable[[Reply, bool], None],
) -> int:
    """Add a pass's greedy tokens to `reply`: the model's choice at each position, for as long as
    it equals the drafted token there (then the next position's choice counts too). Stops at the
    end of the reply (EOS, a marker, the length). Returns how many drafted tokens were kept."""
    kept = 0
    for offset, token in enumerate(choices):
        if token in stop_ids:
            reply.stopped = True
            finish(reply, refused(tokenizer, reply.tokens, markers))
            break
        reply.tokens.append(token)
        if markers is not None and marker_in(tokenizer, reply.tokens, markers):
            finish(reply, True)
            break
        if len(reply.tokens) >= max_new_tokens:
            finish(reply, refused(tokenizer, reply.tokens, markers))
            break
        if offset < len(draft) and draft[offset] == token:
            kept += 1
            continue
        break
    return kept


def refused(tokenizer, tokens: list[int], markers: tuple[str, ...] | None) -> bool:
    """The verdict on a finished reply: empty or holding a marker (never, without markers)."""
    if markers is None:
        return False
    normalised = normalise_response(tokenizer.decode(tokens, skip_special_tokens=True))
    return not normalised or contains_marker(normalised, markers)


def marker_in(tokenizer, tokens: list[int], markers: tuple[str, ...]) -> bool:
    """Whether the reply so far contains a marker. Only the recent tokens can complete one, so
    only they are decoded first; a hit is confirmed on the whole reply."""
    recent = normalise_response(
        tokenizer.decode(tokens[-MARKER_WINDOW_TOKENS:], skip_special_tokens=True)
    )
    if not contains_marker(recent, markers):
        return False
    return contains_marker(
        normalise_response(tokenizer.decode(tokens, skip_special_tokens=True)), markers
    )


__all__ = ["MARKER_WINDOW_TOKENS", "Reply", "accept", "marker_in", "refused"]
