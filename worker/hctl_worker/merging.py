"""Merging: an abliteration edit written into the weights, for export.

A trial computes as if each edited output projection W were (I - w v vᵀ) W (`ablation.py` applies
that with hooks on the outputs); merging writes the very same matrix into the weights, so the saved
model computes without hooks what the trial computed. `edited_matrix` is that matrix, optionally
norm-preserving per row; `merge_fused` edits every expert of a fused experts tensor in place, which
the ablator also does during trials whose row normalisation a hook on the summed output cannot
express.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hctl_worker.architecture import FusedExperts, weight_matrix


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


def merge_edits(
    plan: Iterable[tuple[nn.Module | FusedExperts, torch.Tensor, float]],
    row_normalization: str,
    hidden_size: int,
) -> None:
    """Write each (target, direction, weight) of a trial's plan into the target's weights."""
    with torch.no_grad():
        for target, direction, weight in plan:
            if isinstance(target, FusedExperts):
                merge_fused(target, direction, weight, row_normalization)
                bias_name = target.bias_name(hidden_size)
                if (
                    bias_name is not None
                    and row_normalization == "none"
                    and target.output_is_linear_in_down
                ):
                    bias = getattr(target.module, bias_name)
                    vector = direction.to(bias.device, torch.float32)
                    edited = bias.float() - weight * torch.outer(bias.float() @ vector, vector)
                    bias.copy_(edited.to(bias.dtype))
                continue
            matrix = weight_matrix(target)
            edited = edited_matrix(matrix, direction, weight, row_normalization)
            matrix.copy_(edited.to(matrix.dtype))


def merge_fused(
    fused: FusedExperts, direction: torch.Tensor, weight: float, row_normalization: str
) -> None:
    """Edit every expert's down projection in the fused experts tensor, in place."""
    parameter = fused.parameter
    with torch.no_grad():
        for expert in range(parameter.shape[0]):
            matrix = parameter.data[expert]
            as_out_in = matrix.t() if fused.output_last else matrix
            edited = edited_matrix(as_out_in, direction, weight, row_normalization)
            as_out_in.copy_(edited.to(matrix.dtype))


__all__ = ["edited_matrix", "merge_edits", "merge_fused"]
