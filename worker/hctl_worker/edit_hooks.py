"""The forward hooks that apply trials' rank-1 edits to projections' outputs (`ablation.py`).

One trial's edit of an output projection is a few small tensor operations on its output
(`_LinearEdit`). Several trials may be applied at once, one per lane: a lane's rows of a batch
get that trial's edit, so the trials share every weight read of a pass (`Lanes`). Which lane
each row belongs to is set before each pass: one lane for the whole pass (a batch's first pass,
run for one trial), or a lane per row (decode steps that carry rows of several trials).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LinearEdit:
    """What a hook needs to apply one projection's edit to its output (all on its device)."""

    direction: torch.Tensor  # v, in the activation dtype
    scaled: torch.Tensor  # the vector the correction is along, times the weight
    bias_along: torch.Tensor | None = None  # "none": vᵀb (the bias itself is not edited)
    input_row: torch.Tensor | None = None  # "pre"/"full": a = vᵀŴ, read against the input
    output_scale: torch.Tensor | None = None  # "full": 1 / m, the rows' renormalisation
    bias_shift: torch.Tensor | None = None  # "full": b (1 - 1/m), so the bias stays as it was

    def apply(self, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """The edited output. The output tensor is fresh from the projection and used nowhere
        else yet, so it is edited in place (one fused multiply-add) unless autograd records."""
        if self.input_row is None:
            along = output @ self.direction
            if self.bias_along is not None:
                along = along - self.bias_along
        else:
            along = inputs[0] @ self.input_row
        if output.requires_grad:
            if self.output_scale is not None:
                output = output * self.output_scale
                if self.bias_shift is not None:
                    output = output + self.bias_shift
            return torch.addcmul(output, along.unsqueeze(-1), self.scaled, value=-1)
        if self.output_scale is not None:
            output.mul_(self.output_scale)
            if self.bias_shift is not None:
                output.add_(self.bias_shift)
        return output.addcmul_(along.unsqueeze(-1), self.scaled, value=-1)


def linear_hook(edit: LinearEdit):
    """A forward hook computing one trial's edited projection output from the original one."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return edit.apply(inputs, output)

    return hook


def fused_hook(direction: torch.Tensor, weight: float):
    """The edit of a fused experts module whose output is linear in its down projections."""
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


class RowsNotShared(RuntimeError):
    """A projection's output does not keep the batch's rows first: its rows cannot be given
    their lanes' edits, so the trials run one by one."""


class Lanes:
    """Which applied trial (lane) each row of the next passes belongs to.

    `select(lane)` gives a whole pass to one lane; `select([lane per row])` splits a pass's rows
    (the batch dimension, first in every projection's output) among the lanes.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.lane: int | None = 0  # one lane for the whole pass
        self.rows: torch.Tensor | None = None  # else: the lane of each row
        self._devices: dict[torch.device, torch.Tensor] = {}

    def select(self, lanes: int | Sequence[int]) -> None:
        if isinstance(lanes, int):
            if not 0 <= lanes < self.count:
                raise ValueError(f"lane {lanes} of {self.count}")
            self.lane, self.rows = lanes, None
        else:
            self.lane, self.rows = None, torch.tensor(list(lanes), dtype=torch.long)
        self._devices.clear()

    def on(self, device: torch.device) -> torch.Tensor:
        """The rows' lanes on `device` (moved once per selection)."""
        assert self.rows is not None
        if device not in self._devices:
            self._devices[device] = self.rows.to(device)
        return self._devices[device]


def _stacked(edits: Sequence[LinearEdit | None], field: str, fill: float):
    """One field of every lane's edit as rows of one tensor ([lanes, ...]); a lane that does not
    edit the projection (None) gets `fill`, which leaves the output as it is."""
    present = [getattr(edit, field) if edit is not None else None for edit in edits]
    if all(value is None for value in present):
        return None
    sample = next(value for value in present if value is not None)
    return torch.stack(
        [value if value is not None else torch.full_like(sample, fill) for value in present]
    )


def lanes_hook(edits: Sequence[LinearEdit | None], lanes: Lanes):
    """A forward hook applying each lane's edit of one projection (None: the lane leaves it as
    it is) to that lane's rows; with one lane for the pass, exactly that lane's edit."""
    # A lane without an edit: a zero direction (no correction), scale 1 and no shift.
    directions = _stacked(edits, "direction", 0.0)
    scaled = _stacked(edits, "scaled", 0.0)
    bias_along = _stacked(edits, "bias_along", 0.0)
    input_rows = _stacked(edits, "input_row", 0.0)
    output_scales = _stacked(edits, "output_scale", 1.0)
    bias_shifts = _stacked(edits, "bias_shift", 0.0)

    def per_row(table: torch.Tensor, lane: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        # [rows, features] → [rows, 1, ..., features], broadcasting over the positions.
        return table[lane].view(lane.shape[0], *([1] * (output.dim() - 2)), table.shape[-1])

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if lanes.lane is not None:
            edit = edits[lanes.lane]
            return output if edit is None else edit.apply(inputs, output)
        lane = lanes.on(output.device)
        if output.dim() < 2 or output.shape[0] != lane.shape[0]:
            raise RowsNotShared(
                f"{type(module).__name__} gave an output of shape {tuple(output.shape)} for "
                f"{lane.shape[0]} rows: trials cannot share its passes"
            )
        if input_rows is None:
            along = output @ directions.T  # [rows, ..., lanes]
            if bias_along is not None:
                along = along - bias_along
        else:
            along = inputs[0] @ input_rows.T
        index = lane.view(lane.shape[0], *([1] * (along.dim() - 1))).expand(*along.shape[:-1], 1)
        along = along.gather(-1, index)  # each row's own lane
        if output.requires_grad:
            output = output.clone()
        if output_scales is not None:
            output.mul_(per_row(output_scales, lane, output))
            if bias_shifts is not None:
                output.add_(per_row(bias_shifts, lane, output))
        return output.addcmul_(along, per_row(scaled, lane, output), value=-1)

    return hook


__all__ = ["Lanes", "LinearEdit", "RowsNotShared", "fused_hook", "lanes_hook", "linear_hook"]
