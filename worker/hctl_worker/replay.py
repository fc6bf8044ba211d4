"""Layer replay: what the unmodified model computes below the first edited layer, recorded once.

A trial edits the output projections of some layers; every layer below the first edited one
computes exactly what the unmodified model computes, for the same tokens. So the prompts' passes
(the KL pass, and a generation's first pass over the prompt and its draft reply) are recorded
once on the unmodified model: each layer's new keys and values, and the hidden state entering
some "checkpoint" layers. A trial whose first edited layer is k then starts at the highest
checkpoint c <= k: layers below c hand back their recorded keys and values (into the cache, as
they would have written them) and, at c - 1, the recorded hidden state, instead of computing.

Only full-attention key/value caches can be replayed like this (the same restriction as the
shared prefix); the evaluator compares a replayed pass with a plain one before it relies on it.
How much is recorded is bounded by a memory budget: keys and values first (a replay needs them for
every layer it skips), then as many evenly spaced checkpoints as fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class DepthPlan:
    """Which layers a recording covers: keys and values of layers below `recorded_layers`, and
    the hidden state entering each layer in `checkpoints` (all at most `recorded_layers`)."""

    recorded_layers: int
    checkpoints: tuple[int, ...]

    def start_for(self, unchanged_layers: int) -> int:
        """The layer a pass starts computing at when the first `unchanged_layers` layers are
        as recorded: the highest checkpoint not above it (0: no replay)."""
        usable = [c for c in self.checkpoints if c <= unchanged_layers]
        return max(usable, default=0)

    @property
    def enabled(self) -> bool:
        return bool(self.checkpoints)


def plan_depth(
    n_layers: int, key_value_bytes: int, hidden_bytes: int, budget_bytes: float
) -> DepthPlan:
    """The deepest, densest plan that fits the budget.

    `key_value_bytes` and `hidden_bytes` are what one layer's recording costs over every recorded
    token (keys + values, and one hidden state). A replay from checkpoint c needs the keys and
    values of the c layers below it, so depth is bought first; checkpoints are then spread evenly
    below the deepest one (every layer when memory allows, every second one, ...). Checkpoints
    run from 1 to n_layers - 1: starting at 0 skips nothing, and a pass must compute a layer.
    """
    if n_layers < 2 or budget_bytes <= 0 or key_value_bytes + hidden_bytes <= 0:
        return DepthPlan(0, ())
    for top in range(n_layers - 1, 0, -1):
        left = budget_bytes - top * key_value_bytes
        if left < hidden_bytes:
            continue
        affordable = int(left // hidden_bytes) if hidden_bytes > 0 else top
        spacing = max(1, math.ceil(top / max(affordable, 1)))
        return DepthPlan(top, tuple(range(top, 0, -spacing))[::-1])
    return DepthPlan(0, ())


@dataclass
class Recording:
    """One pass of the unmodified model, as the layers below a trial's edits will compute it."""

    keys: list[torch.Tensor] = field(default_factory=list)  # per layer: the pass's new columns
    values: list[torch.Tensor] = field(default_factory=list)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its input
    returns_tuple: bool = False  # how the decoder layers return their output

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, *self.hidden.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def first_columns(self, columns: int) -> Recording:
        """The recording of a pass over only the first `columns` of this pass's tokens (a
        causal pass computes them the same whatever follows)."""
        return Recording(
            keys=[keys[:, :, :columns, :] for keys in self.keys],
            values=[values[:, :, :columns, :] for values in self.values],
            hidden={index: hidden[:, :columns] for index, hidden in self.hidden.items()},
            returns_tuple=self.returns_tuple,
        )

    def trim(self, plan: DepthPlan) -> None:
        """Keep only what the plan uses."""
        del self.keys[plan.recorded_layers :]
        del self.values[plan.recorded_layers :]
        self.hidden = {i: h for i, h in self.hidden.items() if i in plan.checkpoints}


def _cache_columns(cache) -> list[int]:
    return [layer.keys.shape[-2] if layer.is_initialized else 0 for layer in cache.layers]


def record(
    layers: Sequence[nn.Module],
    cache,
    run: Callable[[], object],
    checkpoints: Sequence[int],
    recorded_layers: int,
) -> Recording:
    """Run `run()` (one forward pass writing into `cache`) and keep what a replay needs."""
    wanted = set(checkpoints)
    recording = Recording()
    before = _cache_columns(cache) if getattr(cache, "layers", None) else []

    def keep_input(index: int):
        def hook(module, args, kwargs) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            recording.hidden[index] = hidden.detach().clone()

        return hook

    def note_output(module, args, output) -> None:
        recording.returns_tuple = isinstance(output, tuple)

    handles = [layers[i].register_forward_pre_hook(keep_input(i), with_kwargs=True) for i in wanted]
    handles.append(layers[0].register_forward_hook(note_output))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    for index in range(recorded_layers):
        layer = cache.layers[index]
        start = before[index] if index < len(before) else 0
        recording.keys.append(layer.keys[:, :, start:, :].clone())
        recording.values.append(layer.values[:, :, start:, :].clone())
    return recording


def replayable(cache) -> bool:
    """Only plain full-attention key/value caches can take recorded columns like this."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


@contextmanager
def replaying(
    layers: Sequence[nn.Module], recording: Recording, start: int, cache
) -> Iterator[None]:
    """Layers below `start` write their recorded keys and values into `cache` and hand on the
    recorded hidden state instead of computing; `start` must be one of the recording's
    checkpoints (or 0, which replays nothing)."""
    if start <= 0:
        yield
        return
    if start not in recording.hidden or start > len(recording.keys):
        raise ValueError(f"layer {start} was not recorded")
    resume = recording.hidden[start]

    def replay(index: int):
        def forward(hidden_states, *args, **kwargs):
            cache.update(recording.keys[index], recording.values[index], index)
            output = resume if index == start - 1 else hidden_states
            return (output,) if recording.returns_tuple else output

        return forward

    for index in range(start):
        layers[index].forward = replay(index)
    try:
        yield
    finally:
        for index in range(start):
            del layers[index].forward


__all__ = [
    "DepthPlan",
    "Recording",
    "plan_depth",
    "record",
    "replayable",
    "replaying",
]
