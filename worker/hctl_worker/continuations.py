"""The original model's own continuations of prompts, and KL along them (multi-token KL).

First-token KL only compares the distributions of the first reply token; an edit can leave that
token alone and still change what follows. Here the unmodified model continues each harmless
prompt greedily for up to N tokens (once per job). A trial then runs each batch of prompt +
continuation through the model in one teacher-forced forward pass and compares, at every
position of the continuation, the next-token distribution with the original's (computed once,
kept on the CPU in float32: prompts × N × vocabulary × 4 bytes).

A row's continuation ends at the model's end-of-turn token (which is kept: predicting the end is
part of the reply) or after N tokens. With N = 1 this is exactly the first-token distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional

from hctl_worker.encoding import EncodedBatch, forward_options, position_ids_for
from hctl_worker.stop_tokens import stop_token_ids

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel


@dataclass
class ForcedBatch:
    """One batch of prompt + continuation, ready for a teacher-forced pass."""

    inputs: EncodedBatch  # prompt and all but the last continuation token, left-padded
    lengths: torch.Tensor  # [rows]: continuation tokens of each row (the positions scored)
    positions: int  # how many trailing positions are kept: the longest continuation

    def mask(self) -> torch.Tensor:
        """[rows, positions]: True at the positions a row's continuation has."""
        columns = torch.arange(self.positions)[None, :]
        return columns >= (self.positions - self.lengths)[:, None]


def greedy_continuations(
    loaded: LoadedModel, batches: Sequence[EncodedBatch], tokens: int
) -> list[list[list[int]]]:
    """Per batch and row: the model's greedy continuation (token ids), at most `tokens` long,
    ending at (and including) the first stop token."""
    stops = stop_token_ids(loaded)
    pad = loaded.tokenizer.pad_token_id
    continuations = []
    with torch.inference_mode():
        for batch in batches:
            output = loaded.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=tokens,
                min_new_tokens=1,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad if pad is not None else next(iter(stops), 0),
                eos_token_id=sorted(stops) or None,
            )
            rows = []
            for row in output[:, batch.input_ids.shape[1] :].tolist():
                kept: list[int] = []
                for token in row:
                    kept.append(token)
                    if token in stops:
                        break
                rows.append(kept)
            continuations.append(rows)
    return continuations


def forced_batches(
    batches: Sequence[EncodedBatch], continuations: Sequence[Sequence[Sequence[int]]], pad: int
) -> list[ForcedBatch]:
    """Each batch's rows with their continuations appended (all but the last token: its
    prediction is the last one scored), left-padded again."""
    forced = []
    for batch, rows in zip(batches, continuations, strict=True):
        sequences = []
        for row, continuation in enumerate(rows):
            prompt = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            sequences.append(prompt + list(continuation[:-1]))
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, width - len(sequence) :] = 1
        device = batch.input_ids.device
        lengths = torch.tensor([len(continuation) for continuation in rows], dtype=torch.long)
        forced.append(
            ForcedBatch(
                EncodedBatch(batch.indices, input_ids.to(device), attention_mask.to(device)),
                lengths,
                positions=int(lengths.max()) if len(lengths) else 0,
            )
        )
    return forced


def forced_logprobs(loaded: LoadedModel, batch: ForcedBatch) -> torch.Tensor:
    """[rows, positions, vocabulary] float32 log-probabilities of the next token at the scored
    positions, from one forward pass (masked positions hold whatever the model computed)."""
    model = loaded.model
    outputs = model(
        input_ids=batch.inputs.input_ids,
        attention_mask=batch.inputs.attention_mask,
        position_ids=position_ids_for(batch.inputs.attention_mask),
        use_cache=False,
        **forward_options(model, keep=batch.positions),
    )
    logits = outputs.logits[:, -batch.positions :, :].float()
    return functional.log_softmax(logits, dim=-1)


def position_divergences(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """KL(original ‖ current) per row and position, from log-probabilities [..., vocabulary]."""
    return functional.kl_div(current, original, reduction="none", log_target=True).sum(dim=-1)


__all__ = [
    "ForcedBatch",
    "forced_batches",
    "forced_logprobs",
    "greedy_continuations",
    "position_divergences",
]
