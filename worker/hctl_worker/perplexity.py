"""Cross-entropy (and perplexity) of a model on held-out harmless text.

A capability check that needs no benchmark download: how well the model predicts ordinary prose
it was never tuned on, before and after the edit. The default text set ships with the package
(`data/held_out.txt`, 40 passages written for hctl); `evaluation_text` points at another
(passages separated by blank lines, lines starting with "#" skipped). Each passage is read as
plain text (no chat template), cut to `max_tokens`, and every token after the first is
predicted; the result is the mean over all those tokens of −log p(token), in nats, so
perplexity = exp(cross-entropy).

The same pass scores a reply after its prompt (`reply_log_likelihoods`): the baseline check asks
how much a reply depends on the request it answers (see baseline_check).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional

from hctl_worker.encoding import forward_options, position_ids_for
from hctl_worker.errors import SettingsError

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

DEFAULT_TEXT = "held_out.txt"
MAX_LOGITS = 1 << 27  # logits one pass may hold (512 MiB as float32)


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
    scored = _log_likelihoods(loaded, [(row, 1) for row in ids], batch_size)
    total = sum(log_likelihood for log_likelihood, _ in scored)
    count = sum(tokens for _, tokens in scored)
    return CrossEntropy(-total / max(count, 1), count)


def reply_log_likelihoods(
    loaded: LoadedModel, prompt_texts: Sequence[str], replies: Sequence[str], *, batch_size: int
) -> list[float]:
    """The mean log-probability per token (nats) of each reply after its prompt (a chat-templated
    text), as the model is now; a reply without tokens counts 0."""
    tokenizer = loaded.tokenizer
    prompts = tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]
    answers = tokenizer(list(replies), add_special_tokens=False)["input_ids"]
    rows = [(prompt + answer, len(prompt)) for prompt, answer in zip(prompts, answers, strict=True)]
    return [total / max(tokens, 1) for total, tokens in _log_likelihoods(loaded, rows, batch_size)]


def _log_likelihoods(
    loaded: LoadedModel, rows: Sequence[tuple[list[int], int]], batch_size: int
) -> list[tuple[float, int]]:
    """For each row (token ids, index of the first token scored): the sum of log p of its tokens
    from that index on, and how many those are."""
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # A pass holds the logits of the positions it scores (and the one before): the last ones,
    # as rows are left-padded; fewer rows than `batch_size` when those would be many.
    kept = max((len(row) - max(first, 1) + 1 for row, first in rows), default=1)
    output = loaded.model.get_output_embeddings()
    vocabulary = output.weight.shape[0] if output is not None else len(tokenizer)
    batch_size = max(1, min(batch_size, MAX_LOGITS // (kept * vocabulary)))
    results: list[tuple[float, int]] = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(row) for row, _ in batch)
            keep = min(width, max(len(row) - max(first, 1) + 1 for row, first in batch))
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for index, (row, first) in enumerate(batch):  # left-padded, like every other pass
                input_ids[index, width - len(row) :] = torch.tensor(row)
                mask[index, width - len(row) :] = 1
                scored[index, width - len(row) + max(first, 1) :] = True
            input_ids, mask = input_ids.to(loaded.input_device), mask.to(loaded.input_device)
            logits = loaded.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids_for(mask),
                use_cache=False,
                **forward_options(loaded.model, keep),
            ).logits
            first_logit = width - logits.shape[1]  # 0 where the model gives every position's
            targets = input_ids[:, first_logit + 1 :].to(logits.device)
            log_probabilities = -functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                reduction="none",
            ).reshape(targets.shape)
            predicted = scored[:, first_logit + 1 :].to(logits.device)
            for index in range(len(batch)):
                values = log_probabilities[index][predicted[index]]
                results.append((float(values.sum()), int(values.numel())))
    return results


__all__ = ["CrossEntropy", "cross_entropy", "read_passages", "reply_log_likelihoods"]
