"""Refusal directions: last-token residuals per layer and the difference of their means.

Index 0 of every per-layer tensor is the embeddings output; index k (k >= 1) is the output of
decoder layer k - 1. Everything but `last_token_residuals` is a pure function over tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from hctl_worker.architecture import find_layers
from hctl_worker.generation import encode_texts, forward_options, position_ids_for

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel


def last_token_residuals(
    loaded: LoadedModel, texts: Sequence[str], batch_size: int
) -> torch.Tensor:
    """The residual stream at the last prompt token: [n_prompts, n_layers + 1, hidden].

    Entry 0 is what enters the first layer (the embeddings output), entry k the output of layer
    k - 1 (before the final norm, for the last layer too: that is the stream the ablation
    edits). float32 on the CPU. Hooks on the layers keep only the last position of each
    output, so memory does not grow with layers x prompt length as with output_hidden_states.
    Texts are batched by token length (left padding puts every prompt's last token at -1),
    which keeps padding, and so wasted compute, small.
    """
    if not texts:
        raise ValueError("no texts to take residuals from")
    layers = find_layers(loaded.model)
    captured: list[torch.Tensor | None] = [None] * (len(layers) + 1)

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
    result: torch.Tensor | None = None
    try:
        for indices, input_ids, attention_mask in encode_texts(loaded, texts, max(1, batch_size)):
            captured[:] = [None] * len(captured)
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
    return result


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
    "interpolate_direction",
    "last_token_residuals",
    "layer_separation",
    "refusal_directions",
]
