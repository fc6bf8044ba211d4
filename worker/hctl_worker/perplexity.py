"""Cross-entropy (and perplexity) of a model on held-out harmless text.

A capability check that needs no benchmark download: how well the model predicts ordinary prose
it was never tuned on, before and after the edit. The default text set ships with the package
(`data/held_out.txt`, 40 passages written for hctl); `evaluation_text` points at another
(passages separated by blank lines, lines starting with "#" skipped). Each passage is read as
plain text (no chat template), cut to `max_tokens`, and every token after the first is
predicted; the result is the mean over all those tokens of −log p(token), in nats, so
perplexity = exp(cross-entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional

from hctl_worker.errors import SettingsError
from hctl_worker.generation import position_ids_for

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

DEFAULT_TEXT = "held_out.txt"


@dataclass(frozen=True)
class CrossEntropy:
    nats: float  # mean −log p per predicted token
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nats, 700.0))


def read_passages(path: str | None = None) -> list[str]:
    """The passages of a text file (blank lines separate them), or of the packaged set."""
    if path is None:
        text = resources.files("hctl_worker").joinpath("data", DEFAULT_TEXT).read_text("utf-8")
    else:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as error:
            raise SettingsError(
                f"evaluation_text: cannot read {path}: {error.strerror or error}",
                "Give a text file of passages separated by blank lines, or leave it unset.",
            ) from None
    passages, current = [], []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.strip():
            current.append(line.strip())
        elif current:
            passages.append(" ".join(current))
            current = []
    if current:
        passages.append(" ".join(current))
    if not passages:
        raise SettingsError(
            f"evaluation_text: no passages in {path}", "Separate passages with blank lines."
        )
    return passages


def cross_entropy(
    loaded: LoadedModel, passages: list[str], *, batch_size: int = 4, max_tokens: int = 256
) -> CrossEntropy:
    """Mean next-token cross-entropy of the model as it is now over the passages' tokens."""
    tokenizer = loaded.tokenizer
    ids = [row[:max_tokens] for row in tokenizer(passages, add_special_tokens=True)["input_ids"]]
    ids = [row for row in ids if len(row) >= 2]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), max(1, batch_size)):
            rows = ids[start : start + max(1, batch_size)]
            width = max(len(row) for row in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for index, row in enumerate(rows):  # left-padded, like every other pass
                input_ids[index, width - len(row) :] = torch.tensor(row)
                mask[index, width - len(row) :] = 1
            input_ids, mask = input_ids.to(loaded.input_device), mask.to(loaded.input_device)
            logits = loaded.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids_for(mask),
                use_cache=False,
            ).logits
            targets = input_ids[:, 1:].to(logits.device)
            predicted = mask[:, 1:].to(logits.device).bool() & mask[:, :-1].to(logits.device).bool()
            losses = functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                reduction="none",
            ).reshape(targets.shape)
            total += float(losses[predicted].sum())
            count += int(predicted.sum())
    return CrossEntropy(total / max(count, 1), count)


__all__ = ["CrossEntropy", "cross_entropy", "read_passages"]
