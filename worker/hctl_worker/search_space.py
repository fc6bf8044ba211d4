"""Where the search looks: the parameter ranges of one model, how a point is drawn from them, and
how a point becomes the engine's edit (`AblationParams`).

Parameter names follow heretic's. heretic's fixed ranges (`SearchSpace.heretic`) put the direction
in the 40-90 % band of the layers and the kernel's peak in the last 40 %, so the first layers are
almost never edited. Models that write their refusal early (small ones, and some large ones) then
cannot be abliterated. The measured space (`SearchSpace.measured`) moves the lower ends of those
ranges down to the first layer whose harmful/harmless separation reaches half of its maximum (the
"onset"), and lets the kernel reach back to it; where the onset is inside heretic's ranges,
heretic's ranges are kept unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import optuna

from hctl_worker.ablation import AblationParams, ComponentKernel

# A layer "separates" once it reaches this fraction of the best separation.
ONSET_FRACTION = 0.5

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
    onset: int | None = None  # the first layer that separates, when measured

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
    def measured(
        cls,
        separation: Sequence[float],
        components: Sequence[str],
        scopes: Sequence[Scope] = ("global", "per_layer"),
    ) -> SearchSpace:
        """heretic's ranges, reaching down to where the measured separation begins.

        `separation` has one entry per hidden state: index 0 is the embeddings, index k + 1 the
        output of layer k (as `directions.layer_separation` returns it).
        """
        n_layers = len(separation) - 1
        base = cls.heretic(n_layers, components, scopes)
        onset = separation_onset(separation)
        if onset is None:
            return base
        last = max(n_layers - 1, 0)
        return cls(
            n_layers=n_layers,
            components=base.components,
            scopes=base.scopes,
            direction_index=Range(min(base.direction_index.low, onset), base.direction_index.high),
            max_weight=base.max_weight,
            max_weight_position=Range(
                min(base.max_weight_position.low, onset), base.max_weight_position.high
            ),
            # From a peak at the last layer the kernel must reach back to the onset layer.
            min_weight_distance=Range(1.0, max(base.min_weight_distance.high, last - onset + 1.0)),
            onset=onset,
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
        where = f"refusal separates from layer {self.onset}" if self.onset is not None else ""
        return (
            f"{self.n_layers} layers{'; ' + where if where else ''}; direction "
            f"{self.direction_index.low:.2f}-{self.direction_index.high:.2f}, kernel peak "
            f"{self.max_weight_position.low:.2f}-{self.max_weight_position.high:.2f}, reach "
            f"{self.min_weight_distance.low:.2f}-{self.min_weight_distance.high:.2f}"
        )


def _weight_range(component: str) -> Range:
    # heretic HEAD lets the MLP weight go below zero and clamps it, so TPE can switch MLP edits off.
    return Range(-0.25, 1.5) if component == "mlp" else Range(0.8, 1.5)


def _suggest(trial: optuna.Trial, name: str, bounds: Range) -> float:
    if bounds.high == bounds.low:
        return bounds.low
    return trial.suggest_float(name, bounds.low, bounds.high)


def separation_onset(separation: Sequence[float]) -> int | None:
    """The first layer whose output separates at least ONSET_FRACTION as well as the best one."""
    per_layer = [float(value) for value in list(separation)[1:]]
    finite = [value for value in per_layer if math.isfinite(value)]
    if not finite or max(finite) <= 0:
        return None
    threshold = ONSET_FRACTION * max(finite)
    return next(index for index, value in enumerate(per_layer) if value >= threshold)


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
