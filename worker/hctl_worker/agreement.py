"""Whether a shortcut computes what the plain pass computes, checked on the model itself.

Every shortcut a trial takes (the shared prefix, replayed layers, packed prompts) is compared
once with the plain computation on the unmodified model before it is relied on: a model whose
code does something the shortcut does not foresee fails the check, and the shortcut is left off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional

from hctl_worker.encoding import cache_option, forward_options, returned_cache
from hctl_worker.first_pass import FirstPass, start_cache

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel
    from hctl_worker.prefix import SharedPrefix

# A shortcut is used only if it changes the first-token distribution by less than this KL (nats)
# on the unmodified model: rounding differences, never a different computation. 16-bit kernels
# round differently for other shapes.
TOLERANCE = 1e-4
TOLERANCE_16_BIT = 2e-3

# How many logits `agree` turns into float32 log-probabilities at once (16 MB).
AGREEMENT_CHUNK_ELEMENTS = 4 * 2**20


def agree(loaded: LoadedModel, plain: torch.Tensor, other: torch.Tensor) -> bool:
    """Two passes' logits ([rows, vocabulary]) give the same distributions, but for rounding.
    Compared a few rows at a time: a float32 copy of all rows can be larger than the model's
    activations (17 draft positions x 64 prompts x 150k tokens is 650 MB)."""
    exact = loaded.dtype == torch.float32
    rows = plain.shape[0]
    step = max(1, AGREEMENT_CHUNK_ELEMENTS // max(1, plain.shape[-1]))
    matching, divergence = 0, 0.0
    for start in range(0, rows, step):
        plain_lp = functional.log_softmax(plain[start : start + step].float(), dim=-1)
        other_lp = functional.log_softmax(other[start : start + step].float(), dim=-1)
        matching += int((plain_lp.argmax(dim=-1) == other_lp.argmax(dim=-1)).sum())
        divergence += float(functional.kl_div(other_lp, plain_lp, reduction="sum", log_target=True))
    tolerance = TOLERANCE if exact else TOLERANCE_16_BIT
    agreement = matching / max(1, rows)
    return agreement >= (1.0 if exact else 0.9) and divergence / max(1, rows) <= tolerance


def passes_agree(
    loaded: LoadedModel, prefix: SharedPrefix | None, plain: FirstPass, other: FirstPass
) -> bool:
    """Two ways of running the same prompts (no drafts) give the same next-token logits, and
    leave caches from which the next token gives the same logits too."""
    model = loaded.model
    with torch.inference_mode():
        plain_logits, plain_next = _pass_and_next(model, prefix, plain)
        other_logits, other_next = _pass_and_next(model, prefix, other)
    return agree(loaded, plain_logits, other_logits) and agree(loaded, plain_next, other_next)


def _pass_and_next(model: torch.nn.Module, prefix: SharedPrefix | None, first: FirstPass):
    cache = start_cache(model, prefix, first.cache_rows)
    outputs = first.run(model, cache)
    cache = returned_cache(outputs, cache)
    logits = outputs.logits[:, -1, :]
    token = logits.argmax(dim=-1, keepdim=True)
    mask = torch.cat([first.attention_mask, torch.ones_like(token)], dim=1)
    after = model(
        input_ids=token,
        attention_mask=mask,
        position_ids=first.position_ids[:, -1:] + 1,
        use_cache=True,
        **cache_option(model, cache),
        **forward_options(model),
    )
    return logits, after.logits[:, -1, :]


__all__ = ["TOLERANCE", "TOLERANCE_16_BIT", "agree", "passes_agree"]
