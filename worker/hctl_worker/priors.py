"""Where the first trials look: what a model's measurements say about its refusal, and the
distributions the startup trials are drawn from.

The search space (`search_space.py`) holds every answer; these priors only concentrate the first
trials where answers are likely. Two sources:

- the measurements (`RefusalProfile`): refusal is *read* best at the layers whose output
  separates harmful from harmless prompts best, and *written* by the layers whose attention or
  MLP output moves along that direction when the prompt is harmful. A measured draw takes the
  direction of a well-separating layer and puts each component's kernel where that component
  writes along it, wide enough to cover most of what it writes;
- heretic's priors: uniform over heretic's fixed ranges (`SearchSpace.heretic`), which are known
  to work on many large models.

The profile is plain numbers (`directions.written_along` computes them), so the priors are pure
functions that tests drive with profiles made up to break them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hctl_worker.search_space import Range, SearchSpace

# The share of a component's (positive) writes its kernel should cover in a measured draw.
COVERED_SHARE = 0.8
# A measured draw picks its direction among this many of the best-separating layers.
DIRECTION_CANDIDATES = 3
# Each further candidate direction is the best of a depth this much shallower (see best_layers).
DEPTH_STEP = 0.2


@dataclass(frozen=True)
class RefusalProfile:
    """Where one model reads and writes its refusal, measured on the direction prompts.

    `separation[k]`: how well hidden state k (0 = embeddings, k = output of layer k - 1)
    separates harmful from harmless prompts (`directions.layer_separation`).
    `written[k][layer][c]`: how far component c of `layer` moves the residual stream along the
    direction of hidden state k, harmful mean minus harmless mean (`directions.written_along`).
    """

    separation: tuple[float, ...]
    written: tuple[tuple[tuple[float, ...], ...], ...]
    components: tuple[str, ...]

    @property
    def n_layers(self) -> int:
        return len(self.separation) - 1

    def best_layers(self, count: int) -> list[int]:
        """Up to `count` layers whose outputs separate best, one per depth: the best of all
        layers, then the best of the first 80 % of the layers, then of the first 60 %...

        The last layers usually separate best because they already hold the reply's first
        token, while the direction that carries the decision may be read better earlier (Arditi
        et al. found it in the middle of most models). Layers kept are at least a tenth of the
        depth apart, so three tries look at three depths, not at one depth three times.
        """
        spacing = max(1, self.n_layers // 10)
        last = max(self.n_layers - 1, 0)
        usable = [
            layer for layer in range(self.n_layers) if math.isfinite(self.separation[layer + 1])
        ]
        chosen: list[int] = []
        for step in range(count):
            deepest = (1.0 - DEPTH_STEP * step) * last
            candidates = [
                layer
                for layer in usable
                if layer <= deepest + 1e-9
                and all(abs(layer - other) >= spacing for other in chosen)
            ] or [
                layer for layer in usable if all(abs(layer - other) >= spacing for other in chosen)
            ]
            if not candidates:
                break
            chosen.append(max(candidates, key=lambda layer: (self.separation[layer + 1], layer)))
        return chosen

    def writes(self, direction_layer: int, component: str) -> list[float]:
        """What each layer's `component` writes along the direction of `direction_layer`."""
        index = self.components.index(component)
        return [float(layer[index]) for layer in self.written[direction_layer + 1]]

    def describe(self, direction_layer: int) -> str:
        """Where refusal is written along one direction, for the log."""
        parts = []
        for component in self.components:
            values = self.writes(direction_layer, component)
            parts.append(f"{component} " + ", ".join(f"{value:.2f}" for value in values))
        return f"written along layer {direction_layer}'s direction, per layer: " + "; ".join(parts)


def coverage_reach(weights: Sequence[float], peak: float, share: float = COVERED_SHARE) -> float:
    """The smallest distance from `peak` within which `share` of the weights lie."""
    total = sum(weights)
    if total <= 0:
        return float(len(weights))
    by_distance = sorted((abs(layer - peak), weight) for layer, weight in enumerate(weights))
    covered = 0.0
    for distance, weight in by_distance:
        covered += weight
        if covered >= share * total - 1e-12:
            return distance
    return by_distance[-1][0]


def draw_measured(
    profile: RefusalProfile, space: SearchSpace, rng: random.Random
) -> dict[str, float | str]:
    """A point near what the measurements suggest (see the module docstring)."""
    layer = rng.choice(profile.best_layers(DIRECTION_CANDIDATES) or [space.n_layers - 1])
    point: dict[str, float | str] = {
        "direction_scope": _scope(space, rng, global_share=0.8),
        "direction_index": _clip(layer + rng.uniform(-0.5, 0.5), space.direction_index),
    }
    total = [0.0] * space.n_layers
    for component in space.components:
        for index, value in enumerate(profile.writes(layer, component)):
            total[index] += max(0.0, value)
    for component in space.components:
        weights = [max(0.0, value) for value in profile.writes(layer, component)]
        if sum(weights) <= 0:  # this component writes against the direction: follow the layer
            weights = total if sum(total) > 0 else [1.0] * space.n_layers
        peak = rng.choices(range(space.n_layers), weights=weights)[0] + rng.uniform(-0.5, 0.5)
        peak = _clip(peak, space.max_weight_position)
        reach = max(1.0, coverage_reach(weights, peak)) * rng.uniform(1.0, 1.5)
        point[f"{component}.max_weight"] = rng.uniform(
            max(0.8, space.max_weight[component].low), space.max_weight[component].high
        )
        point[f"{component}.max_weight_position"] = peak
        point[f"{component}.min_weight"] = rng.uniform(0.5, 1.0)
        point[f"{component}.min_weight_distance"] = _clip(reach, space.min_weight_distance)
    return point


def draw_heretic(space: SearchSpace, rng: random.Random) -> dict[str, float | str]:
    """A point uniform over heretic's ranges (clipped into `space`, which holds them)."""
    heretic = SearchSpace.heretic(space.n_layers, space.components, space.scopes)
    point: dict[str, float | str] = {
        "direction_scope": _scope(space, rng, global_share=0.5),
        "direction_index": _uniform(rng, heretic.direction_index, space.direction_index),
    }
    for component in space.components:
        point[f"{component}.max_weight"] = _uniform(
            rng, heretic.max_weight[component], space.max_weight[component]
        )
        point[f"{component}.max_weight_position"] = _uniform(
            rng, heretic.max_weight_position, space.max_weight_position
        )
        point[f"{component}.min_weight"] = rng.uniform(0.0, 1.0)
        point[f"{component}.min_weight_distance"] = _uniform(
            rng, heretic.min_weight_distance, space.min_weight_distance
        )
    return point


def _scope(space: SearchSpace, rng: random.Random, global_share: float) -> str:
    if len(space.scopes) == 1:
        return space.scopes[0]
    return "global" if rng.random() < global_share else "per_layer"


def _uniform(rng: random.Random, bounds: Range, within: Range) -> float:
    return _clip(rng.uniform(bounds.low, bounds.high), within)


def _clip(value: float, bounds: Range) -> float:
    return min(max(float(value), bounds.low), bounds.high)


__all__ = ["RefusalProfile", "coverage_reach", "draw_heretic", "draw_measured"]
