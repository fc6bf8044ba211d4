"""One optimiser step, as both fixture builders take it (make_tiny_refuser, real_refuser_build)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def optimizer_step(
    loss: torch.Tensor,
    parameters: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> float:
    """Backpropagate, clip the gradient norm to 1, step and schedule; returns the loss value."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
