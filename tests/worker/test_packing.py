"""Packed prompts: a prefill without padding computes what the padded prefill computes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel
from hctl_worker.agreement import passes_agree
from hctl_worker.architecture import find_layers, mlp_block
from hctl_worker.directions import last_token_residuals, refusal_directions
from hctl_worker.encoding import encode_texts
from hctl_worker.first_pass import FirstPass, start_cache
from hctl_worker.model import LoadedModel, load_model
from hctl_worker.packing import attention_weight, attention_window, plan_packing
from hctl_worker.prefix import SharedPrefix
from hctl_worker.reuse import ReuseOptions
from tests.worker.random_models import random_loaded
from tests.worker.scoring import evaluator_for, scored, scoring_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SYSTEM = "You are a helpful assistant."
PROMPTS = [
    "Hi",
    "How do I bake sourdough bread at home without a starter?",
    "Tell me a joke.",
    "Explain how photosynthesis works, step by step, for a child.",
    "Why?",
    "Write a short poem about the sea and the wind over it.",
    "Name a colour.",
    "What is the capital of Australia?",
]


def _left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row)
        mask[index, width - len(row) :] = 1
    return ids, mask


def test_every_prompt_lies_once_in_the_packed_rows_at_its_padded_positions() -> None:
    rows = [[10 + i] * n for i, n in enumerate([9, 2, 3, 8, 1, 5, 4, 7])]
    ids, mask = _left_padded(rows)
    packing = plan_packing(ids, mask, prefix=6, pad_id=0, attention_weight=1000.0)
    assert packing is not None
    assert packing.rows < len(rows)
    assert packing.input_ids.numel() < ids.numel()  # fewer cells than the padded batch
    seen = set()
    for index, row in enumerate(rows):
        place = packing.bins[index], packing.starts[index]
        columns = slice(place[1], place[1] + len(row))
        assert packing.input_ids[place[0], columns].tolist() == row
        assert packing.position_ids[place[0], columns].tolist() == [6 + j for j in range(len(row))]
        seen.update((place[0], column) for column in range(columns.start, columns.stop))
    assert len(seen) == sum(len(row) for row in rows)  # no two prompts share a cell
    # A token attends to the prefix and to its own prompt's tokens up to itself, nothing else.
    allowed = packing.attention_mask(torch.float32)[:, 0] == 0
    first = packing.bins[0], packing.starts[0]
    query = allowed[first[0], first[1] + 3]
    assert query[:6].all()
    assert query[6:].nonzero().flatten().tolist() == [first[1] + j for j in range(4)]


def test_prompts_of_one_length_or_one_prompt_are_not_packed() -> None:
    ids, mask = _left_padded([[5] * 7] * 6)
    assert plan_packing(ids, mask, prefix=4, pad_id=0, attention_weight=1000.0) is None
    ids, mask = _left_padded([[5] * 7])
    assert plan_packing(ids, mask, prefix=4, pad_id=0, attention_weight=1000.0) is None


def test_dear_attention_keeps_rows_short() -> None:
    """Where attention is cheap the packing has no padding at all; where it is dear (wide rows
    cost it quadratically), the rows stay shorter at the price of a little padding."""
    lengths = [6, 5, 4, 3, 3, 2, 2, 1, 1, 1]
    ids, mask = _left_padded([[3] * n for n in lengths])
    cheap = plan_packing(ids, mask, prefix=0, pad_id=0, attention_weight=1e6)
    dear = plan_packing(ids, mask, prefix=0, pad_id=0, attention_weight=3.0)
    assert cheap is not None and dear is not None
    assert cheap.input_ids.numel() == sum(lengths)
    assert dear.width < cheap.width and dear.input_ids.numel() > sum(lengths)


def _fixture() -> LoadedModel:
    return load_model(str(FIXTURES / "tiny-refuser"), dtypes=["float32"], device_map="cpu")


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_a_packed_pass_leaves_the_padded_pass_logits_and_keys(shared_prefix: bool) -> None:
    loaded = _fixture()
    texts = loaded.template(PROMPTS, SYSTEM)
    (batch,) = encode_texts(loaded, texts, 8)
    prefix = SharedPrefix.find(loaded, texts) if shared_prefix else None
    if prefix is not None:
        prefix.refresh(loaded.model)
    weight = attention_weight(loaded.model, find_layers(loaded.model))
    padded = FirstPass.build(batch, prefix)
    packed = FirstPass.build(batch, prefix, attention_weight=weight)
    assert packed.packing is not None and packed.cells < padded.cells
    model = loaded.model
    last_mlp = mlp_block(find_layers(model)[-1])
    assert last_mlp is find_layers(model)[-1].mlp
    seen: list[tuple[int, ...]] = []
    # What it computed on (its forward hooks see the inputs after every pre-hook).
    handle = last_mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    with torch.inference_mode():
        caches = [start_cache(model, prefix, first.cache_rows) for first in (padded, packed)]
        outputs = [
            first.run(model, cache) for first, cache in zip((padded, packed), caches, strict=True)
        ]
    handle.remove()
    # Packed, the last layer's MLP computed each prompt's last token and nothing else.
    assert [tuple(shape[:2]) for shape in seen] == [
        tuple(padded.input_ids.shape),
        (len(PROMPTS), 1),
    ]
    torch.testing.assert_close(
        outputs[1].logits[:, -1], outputs[0].logits[:, -1], rtol=1e-4, atol=1e-4
    )
    real = padded.attention_mask.bool()  # the columns a later token attends to
    for plain_layer, packed_layer in zip(caches[0].layers, caches[1].layers, strict=True):
        assert packed_layer.keys.shape == plain_layer.keys.shape
        torch.testing.assert_close(
            packed_layer.keys.transpose(1, 2)[real],
            plain_layer.keys.transpose(1, 2)[real],
            rtol=1e-4,
            atol=1e-4,
        )
        torch.testing.assert_close(
            packed_layer.values.transpose(1, 2)[real],
            plain_layer.values.transpose(1, 2)[real],
            rtol=1e-4,
            atol=1e-4,
        )
    assert passes_agree(loaded, prefix, padded, packed)


def _ignoring_masks(module, query, key, value, attention_mask, **kwargs):
    """Attention as a model that builds its own causal mask would do it: the mask it is given
    (padding, or packed prompts) is not read."""
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "hctl_ignores_masks"])
def test_a_model_whose_attention_ignores_the_mask_is_not_packed(attention: str) -> None:
    AttentionInterface.register("hctl_ignores_masks", _ignoring_masks)
    loaded = random_loaded("qwen3", seed=3, sharpen=False)
    loaded.model.set_attn_implementation(attention)
    texts = loaded.template(PROMPTS, SYSTEM)
    (batch,) = encode_texts(loaded, texts, 8)
    packed = FirstPass.build(batch, None, attention_weight=1000.0)
    assert packed.packing is not None  # these prompts would pack
    evaluator = evaluator_for(
        loaded, scoring_for(["zz"]), good=texts, bad=texts, max_response_length=4, batch_size=8
    )
    assert evaluator.reuse.packed is (attention != "hctl_ignores_masks")


def test_the_narrowest_attention_window_is_found_in_the_model_config_or_its_text_config() -> None:
    assert attention_window(SimpleNamespace(sliding_window=None)) is None
    assert attention_window(SimpleNamespace(sliding_window=4096, attention_chunk_size=512)) == 512
    text = SimpleNamespace(sliding_window=1024)
    outer = SimpleNamespace(get_text_config=lambda: text)
    assert attention_window(outer) == 1024


@pytest.mark.parametrize(
    "architecture",
    [
        "llama", "qwen2", "mistral", "gemma", "phi", "phi3", "gpt2", "gpt_neox", "qwen3_moe",
        "mixtral", "gemma2", "falcon", "opt", "gpt_oss", "deepseek_v3",
    ],
)  # fmt: skip
def test_packed_or_padded_every_family_scores_a_trial_alike(architecture: str) -> None:
    """Whatever the family (its attention, positions, caches), an evaluation that packs where its
    check allows gives the padded evaluation's refusals and KL under an edit, batch by batch."""
    loaded = random_loaded(architecture, seed=11)  # replies that vary with the edit
    texts = loaded.template(PROMPTS, SYSTEM)
    residuals = last_token_residuals(loaded, texts, 4)
    ablator = Ablator(loaded, refusal_directions(residuals[:4], residuals[4:]))
    scoring = scoring_for(["e", "zz"])
    common = dict(good=texts, bad=texts, max_response_length=6, batch_size=4)
    evaluators = [
        evaluator_for(
            loaded,
            scoring,
            unchanged_layers=ablator.unchanged_layers,
            reuse=ReuseOptions(pack=pack),
            **common,
        )
        for pack in (False, True)
    ]
    assert not evaluators[0].reuse.packed
    # Packed unless the cache is a sliding window's (those families run padded, and alike).
    assert evaluators[1].reuse.packed is (architecture not in ("mistral", "gemma2"))
    # Packed passes run the last layer's MLP on the prompts' last tokens only, where the MLP is
    # a block of its own (OPT's fc1 and fc2 lie in the layer itself).
    assert (mlp_block(find_layers(loaded.model)[-1]) is None) is (architecture == "opt")
    kernel = ComponentKernel(1.2, 1.0, 0.6, 1.5)
    with ablator.applied(AblationParams(1.0, {"attention": kernel, "mlp": kernel})):
        padded, packed = (scored(scoring, evaluator) for evaluator in evaluators)
    assert packed.refusals == padded.refusals
    assert packed.kl == pytest.approx(padded.kl, rel=1e-4, abs=1e-6)
