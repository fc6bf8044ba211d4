"""Where the search looks: the parameter ranges of one model, how a point is drawn from them, and
how a point becomes the engine's edit (`AblationParams`).

Parameter names follow heretic's. Two spaces:

- `SearchSpace.whole` (settings `search_ranges = "measured"`, the default): every answer is
  inside it. The direction may come from any layer, the kernel may peak at any layer and reach
  over the whole depth. Measurements do not narrow it; they decide where the first trials look
  (`priors.py`, `startup.py`), and the sampler learns the rest.
- `SearchSpace.heretic`: heretic's fixed ranges, for comparisons. They put the direction in the
  40-90 % band of the layers and the kernel's peak in the last 40 %, so the first layers are
  almost never edited, and a model that writes its refusal there cannot be abliterated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import optuna

from hctl_worker.ablation import AblationParams, ComponentKernel

Scope = Literal["global", "per_layer"]


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.high < self.low:
            raise ValueError(f"empty range [{self.low}, {self.high}]")


@dataclass(frozen=True)
class SearchSpace:
    """The parameter ranges of one model. Parameter names follow heretic's."""

    n_layers: int
    components: tuple[str, ...]
    scopes: tuple[Scope, ...]
    direction_index: Range
    max_weight: Mapping[str, Range]
    max_weight_position: Range
    min_weight_distance: Range

    @classmethod
    def heretic(
        cls,
        n_layers: int,
        components: Sequence[str],
        scopes: Sequence[Scope] = ("global", "per_layer"),
    ) -> SearchSpace:
        """heretic's fixed ranges (spec section 3)."""
        last = max(n_layers - 1, 0)
        return cls(
            n_layers=n_layers,
            components=tuple(components),
            scopes=tuple(scopes),
            direction_index=Range(0.4 * last, 0.9 * last),
            max_weight={component: _weight_range(component) for component in components},
            max_weight_position=Range(0.6 * last, float(last)),
            min_weight_distance=Range(1.0, max(0.6 * last, 1.0)),
        )

    @classmethod
    def whole(
        cls,
        n_layers: int,
        components: Sequence[str],
        scopes: Sequence[Scope] = ("global", "per_layer"),
    ) -> SearchSpace:
        """Every layer's direction, a peak at any layer, a reach up to the whole depth.

        The weights keep heretic's ranges, which hold the classic edit's weight 1. A reach of
        `n_layers` lets a kernel peaking at one end still give the other end a weight.
        """
        last = max(n_layers - 1, 0)
        return cls(
            n_layers=n_layers,
            components=tuple(components),
            scopes=tuple(scopes),
            direction_index=Range(0.0, float(last)),
            max_weight={component: _weight_range(component) for component in components},
            max_weight_position=Range(0.0, float(last)),
            min_weight_distance=Range(1.0, float(max(n_layers, 1))),
        )

    def sample(self, trial: optuna.Trial) -> dict[str, float | str]:
        """Draw one point; every parameter is always sampled (multivariate TPE prefers that)."""
        values: dict[str, float | str] = {}
        if len(self.scopes) > 1:
            values["direction_scope"] = trial.suggest_categorical("direction_scope", self.scopes)
        else:
            values["direction_scope"] = self.scopes[0]
        values["direction_index"] = _suggest(trial, "direction_index", self.direction_index)
        for component in self.components:
            values[f"{component}.max_weight"] = _suggest(
                trial, f"{component}.max_weight", self.max_weight[component]
            )
            values[f"{component}.max_weight_position"] = _suggest(
                trial, f"{component}.max_weight_position", self.max_weight_position
            )
            values[f"{component}.min_weight"] = _suggest(
                trial, f"{component}.min_weight", Range(0.0, 1.0)
            )
            values[f"{component}.min_weight_distance"] = _suggest(
                trial, f"{component}.min_weight_distance", self.min_weight_distance
            )
        return values

    def describe(self) -> str:
        return (
            f"{self.n_layers} layers; direction {self.direction_index.low:.2f}-"
            f"{self.direction_index.high:.2f}, kernel peak {self.max_weight_position.low:.2f}-"
            f"{self.max_weight_position.high:.2f}, reach {self.min_weight_distance.low:.2f}-"
            f"{self.min_weight_distance.high:.2f}"
        )

    def full_depth_point(self, direction_layer: int | None) -> dict[str, float | str]:
        """The classic edit (Arditi et al. 2024): one direction projected out of every layer's
        components at weight 1. `direction_layer` None: each layer its own direction."""
        point: dict[str, float | str] = {
            "direction_scope": "global" if direction_layer is not None else "per_layer",
            # Any value will do for per-layer scope; the parameter is always sampled.
            "direction_index": float(direction_layer or 0),
        }
        for component in self.components:
            point[f"{component}.max_weight"] = 1.0
            point[f"{component}.max_weight_position"] = 0.0
            point[f"{component}.min_weight"] = 1.0  # the fraction of the peak: flat
            point[f"{component}.min_weight_distance"] = float(max(self.n_layers - 1, 1))
        return point

    def contains(self, point: Mapping[str, float | str]) -> bool:
        """Whether a point lies in this space (the sampler may then reproduce it)."""
        ranges = {
            "direction_index": self.direction_index,
            **{f"{c}.max_weight": self.max_weight[c] for c in self.components},
            **{f"{c}.max_weight_position": self.max_weight_position for c in self.components},
            **{f"{c}.min_weight": Range(0.0, 1.0) for c in self.components},
            **{f"{c}.min_weight_distance": self.min_weight_distance for c in self.components},
        }
        if point.get("direction_scope", self.scopes[0]) not in self.scopes:
            return False
        return all(
            name in point and bounds.low <= float(point[name]) <= bounds.high
            for name, bounds in ranges.items()
        )


def _weight_range(component: str) -> Range:
    # heretic HEAD lets the MLP weight go below zero and clamps it, so TPE can switch MLP edits off.
    return Range(-0.25, 1.5) if component == "mlp" else Range(0.8, 1.5)


def _suggest(trial: optuna.Trial, name: str, bounds: Range) -> float:
    if bounds.high == bounds.low:
        return bounds.low
    return trial.suggest_float(name, bounds.low, bounds.high)


def to_ablation_params(
    values: Mapping[str, float | str], components: Iterable[str]
) -> AblationParams:
    """The engine's parameters for one sampled point."""
    kernels = {}
    for component in components:
        max_weight = max(0.0, float(values[f"{component}.max_weight"]))
        kernels[component] = ComponentKernel(
            max_weight=max_weight,
            max_weight_position=float(values[f"{component}.max_weight_position"]),
            # Sampled as a fraction of the peak, stored as an absolute weight (as heretic does).
            min_weight=float(values[f"{component}.min_weight"]) * max_weight,
            min_weight_distance=float(values[f"{component}.min_weight_distance"]),
        )
    per_layer = values.get("direction_scope") == "per_layer"
    return AblationParams(
        direction_index=None if per_layer else float(values["direction_index"]),
        kernels=kernels,
    )
