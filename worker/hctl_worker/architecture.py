"""The shape of a model, found by structure: its decoder layers, its hidden size, and the
projections through which each layer's attention and MLP write into the residual stream.

Not by one family's attribute names: the decoder layers are the longest list of same-kind blocks
under the text decoder (the configured layer count decides between lists), and a block's output
projection is the linear map (Linear, GPT-2 Conv1D, or a fused 3-D expert tensor) whose output
size is the hidden size. See `find_layers` and `find_projections`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from hctl_worker.errors import ModelLoadError

# The two components of a decoder layer that write into the residual stream.
COMPONENTS: tuple[str, ...] = ("attention", "mlp")

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


def is_linear_like(module: nn.Module) -> bool:
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
        if any(is_linear_like(inner) for inner in module[0].modules())
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
    widths = [_linear_shape(module)[1] for module in layer.modules() if is_linear_like(module)]
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
        if is_linear_like(child) and _linear_shape(child)[0] == hidden_size
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
        if is_linear_like(module):
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
        if is_linear_like(child):
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


def edit_targets(layer: nn.Module, hidden_size: int) -> dict[str, list[nn.Module | FusedExperts]]:
    """Like find_projections, but keeps the FusedExperts description the Ablator needs."""
    projections = find_projections(layer, hidden_size)
    described: dict[str, list[nn.Module | FusedExperts]] = {}
    for component, modules in projections.items():
        described[component] = [
            module if is_linear_like(module) else _fused_down(module, hidden_size)
            for module in modules
        ]
    return described


def mlp_block(layer: nn.Module, hidden_size: int | None = None) -> nn.Module | None:
    """The child of a decoder layer that holds its MLP whole (every MLP output projection, no
    attention one), or None (an MLP laid out in the layer itself, as OPT's, or none found)."""
    projections = find_projections(layer, hidden_size)
    mlp = {id(module) for module in projections["mlp"]}
    attention = {id(module) for module in projections["attention"]}
    if not mlp:
        return None
    for child in layer.children():
        inside = {id(module) for module in child.modules()}
        if mlp <= inside and not attention & inside and not is_linear_like(child):
            return child
    return None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out, in] (a view; Conv1D stores it transposed)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


__all__ = [
    "COMPONENTS",
    "FusedExperts",
    "edit_targets",
    "find_layers",
    "find_projections",
    "is_linear_like",
    "mlp_block",
    "model_hidden_size",
    "weight_matrix",
]
