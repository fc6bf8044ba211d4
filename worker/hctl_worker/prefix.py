"""The shared prompt prefix: tokens every prompt starts with (usually the chat template's system
turn), computed once per model state instead of once per prompt.

Its keys and values are computed once per model state (`refresh`) and copied to every row of a
batch, so a prefill only runs the rest of each prompt. A row then reads prefix + padding + its own
tokens, with positions continuing from the prefix, which is the same computation as the
left-padded prompt. The evaluator checks that on the model before it relies on it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from hctl_worker.encoding import cache_option, forward_options, new_cache, returned_cache
from hctl_worker.replay import Recording, record, replaying

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel


class SharedPrefix:
    """Tokens every prompt starts with, and their keys and values for the model as it is now."""

    MINIMUM_TOKENS = 4

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids  # [1, length] on the input device
        self.cache = None
        self.recording: Recording | None = None  # the unmodified model's pass, for replays

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @classmethod
    def find(cls, loaded: LoadedModel, texts: Sequence[str]) -> SharedPrefix | None:
        """The longest token prefix of all texts, leaving every text at least one token."""
        ids = loaded.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if not ids or any(not row for row in ids):
            return None
        length = min(len(row) for row in ids) - 1
        first = ids[0]
        for row in ids[1:]:
            same = 0
            while same < length and row[same] == first[same]:
                same += 1
            length = same
        if length < cls.MINIMUM_TOKENS:
            return None
        return cls(torch.tensor([first[:length]], dtype=torch.long, device=loaded.input_device))

    def refresh(
        self,
        model: torch.nn.Module,
        layers: Sequence[torch.nn.Module] = (),
        start: int = 0,
    ) -> None:
        """Compute the prefix's keys and values with the model as it is now; layers below
        `start` are replayed from the recording (they are unchanged since it was made)."""
        cache = new_cache(model)
        replay = (
            replaying(layers, self.recording, start, cache)
            if start > 0 and self.recording is not None
            else nullcontext()
        )
        with torch.inference_mode(), replay:
            outputs = self._forward(model, cache)
        self.cache = returned_cache(outputs, cache)

    def record(
        self, model: torch.nn.Module, layers: Sequence[torch.nn.Module], checkpoints, depth: int
    ) -> None:
        """Record the (unmodified) model's prefix pass for later replays, and keep its cache."""
        cache = new_cache(model)
        with torch.inference_mode():
            self.recording = record(
                layers, cache, lambda: self._forward(model, cache), checkpoints, depth
            )
        self.cache = cache

    def _forward(self, model: torch.nn.Module, cache):
        return model(
            input_ids=self.input_ids,
            attention_mask=torch.ones_like(self.input_ids),
            position_ids=torch.arange(self.length, device=self.input_ids.device)[None],
            use_cache=True,
            **cache_option(model, cache),
            **forward_options(model),
        )

    def kept(self) -> SharedPrefix:
        """A copy that keeps the keys and values as they are now: a later `refresh` gives the
        original new ones and leaves the copy's (for a trial sharing a generation with others,
        `generation.Lane`)."""
        return copy.copy(self)

    def supported(self) -> bool:
        """Only full-attention key/value caches can be copied row by row like this."""
        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)

    def copy_for(self, model: torch.nn.Module, rows: int):
        cache = new_cache(model)
        for index, layer in enumerate(self.cache.layers):
            cache.update(
                layer.keys.expand(rows, -1, -1, -1).contiguous(),
                layer.values.expand(rows, -1, -1, -1).contiguous(),
                index,
            )
        return cache


__all__ = ["SharedPrefix"]
