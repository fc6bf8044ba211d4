"""The GPU benchmark's helpers (scripts/device/): the real shapes the random models are built in,
the bytes a decode step reads, and heretic's import-only stand-ins, which must refuse any use."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hctl_worker.model import LoadedModel
from scripts.device.decode_roofline import weight_bytes
from scripts.make_random_model import REAL_SHAPES, byte_tokenizer, random_model, tiny_config

STUBS = "scripts/device/heretic_stubs"


@pytest.mark.parametrize(
    ("shape", "low", "high"),
    # Llama-3-8B has 8,030,261,248 parameters; Qwen3-4B 4.02 billion with its tied embedding.
    [("llama-3-8b", 8_030_261_248, 8_030_261_248), ("qwen3-4b", 4.0e9, 4.05e9)],
)
def test_real_shapes_have_their_published_parameter_counts(shape, low, high) -> None:
    model = random_model(REAL_SHAPES[shape](), dtype=torch.bfloat16, device="meta")
    unique = {id(parameter): parameter for parameter in model.parameters()}
    assert low <= sum(parameter.numel() for parameter in unique.values()) <= high


@pytest.mark.parametrize("tied", [False, True])
def test_a_decode_step_reads_the_input_embedding_only_when_the_output_layer_is_it(tied) -> None:
    config = tiny_config("qwen3", hidden=32, vocab=300)
    config.tie_word_embeddings = tied
    model = random_model(config)
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), dtype=torch.float32, source="")
    unique = {id(parameter): parameter for parameter in model.parameters()}
    every = sum(parameter.numel() * 4 for parameter in unique.values())
    embedding = model.get_input_embeddings().weight.numel() * 4
    assert weight_bytes(loaded) == (every if tied else every - embedding)


def _stand_in(relative: str):
    spec = importlib.util.spec_from_file_location(f"stand_in_{relative}", f"{STUBS}/{relative}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stand_ins_raise_on_any_use() -> None:
    for relative in ("bitsandbytes/__init__.py", "lm_eval/__init__.py"):
        with pytest.raises(RuntimeError, match="stand-in"):
            _stand_in(relative).nn  # noqa: B018
    with pytest.raises(RuntimeError, match="stand-in"):
        _stand_in("lm_eval/models/huggingface.py").HFLM(pretrained=None)
