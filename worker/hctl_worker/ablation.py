"""Abliteration: remove a refusal direction from what attention and MLP write into the residual.

For an output projection W (d_out = hidden, d_in) and unit direction v, a trial with weight w
computes as if W were (I - w v vᵀ) W (heretic's rank-1 edit). Trials do not touch the weights:
each edited projection gets a forward hook that applies the same rank-1 correction to its output
(y - w v (vᵀ W x)), so applying a trial costs a few small tensor operations, and `restore()` just
removes the hooks, which gives back the original model bit for bit. `merge()` writes the very same
edit into the weights for export (the maths of that is `merging.py`). Several trials can be
applied at once (`apply_together`), each to the rows of a batch that `select` gives it, so they
share every pass's weight reads (`edit_hooks.py`, `together.py`).

Which modules are edited is the model's architecture (`architecture.py`): its layers, and in each
the projections through which attention and the MLP write into the residual stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from hctl_worker.architecture import (
    COMPONENTS,
    FusedExperts,
    edit_targets,
    find_layers,
    model_hidden_size,
    weight_matrix,
)
from hctl_worker.directions import interpolate_direction
from hctl_worker.edit_hooks import Lanes, LinearEdit, fused_hook, lanes_hook, linear_hook
from hctl_worker.errors import ModelLoadError, SettingsError
from hctl_worker.merging import merge_edits, merge_fused

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

ROW_NORMALIZATIONS: tuple[str, ...] = ("none", "pre", "full")

_KERNEL_FIELDS = ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")


@dataclass(frozen=True)
class ComponentKernel:
    """The per-layer weight profile of one component: a tent peaking at max_weight_position."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float


@dataclass(frozen=True)
class AblationParams:
    """One trial's edit. `direction_index` None means per-layer scope (each layer its own)."""

    direction_index: float | None
    kernels: dict[str, ComponentKernel] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | None]:
        """Flat mapping like {"direction_index": 2.5, "attention.max_weight": 1.2, ...}."""
        values: dict[str, float | None] = {"direction_index": self.direction_index}
        for component in sorted(self.kernels):
            kernel = self.kernels[component]
            for name in _KERNEL_FIELDS:
                values[f"{component}.{name}"] = float(getattr(kernel, name))
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, float | None]) -> AblationParams:
        index = values.get("direction_index")
        grouped: dict[str, dict[str, float]] = {}
        for key, value in values.items():
            if key == "direction_index":
                continue
            component, _, name = key.partition(".")
            if name not in _KERNEL_FIELDS:
                raise SettingsError(f"unknown ablation parameter {key!r}")
            if value is None:
                raise SettingsError(f"ablation parameter {key!r} has no value")
            grouped.setdefault(component, {})[name] = float(value)
        kernels = {}
        for component, fields in grouped.items():
            missing = [name for name in _KERNEL_FIELDS if name not in fields]
            if missing:
                raise SettingsError(f"ablation parameters for {component} lack {missing}")
            kernels[component] = ComponentKernel(**fields)
        return cls(direction_index=None if index is None else float(index), kernels=kernels)


def kernel_weights(kernel: ComponentKernel, n_layers: int) -> list[float]:
    """Weight per layer: max_weight at the position, falling linearly to min_weight at
    min_weight_distance layers away, zero beyond (heretic's tent)."""
    weights = []
    for layer in range(n_layers):
        distance = abs(layer - kernel.max_weight_position)
        if kernel.min_weight_distance <= 0:
            weight = kernel.max_weight if distance == 0 else 0.0
        elif distance > kernel.min_weight_distance:
            weight = 0.0
        else:
            weight = kernel.max_weight + (distance / kernel.min_weight_distance) * (
                kernel.min_weight - kernel.max_weight
            )
        weights.append(float(weight))
    return weights


class Ablator:
    """Applies and removes trials on a loaded model, and merges the chosen one for export."""

    def __init__(
        self,
        loaded: LoadedModel,
        directions: torch.Tensor,
        *,
        row_normalization: str = "none",
    ) -> None:
        if row_normalization not in ROW_NORMALIZATIONS:
            raise SettingsError(
                f"row_normalization must be one of {', '.join(ROW_NORMALIZATIONS)}, "
                f"not {row_normalization!r}"
            )
        self.loaded = loaded
        self.row_normalization = row_normalization
        self.layers = find_layers(loaded.model)
        self.hidden_size = model_hidden_size(loaded.model)
        if directions.dim() != 2 or directions.shape[0] != len(self.layers) + 1:
            raise ValueError(
                f"directions must be [{len(self.layers) + 1}, hidden], got {tuple(directions.shape)}"
            )
        self.directions = directions.to(torch.float32)
        self.targets = [edit_targets(layer, self.hidden_size) for layer in self.layers]
        if not any(self.targets[i][c] for i in range(len(self.layers)) for c in COMPONENTS):
            raise ModelLoadError(
                f"found no attention or MLP output projections in {type(loaded.model).__name__}",
                hint="This architecture is not supported yet; open an issue with the model id.",
            )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._backups: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._row_norms: dict[int, torch.Tensor] = {}
        # The trials the next passes run (none: the original model); with trials applied
        # together, the lanes the selection gives the passes.
        self.active: list[AblationParams] = []
        self._together: tuple[list[AblationParams], Lanes] | None = None
        self.shares_rows = True  # whether a pass's rows can carry different trials' edits

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def describe(self) -> dict[str, int]:
        """How many projections each component edits (for logs and tests)."""
        return {c: sum(len(targets[c]) for targets in self.targets) for c in COMPONENTS}

    def _plan(
        self, params: AblationParams
    ) -> Iterator[tuple[nn.Module | FusedExperts, torch.Tensor, float]]:
        """(target, direction, weight) for every projection the trial edits with weight != 0."""
        unknown = set(params.kernels) - set(COMPONENTS)
        if unknown:
            raise SettingsError(f"unknown ablation components: {sorted(unknown)}")
        shared = (
            None
            if params.direction_index is None
            else interpolate_direction(self.directions, params.direction_index)
        )
        for component, kernel in params.kernels.items():
            for layer_index, weight in enumerate(kernel_weights(kernel, self.n_layers)):
                if weight == 0.0:
                    continue
                direction = shared if shared is not None else self.directions[layer_index + 1]
                for target in self.targets[layer_index][component]:
                    yield target, direction, weight

    def unchanged_layers(self) -> int:
        """How many leading layers the trials the next passes run leave as they were (all without
        a trial): their activations are the unmodified model's, so passes may replay them."""
        edited = [
            layer
            for params in self.active
            for kernel in params.kernels.values()
            for layer, weight in enumerate(kernel_weights(kernel, self.n_layers))
            if weight != 0.0
        ]
        return min(edited, default=self.n_layers)

    def apply(self, params: AblationParams) -> None:
        """Start a trial: hooks on the edited projections. Cheap, and `restore()` undoes it."""
        self.restore()
        with torch.inference_mode():
            for target, direction, weight in self._plan(params):
                if isinstance(target, FusedExperts):
                    self._apply_fused(target, direction, weight)
                else:
                    self._apply_linear(target, direction, weight)
        self.active = [params]

    def can_apply_together(self, trials: Sequence[AblationParams]) -> bool:
        """Whether these trials can be applied at once (`apply_together`): every edit of theirs
        is a hook on a projection's output, one per projection."""
        for params in trials:
            seen: set[int] = set()
            for target, _, _ in self._plan(params):
                if isinstance(target, FusedExperts) or id(target) in seen:
                    return False
                seen.add(id(target))
        return True

    def apply_together(self, trials: Sequence[AblationParams]) -> None:
        """Apply several trials at once, one per lane (`edit_hooks.Lanes`): each pass then runs
        the lane `select` chose, or each row its own, so the trials share the passes' weight
        reads. Lane 0 is selected first; `restore()` undoes it all."""
        if not self.can_apply_together(trials):
            raise ValueError("these trials cannot be applied together (see can_apply_together)")
        self.restore()
        lanes = Lanes(len(trials))
        edits: dict[int, tuple[nn.Module, list[LinearEdit | None]]] = {}
        with torch.inference_mode():
            for lane, params in enumerate(trials):
                for target, direction, weight in self._plan(params):
                    module, per_lane = edits.setdefault(id(target), (target, [None] * len(trials)))
                    per_lane[lane] = self._linear_edit(module, direction, weight)
        for module, per_lane in edits.values():
            self._handles.append(module.register_forward_hook(lanes_hook(per_lane, lanes)))
        self._together = (list(trials), lanes)
        self.select(0)

    def select(self, lanes: int | Sequence[int]) -> None:
        """Which of the trials applied together the next passes run: one lane for every row, or
        a lane per row of the batch."""
        if self._together is None:
            raise ValueError("no trials are applied together")
        trials, selector = self._together
        selector.select(lanes)
        chosen = {lanes} if isinstance(lanes, int) else set(lanes)
        self.active = [trials[lane] for lane in sorted(chosen)]

    def _apply_linear(self, module: nn.Module, direction: torch.Tensor, weight: float) -> None:
        edit = self._linear_edit(module, direction, weight)
        self._handles.append(module.register_forward_hook(linear_hook(edit)))

    def _linear_edit(self, module: nn.Module, direction: torch.Tensor, weight: float) -> LinearEdit:
        """What the hook of one projection needs to apply one trial's edit to it."""
        matrix = weight_matrix(module)
        device, dtype = matrix.device, matrix.dtype
        vector = direction.to(device, torch.float32)
        bias = getattr(module, "bias", None)
        bias = bias.detach().float() if isinstance(bias, torch.Tensor) else None
        if self.row_normalization == "none":
            edit = LinearEdit(
                direction=vector.to(dtype),
                scaled=(weight * vector).to(dtype),
                bias_along=None if bias is None else (bias @ vector).to(dtype),
            )
        else:
            norms = self._row_norm(module)
            matrix32 = matrix.float()
            input_row = (vector / norms) @ matrix32  # a = vᵀŴ with Ŵ = diag(1/n) W
            if self.row_normalization == "pre":
                # W' = W - w diag(n) v a
                edit = LinearEdit(
                    direction=vector.to(dtype),
                    scaled=(weight * norms * vector).to(dtype),
                    input_row=input_row.to(dtype),
                )
            else:
                # W' = diag(n / m) (Ŵ - w v a), where m_i = |Ŵ_i - w v_i a| is expanded as
                # 1 - 2 w v_i (Ŵ_i · a) + w² v_i² |a|², so no edited copy is ever built.
                along = (matrix32 @ input_row) / norms
                squared = (
                    1.0
                    - 2.0 * weight * vector * along
                    + (weight * vector) ** 2 * input_row.dot(input_row)
                )
                new_norms = squared.clamp(min=1e-24).sqrt()
                edit = LinearEdit(
                    direction=vector.to(dtype),
                    scaled=(weight * norms / new_norms * vector).to(dtype),
                    input_row=input_row.to(dtype),
                    output_scale=(1.0 / new_norms).to(dtype),
                    bias_shift=None if bias is None else (bias * (1.0 - 1.0 / new_norms)).to(dtype),
                )
        return edit

    def _row_norm(self, module: nn.Module) -> torch.Tensor:
        key = id(module)
        if key not in self._row_norms:
            self._row_norms[key] = weight_matrix(module).float().norm(dim=1).clamp(min=1e-12)
        return self._row_norms[key]

    def _apply_fused(self, fused: FusedExperts, direction: torch.Tensor, weight: float) -> None:
        parameter = fused.parameter
        if self.row_normalization == "none" and fused.output_is_linear_in_down:
            vector = direction.to(parameter.device, parameter.dtype)
            self._handles.append(fused.module.register_forward_hook(fused_hook(vector, weight)))
            return
        # Per-expert row norms cannot be expressed on the summed output: edit the tensor in
        # place, keeping an exact copy on the CPU to restore from.
        self._backups.append((parameter.data, parameter.data.to("cpu", copy=True)))
        merge_fused(fused, direction, weight, self.row_normalization)

    def restore(self) -> None:
        """Back to the original model exactly (hooks removed, in-place edits copied back)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        with torch.no_grad():
            for live, backup in self._backups:
                live.copy_(backup)
        self._backups.clear()
        self.active = []
        self._together = None

    @contextmanager
    def applied(self, params: AblationParams) -> Iterator[None]:
        self.apply(params)
        try:
            yield
        finally:
            self.restore()

    def merge(self, params: AblationParams) -> None:
        """Write the trial's edit into the weights (for export). Afterwards the model computes
        what it computed during the trial, without hooks; it cannot be restored."""
        self.restore()
        merge_edits(self._plan(params), self.row_normalization, self.hidden_size)
        self._row_norms.clear()


RowNormalization = Literal["none", "pre", "full"]

__all__ = [
    "ROW_NORMALIZATIONS",
    "AblationParams",
    "Ablator",
    "ComponentKernel",
    "kernel_weights",
]
