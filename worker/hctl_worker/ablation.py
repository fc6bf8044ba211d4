"""Abliteration: remove a refusal direction from what attention and MLP write into the residual.

For an output projection W (d_out = hidden, d_in) and unit direction v, a trial with weight w
computes as if W were (I - w v vᵀ) W (heretic's rank-1 edit). Trials do not touch the weights:
each edited projection gets a forward hook that applies the same rank-1 correction to its output
(y - w v (vᵀ W x)), so applying a trial costs a few small tensor operations, and `restore()` just
removes the hooks, which gives back the original model bit for bit. `merge()` writes the very same
edit into the weights for export (the maths of that is `merging.py`).

Which modules are edited is the model's architecture (`architecture.py`): its layers, and in each
the projections through which attention and the MLP write into the residual stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


# ----------------------------------------------------------------------------------------------
# The edit during trials: hooks on the projections' outputs (merging.py writes it into weights).


@dataclass
class _LinearEdit:
    """What a hook needs to apply one projection's edit to its output (all on its device)."""

    direction: torch.Tensor  # v, in the activation dtype
    scaled: torch.Tensor  # the vector the correction is along, times the weight
    bias_along: torch.Tensor | None = None  # "none": vᵀb (the bias itself is not edited)
    input_row: torch.Tensor | None = None  # "pre"/"full": a = vᵀŴ, read against the input
    output_scale: torch.Tensor | None = None  # "full": 1 / m, the rows' renormalisation
    bias_shift: torch.Tensor | None = None  # "full": b (1 - 1/m), so the bias stays as it was


def _linear_hook(edit: _LinearEdit):
    """A forward hook computing the edited projection's output from the original one.

    The output tensor is fresh from the projection and used nowhere else yet, so it is edited
    in place (one fused multiply-add) unless autograd is recording.
    """

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if edit.input_row is None:
            along = output @ edit.direction
            if edit.bias_along is not None:
                along = along - edit.bias_along
        else:
            along = inputs[0] @ edit.input_row
        if output.requires_grad:
            if edit.output_scale is not None:
                output = output * edit.output_scale
                if edit.bias_shift is not None:
                    output = output + edit.bias_shift
            return torch.addcmul(output, along.unsqueeze(-1), edit.scaled, value=-1)
        if edit.output_scale is not None:
            output.mul_(edit.output_scale)
            if edit.bias_shift is not None:
                output.add_(edit.bias_shift)
        return output.addcmul_(along.unsqueeze(-1), edit.scaled, value=-1)

    return hook


def _fused_hook(direction: torch.Tensor, weight: float):
    # The experts module sums router-weighted expert outputs, so projecting the sum equals
    # projecting every expert's down projection (and its bias, which merge edits too).
    scaled = weight * direction

    def project(output: torch.Tensor) -> torch.Tensor:
        along = (output @ direction).unsqueeze(-1)
        if output.requires_grad:
            return torch.addcmul(output, along, scaled, value=-1)
        return output.addcmul_(along, scaled, value=-1)

    def hook(module: nn.Module, inputs: tuple, output):
        if isinstance(output, tuple):
            return (project(output[0]), *output[1:])
        return project(output)

    return hook


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
        self.active: AblationParams | None = None

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
        """How many leading layers the active trial leaves as they were (all without a trial):
        their activations are the unmodified model's, so passes may replay them."""
        if self.active is None:
            return self.n_layers
        edited = [
            layer
            for kernel in self.active.kernels.values()
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
        self.active = params

    def _apply_linear(self, module: nn.Module, direction: torch.Tensor, weight: float) -> None:
        matrix = weight_matrix(module)
        device, dtype = matrix.device, matrix.dtype
        vector = direction.to(device, torch.float32)
        bias = getattr(module, "bias", None)
        bias = bias.detach().float() if isinstance(bias, torch.Tensor) else None
        if self.row_normalization == "none":
            edit = _LinearEdit(
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
                edit = _LinearEdit(
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
                edit = _LinearEdit(
                    direction=vector.to(dtype),
                    scaled=(weight * norms / new_norms * vector).to(dtype),
                    input_row=input_row.to(dtype),
                    output_scale=(1.0 / new_norms).to(dtype),
                    bias_shift=None if bias is None else (bias * (1.0 - 1.0 / new_norms)).to(dtype),
                )
        self._handles.append(module.register_forward_hook(_linear_hook(edit)))

    def _row_norm(self, module: nn.Module) -> torch.Tensor:
        key = id(module)
        if key not in self._row_norms:
            self._row_norms[key] = weight_matrix(module).float().norm(dim=1).clamp(min=1e-12)
        return self._row_norms[key]

    def _apply_fused(self, fused: FusedExperts, direction: torch.Tensor, weight: float) -> None:
        parameter = fused.parameter
        if self.row_normalization == "none" and fused.output_is_linear_in_down:
            vector = direction.to(parameter.device, parameter.dtype)
            self._handles.append(fused.module.register_forward_hook(_fused_hook(vector, weight)))
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
        self.active = None

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
