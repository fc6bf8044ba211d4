"""Abliteration: remove a refusal direction from what attention and MLP write into the residual.

For an output projection W (d_out = hidden, d_in) and unit direction v, a trial with weight w
computes as if W were (I - w v vᵀ) W (heretic's rank-1 edit). Trials do not touch the weights:
each edited projection gets a forward hook that applies the same rank-1 correction to its output
(y - w v (vᵀ W x)), so applying a trial costs a few small tensor operations, and `restore()` just
removes the hooks, which gives back the original model bit for bit. `merge()` writes the very same
edit into the weights for export.

Layers and projections are found by structure, not by one family's attribute names: the decoder
layers are the longest list of same-kind blocks under the text decoder, and a block's output
projection is the linear map (Linear, GPT-2 Conv1D, or a fused 3-D expert tensor) whose output
size is the hidden size. See `find_layers` and `find_projections`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from hctl_worker.directions import interpolate_direction
from hctl_worker.errors import ModelLoadError, SettingsError

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

COMPONENTS: tuple[str, ...] = ("attention", "mlp")
ROW_NORMALIZATIONS: tuple[str, ...] = ("none", "pre", "full")

_KERNEL_FIELDS = ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")
# Names that mark a block's output projection, tried before falling back to registration order.
_OUTPUT_NAMES = (
    "o_proj",
    "out_proj",
    "down_proj",
    "dense_4h_to_h",
    "c_proj",
    "dense",
    "wo",
    "w2",
    "fc2",
    "output_linear",
    "proj_out",
    "out",
    "o",
)
_ATTENTION_NAME = re.compile(r"attn|attention|mixer|conv|token_mix", re.IGNORECASE)
_MLP_NAME = re.compile(r"mlp|ffn|feed_forward|feedforward|moe|expert|channel_mix", re.IGNORECASE)


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
# Finding layers and projections by structure.


def _is_linear_like(module: nn.Module) -> bool:
    """nn.Linear and GPT-2's Conv1D (weight stored transposed, with an `nf` output size)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and hasattr(module, "nf")
    )


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def _text_decoder(model: nn.Module) -> nn.Module:
    """The text decoder inside a causal-LM (or image-text) wrapper, when transformers knows it."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if isinstance(language_model, nn.Module):
        return language_model
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except Exception:  # Some remote-code models raise instead of returning None.
            decoder = None
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    return model


def find_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: under the text decoder, the ModuleList of same-kind blocks with
    linear maps inside, with the configured layer count if one has it, else the longest.

    Lists nested inside another candidate's blocks (MoE experts) are not candidates, so a
    64-expert list cannot win over 24 layers.
    """
    root = _text_decoder(model)
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in root.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) > 1 and not _all_blocks(module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in candidates):
            continue
        candidates.append((name, module))
    # Decoder blocks hold linear maps; lists of norms, rotary tables or scalars do not.
    blocks = [
        module
        for _, module in candidates
        if any(_is_linear_like(inner) for inner in module[0].modules())
    ]
    if not blocks:
        raise ModelLoadError(
            f"cannot find the decoder layers of {type(model).__name__}",
            hint="This architecture is not supported yet; open an issue with the model id.",
        )
    expected = _configured_layer_count(model)
    exact = [module for module in blocks if len(module) == expected]
    # The configured count decides first, then length, then size (a vision tower of the same
    # depth is smaller than the language model).
    best = max(exact or blocks, key=lambda module: (len(module), _parameter_count(module)))
    return list(best)


def _parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _all_blocks(module_list: nn.ModuleList) -> bool:
    """Hybrid models mix block classes (attention and linear-attention layers): accept lists
    whose members all contain parameters with a shared hidden width."""
    widths = set()
    for child in module_list:
        norms = [p.shape[0] for p in child.parameters(recurse=True) if p.dim() == 1]
        if not norms:
            return False
        widths.add(max(set(norms), key=norms.count))
    return len(widths) == 1


def _configured_layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_hidden_size(model: nn.Module) -> int:
    """The residual stream's width: the text config's hidden size, else the embeddings' width
    (they differ where embeddings are projected in, as in OPT-350m)."""
    config = getattr(model, "config", None)
    if config is not None:
        get_text_config = getattr(config, "get_text_config", None)
        text_config = get_text_config() if callable(get_text_config) else config
        for name in ("hidden_size", "n_embd", "d_model"):
            value = getattr(text_config, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return int(model.get_input_embeddings().weight.shape[1])


@dataclass
class FusedExperts:
    """A module holding all experts' down projections as one 3-D tensor [experts, ., .]."""

    module: nn.Module
    parameter_name: str
    output_last: bool  # True: [experts, in, out] (x @ W); False: [experts, out, in] (F.linear)

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.parameter_name)

    @property
    def output_is_linear_in_down(self) -> bool:
        """False when each expert's output is normalised after its down projection, so the
        summed output cannot be edited in place of the weights."""
        return not getattr(self.module, "has_post_expert_norm", False)

    def bias_name(self, hidden_size: int) -> str | None:
        for name, parameter in self.module.named_parameters(recurse=False):
            if (
                name != self.parameter_name
                and parameter.dim() == 2
                and parameter.shape[0] == self.parameter.shape[0]
                and parameter.shape[1] == hidden_size
                and "down" in name
            ):
                return name
        return None


def _infer_hidden_size(layer: nn.Module) -> int:
    """The most common input width of the block's linear maps (q, k, v, gate, up all read it)."""
    widths = [_linear_shape(module)[1] for module in layer.modules() if _is_linear_like(module)]
    if not widths:
        norms = [p.shape[0] for p in layer.parameters() if p.dim() == 1]
        if not norms:
            raise ModelLoadError(f"cannot tell the hidden size of {type(layer).__name__}")
        return max(set(norms), key=norms.count)
    return max(set(widths), key=widths.count)


def _output_projection(block: nn.Module, hidden_size: int) -> nn.Module | None:
    """Among a module's direct linear children, the one that writes back to the hidden size."""
    writers = [
        (name, child)
        for name, child in block.named_children()
        if _is_linear_like(child) and _linear_shape(child)[0] == hidden_size
    ]
    if not writers:
        return None
    if len(writers) == 1:
        return writers[0][1]
    by_name = dict(writers)
    for preferred in _OUTPUT_NAMES:
        if preferred in by_name:
            return by_name[preferred]
    # Blocks register their output map last (q, k, v, o; gate, up, down; c_fc, c_proj).
    return writers[-1][1]


def _fused_down(module: nn.Module, hidden_size: int) -> FusedExperts | None:
    """A fused-experts module's down tensor: 3-D, one of its matrix dims equals the hidden size."""
    three_d = [
        (name, parameter)
        for name, parameter in module.named_parameters(recurse=False)
        if parameter.dim() == 3 and hidden_size in tuple(parameter.shape[1:])
    ]
    if not three_d:
        return None
    named = [item for item in three_d if re.search(r"down|w2|out", item[0], re.IGNORECASE)]
    if named:
        name, parameter = named[0]
    else:
        # gate_up is twice as wide as down on its non-hidden side, so down is the smaller one.
        name, parameter = min(three_d, key=lambda item: item[1].numel())
    rows, columns = int(parameter.shape[1]), int(parameter.shape[2])
    declared = getattr(module, "is_transposed", None)  # transformers' experts decorator says it
    if isinstance(declared, bool):
        output_last = declared
    else:
        output_last = columns == hidden_size and rows != hidden_size
    return FusedExperts(module=module, parameter_name=name, output_last=output_last)


def _component_targets(block: nn.Module, hidden_size: int) -> list[nn.Module | FusedExperts]:
    targets: list[nn.Module | FusedExperts] = []
    for module in block.modules():
        if _is_linear_like(module):
            continue
        fused = _fused_down(module, hidden_size)
        if fused is not None:
            targets.append(fused)
            continue
        projection = _output_projection(module, hidden_size)
        if projection is not None:
            targets.append(projection)
    return targets


def find_projections(
    layer: nn.Module, hidden_size: int | None = None
) -> dict[str, list[nn.Module]]:
    """component -> the modules whose output this component writes into the residual stream.

    Attention: its output projection (o_proj, out_proj, dense, c_proj ...). MLP: its down
    projection, for MoE every expert's (ModuleList experts as Linear modules, fused experts as
    the module holding the 3-D tensor) and any shared expert's. Children are sorted into the two
    components by name first (attn/attention/mixer vs mlp/ffn/moe/experts) and by order otherwise.
    """
    hidden = hidden_size if hidden_size is not None else _infer_hidden_size(layer)
    result: dict[str, list] = {component: [] for component in COMPONENTS}
    unknown: list[nn.Module] = []
    for name, child in layer.named_children():
        if _is_linear_like(child):
            continue
        targets = _component_targets(child, hidden)
        if not targets:
            continue
        if _ATTENTION_NAME.search(name):
            result["attention"].extend(targets)
        elif _MLP_NAME.search(name):
            result["mlp"].extend(targets)
        else:
            unknown.append(child)
    for child in unknown:
        targets = _component_targets(child, hidden)
        has_experts = any(isinstance(target, FusedExperts) for target in targets) or any(
            isinstance(module, nn.ModuleList) for module in child.modules()
        )
        if not result["attention"] and not has_experts:
            result["attention"].extend(targets)
        elif not result["mlp"]:
            result["mlp"].extend(targets)
    if not result["mlp"]:
        # Some layers hold their MLP's linear maps directly (OPT: fc1, fc2 beside self_attn).
        direct = _output_projection(layer, hidden)
        if direct is not None:
            result["mlp" if result["attention"] else "attention"].append(direct)
    for component in COMPONENTS:
        result[component] = [
            target.module if isinstance(target, FusedExperts) else target
            for target in result[component]
        ]
    return result


def _targets_of(layer: nn.Module, hidden_size: int) -> dict[str, list[nn.Module | FusedExperts]]:
    """Like find_projections, but keeps the FusedExperts description the Ablator needs."""
    projections = find_projections(layer, hidden_size)
    described: dict[str, list[nn.Module | FusedExperts]] = {}
    for component, modules in projections.items():
        described[component] = [
            module if _is_linear_like(module) else _fused_down(module, hidden_size)
            for module in modules
        ]
    return described


# ----------------------------------------------------------------------------------------------
# The edit.


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out, in] (a view; Conv1D stores it transposed)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def edited_matrix(
    matrix: torch.Tensor, direction: torch.Tensor, weight: float, row_normalization: str
) -> torch.Tensor:
    """The ablated matrix in float32: (I - w v vᵀ) W, optionally norm-preserving per row.

    `matrix` is [out, in] with out = hidden size. "pre" removes w v vᵀŴ scaled back by the row
    norms (Ŵ = W with unit rows); "full" renormalises each edited row to its original norm.
    """
    matrix = matrix.to(torch.float32)
    vector = direction.to(matrix.device, torch.float32)
    if row_normalization == "none":
        return matrix - weight * torch.outer(vector, vector @ matrix)
    norms = matrix.norm(dim=1, keepdim=True).clamp(min=1e-12)
    unit_rows = matrix / norms
    edited = unit_rows - weight * torch.outer(vector, vector @ unit_rows)
    if row_normalization == "pre":
        return edited * norms
    return edited / edited.norm(dim=1, keepdim=True).clamp(min=1e-12) * norms


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
        self.targets = [_targets_of(layer, self.hidden_size) for layer in self.layers]
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
        matrix = _weight_matrix(module)
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
            self._row_norms[key] = _weight_matrix(module).float().norm(dim=1).clamp(min=1e-12)
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
        _merge_fused(fused, direction, weight, self.row_normalization, self.hidden_size)

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
        with torch.no_grad():
            for target, direction, weight in self._plan(params):
                if isinstance(target, FusedExperts):
                    _merge_fused(
                        target, direction, weight, self.row_normalization, self.hidden_size
                    )
                    bias_name = target.bias_name(self.hidden_size)
                    if (
                        bias_name is not None
                        and self.row_normalization == "none"
                        and target.output_is_linear_in_down
                    ):
                        bias = getattr(target.module, bias_name)
                        vector = direction.to(bias.device, torch.float32)
                        edited = bias.float() - weight * torch.outer(bias.float() @ vector, vector)
                        bias.copy_(edited.to(bias.dtype))
                    continue
                matrix = _weight_matrix(target)
                edited = edited_matrix(matrix, direction, weight, self.row_normalization)
                matrix.copy_(edited.to(matrix.dtype))
        self._row_norms.clear()


def _merge_fused(
    fused: FusedExperts, direction: torch.Tensor, weight: float, row_normalization: str, hidden: int
) -> None:
    parameter = fused.parameter
    with torch.no_grad():
        for expert in range(parameter.shape[0]):
            matrix = parameter.data[expert]
            as_out_in = matrix.t() if fused.output_last else matrix
            edited = edited_matrix(as_out_in, direction, weight, row_normalization)
            as_out_in.copy_(edited.to(matrix.dtype))


RowNormalization = Literal["none", "pre", "full"]

__all__ = [
    "COMPONENTS",
    "ROW_NORMALIZATIONS",
    "AblationParams",
    "Ablator",
    "ComponentKernel",
    "edited_matrix",
    "find_layers",
    "find_projections",
    "kernel_weights",
    "model_hidden_size",
]
