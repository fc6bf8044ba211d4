"""Refusal directions: last-token residuals per layer and the difference of their means.

Index 0 of every per-layer tensor is the embeddings output; index k (k >= 1) is the output of
decoder layer k - 1. Everything but `last_token_residuals` is a pure function over tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hctl_worker.architecture import (
    COMPONENTS,
    FusedExperts,
    edit_targets,
    find_layers,
    model_hidden_size,
)
from hctl_worker.generation import encode_texts, forward_options, position_ids_for

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel


@dataclass
class Activations:
    """What one pass over a prompt set reads at the last prompt token.

    `residuals`: the residual stream, [n_prompts, n_layers + 1, hidden]. `writes`: the mean,
    over the prompts, of what each layer's components add to it, [n_layers, 2, hidden]
    (COMPONENTS order: attention, MLP), float64. A component is read at its output
    projections when every one of them gives one vector per prompt position (dense layers);
    otherwise (MoE experts see only their routed tokens) it is the layer's whole write minus the
    other component's, which is exact for the usual residual block x + attention + MLP.
    """

    residuals: torch.Tensor
    writes: torch.Tensor


def last_token_residuals(
    loaded: LoadedModel, texts: Sequence[str], batch_size: int
) -> torch.Tensor:
    """The residual stream at the last prompt token: [n_prompts, n_layers + 1, hidden]."""
    return last_token_activations(loaded, texts, batch_size).residuals


def last_token_activations(
    loaded: LoadedModel, texts: Sequence[str], batch_size: int
) -> Activations:
    """The residual stream at the last prompt token, and what each component writes into it.

    Residual entry 0 is what enters the first layer (the embeddings output), entry k the output
    of layer k - 1 (before the final norm, for the last layer too: that is the stream the
    ablation edits). float32 on the CPU. Hooks on the layers keep only the last position of each
    output, so memory does not grow with layers x prompt length as with output_hidden_states.
    Hooks on the components' output projections sum their last-position outputs in the same
    pass. Texts are batched by token length (left padding puts every prompt's last token at -1),
    which keeps padding, and so wasted compute, small.
    """
    if not texts:
        raise ValueError("no texts to take residuals from")
    layers = find_layers(loaded.model)
    captured: list[torch.Tensor | None] = [None] * (len(layers) + 1)
    hidden_size = model_hidden_size(loaded.model)
    written = _ComponentWrites(len(layers), hidden_size)

    def keep_input(module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            captured[0] = hidden[:, -1, :].to("cpu", torch.float32)

    def keep_output(index: int):
        def hook(module, args, output) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(hidden, torch.Tensor):
                captured[index] = hidden[:, -1, :].to("cpu", torch.float32)

        return hook

    handles = [layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(keep_output(i + 1)) for i, layer in enumerate(layers)]
    handles += written.attach(layers)
    result: torch.Tensor | None = None
    try:
        for indices, input_ids, attention_mask in encode_texts(loaded, texts, max(1, batch_size)):
            captured[:] = [None] * len(captured)
            written.expect(input_ids.shape)
            with torch.inference_mode():
                loaded.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids_for(attention_mask),
                    use_cache=False,
                    **forward_options(loaded.model),
                )
            if any(entry is None for entry in captured):
                raise RuntimeError(
                    f"could not read the residual stream of {type(loaded.model).__name__}"
                )
            stacked = torch.stack(captured, dim=1)  # type: ignore[arg-type]
            if result is None:
                result = torch.empty((len(texts), *stacked.shape[1:]), dtype=torch.float32)
            result[torch.as_tensor(indices)] = stacked
    finally:
        for handle in handles:
            handle.remove()
    assert result is not None
    return Activations(residuals=result, writes=written.means(result))


class _ComponentWrites:
    """Sums, per layer and component, the last-position outputs of the output projections."""

    def __init__(self, n_layers: int, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.sums = torch.zeros((n_layers, len(COMPONENTS), hidden_size), dtype=torch.float64)
        # A component is readable when all its projections answered for every batch.
        self.readable = [[True] * len(COMPONENTS) for _ in range(n_layers)]
        self.shape: tuple[int, int] = (0, 0)
        self.answered: set[tuple[int, int, int]] = set()
        self.targets: dict[tuple[int, int], int] = {}

    def attach(self, layers: Sequence[torch.nn.Module]) -> list:
        handles = []
        for layer_index, layer in enumerate(layers):
            targets = edit_targets(layer, self.hidden_size)
            for component_index, component in enumerate(COMPONENTS):
                modules = [
                    target.module if isinstance(target, FusedExperts) else target
                    for target in targets[component]
                ]
                self.targets[layer_index, component_index] = len(modules)
                if not modules:
                    self.readable[layer_index][component_index] = False
                for target_index, module in enumerate(modules):
                    key = (layer_index, component_index, target_index)
                    handles.append(module.register_forward_hook(self._hook(key)))
        return handles

    def expect(self, shape: torch.Size) -> None:
        """The next forward pass reads a batch of this [rows, positions] shape."""
        self._check_all_answered()
        self.shape = (int(shape[0]), int(shape[1]))
        self.answered.clear()

    def _hook(self, key: tuple[int, int, int]):
        layer_index, component_index, _ = key

        def hook(module, args, output) -> None:
            value = output[0] if isinstance(output, (tuple, list)) else output
            if not self.readable[layer_index][component_index]:
                return
            if (
                not isinstance(value, torch.Tensor)
                or tuple(value.shape) != (*self.shape, self.hidden_size)
                or key in self.answered
            ):
                # Routed experts see a subset of the tokens; such a component is not readable.
                self.readable[layer_index][component_index] = False
                return
            self.answered.add(key)
            self.sums[layer_index, component_index] += (
                value[:, -1, :].to("cpu", torch.float64).sum(0)
            )

        return hook

    def _check_all_answered(self) -> None:
        if self.shape == (0, 0):
            return
        for (layer_index, component_index), count in self.targets.items():
            if any(
                (layer_index, component_index, target) not in self.answered
                for target in range(count)
            ):
                self.readable[layer_index][component_index] = False

    def means(self, residuals: torch.Tensor) -> torch.Tensor:
        """Mean writes per prompt; unreadable components are the layer's remainder."""
        self._check_all_answered()
        count = residuals.shape[0]
        means = self.sums / count
        layer_writes = residuals.to(torch.float64).mean(dim=0).diff(dim=0)  # [n_layers, hidden]
        for layer_index, readable in enumerate(self.readable):
            missing = [index for index, ok in enumerate(readable) if not ok]
            if not missing:
                continue
            present = [index for index, ok in enumerate(readable) if ok]
            remainder = layer_writes[layer_index] - means[layer_index, present].sum(dim=0)
            for index in missing:
                means[layer_index, index] = remainder / len(missing)
        return means


def refusal_directions(
    bad: torch.Tensor, good: torch.Tensor, *, orthogonalize: bool = True
) -> torch.Tensor:
    """Unit difference of means per layer: [n_layers + 1, hidden].

    With `orthogonalize`, the component along the harmless mean is projected out first ("projected
    abliteration"): it carries what the model does with any prompt, not what makes it refuse.
    """
    bad_mean = bad.to(torch.float64).mean(dim=0)
    good_mean = good.to(torch.float64).mean(dim=0)
    directions = _normalize(bad_mean - good_mean)
    if orthogonalize:
        good_unit = _normalize(good_mean)
        overlap = (directions * good_unit).sum(dim=-1, keepdim=True)
        directions = _normalize(directions - overlap * good_unit)
    return directions.to(torch.float32)


def layer_separation(bad: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """How well each layer separates harmful from harmless prompts: [n_layers + 1], >= 0.

    The distance between the two class means along their difference, in units of the pooled
    standard deviation along that same direction (a one-dimensional Fisher/Cohen's d). Layers
    where refusal is written score high; the search may place its ranges around them.
    """
    bad64 = bad.to(torch.float64)
    good64 = good.to(torch.float64)
    difference = bad64.mean(dim=0) - good64.mean(dim=0)
    unit = _normalize(difference)
    bad_projection = (bad64 * unit).sum(dim=-1)
    good_projection = (good64 * unit).sum(dim=-1)
    spread = torch.sqrt(
        0.5
        * (bad_projection.var(dim=0, unbiased=False) + good_projection.var(dim=0, unbiased=False))
    )
    gap = difference.norm(dim=-1)
    return (gap / spread.clamp(min=1e-12)).to(torch.float32)


def written_along(writes: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Where refusal is written: [n_layers + 1, n_layers, components].

    `writes` is the harmful minus the harmless mean of what each layer's components add to the
    residual stream ([n_layers, components, hidden], see `Activations`); entry [k, layer, c] is
    its part along the direction of hidden state k. Summed over the layers and components up to
    hidden state k it is (for the usual residual block) how far apart the two class means are
    along that direction there: refusal may be read late but written early, or all along.
    """
    return torch.einsum("lch,kh->klc", writes.to(torch.float64), directions.to(torch.float64)).to(
        torch.float32
    )


def interpolate_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The direction at fractional layer `index` (d = k means the output of layer k).

    Linear interpolation between the two neighbouring layer directions, then normalised. The +1
    skips the embeddings entry, as in heretic.
    """
    position = float(index) + 1.0
    last = directions.shape[0] - 1
    position = min(max(position, 0.0), float(last))
    fraction, whole = math.modf(position)
    lower = int(whole)
    if lower >= last:
        return _normalize(directions[last].to(torch.float32))
    mixed = torch.lerp(directions[lower].float(), directions[lower + 1].float(), fraction)
    return _normalize(mixed)


def _normalize(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)


__all__ = [
    "Activations",
    "interpolate_direction",
    "last_token_activations",
    "last_token_residuals",
    "layer_separation",
    "refusal_directions",
    "written_along",
]
