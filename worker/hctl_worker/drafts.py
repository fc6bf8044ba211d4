"""Draft replies: what a prompt's reply is likely to be, so several greedy tokens are checked in
one forward pass instead of one pass per token.

A trial's edit is small, so its greedy reply to a prompt usually starts like the unmodified
model's reply, or like the reply an earlier, similar trial gave. The generation engine feeds such
a draft after the reply so far and keeps the draft's tokens for as long as each is the edited
model's own greedy choice (the logits at every position say so); the first token that differs
is replaced by the model's choice, and the rest of the draft is masked out. The reply is the
same as token-by-token greedy decoding; only the number of forward passes changes.

Drafts come from a trie per prompt of the replies seen so far, each branch counted: the draft
for a reply so far follows the most frequent continuation below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# A prompt's trie stops growing at this many tokens (a long search sees many different replies).
MAX_NODES_PER_PROMPT = 4096


@dataclass
class _Node:
    count: int = 0
    children: dict[int, _Node] = field(default_factory=dict)


class DraftStore:
    """The replies seen so far for each prompt (by its index), as drafts for the next ones."""

    def __init__(self, max_nodes_per_prompt: int = MAX_NODES_PER_PROMPT) -> None:
        self._roots: dict[int, _Node] = {}
        self._sizes: dict[int, int] = {}
        self.max_nodes = max_nodes_per_prompt

    def add(self, prompt: int, tokens: Sequence[int]) -> None:
        """Remember one greedy reply (its token ids) to `prompt`."""
        node = self._roots.setdefault(prompt, _Node())
        node.count += 1
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                if self._sizes.get(prompt, 0) >= self.max_nodes:
                    return
                child = node.children[token] = _Node()
                self._sizes[prompt] = self._sizes.get(prompt, 0) + 1
            child.count += 1
            node = child

    def draft(self, prompt: int, reply: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens likely to follow `reply`; empty when no stored reply starts so."""
        node = self._roots.get(prompt)
        if node is None or limit <= 0:
            return []
        for token in reply:
            node = node.children.get(token)
            if node is None:
                return []
        drafted: list[int] = []
        while node.children and len(drafted) < limit:
            token, node = max(node.children.items(), key=lambda item: item[1].count)
            drafted.append(token)
        return drafted


__all__ = ["DraftStore"]
