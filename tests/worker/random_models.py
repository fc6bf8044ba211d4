"""Test helper: a small random model of one family, with the byte tokenizer, ready to generate."""

from __future__ import annotations

import torch

from hctl_worker.model import LoadedModel
from scripts.make_random_model import byte_tokenizer, random_model, tiny_config


def random_loaded(
    architecture: str,
    *,
    layers: int = 3,
    seed: int = 7,
    attention: str | None = None,
    sharpen: bool = True,
) -> LoadedModel:
    """A `tiny_config` model (hidden size 32) with random weights, left-padding, and the
    tokenizer's end-of-sequence token; `sharpen` scales the output head up 20x, for peaked
    logits: replies that end, and that vary with an edit. `attention` names the attention
    implementation the model is built with."""
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "left"
    config = tiny_config(architecture, hidden=32, layers=layers, vocab=len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    if attention is not None:
        config._attn_implementation = attention
    model = random_model(config, seed=seed)
    if sharpen:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(20)
    return LoadedModel(model, tokenizer, torch.float32, architecture)
