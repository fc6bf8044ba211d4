"""Ablation: the tent kernel, the edit's maths, structural layer/projection finding on many
architectures, exact restore, and merge (also through save_pretrained) equal to the trial."""

from __future__ import annotations

import math

import pytest
import torch

from hctl_worker.ablation import (
    AblationParams,
    Ablator,
    ComponentKernel,
    kernel_weights,
)
from hctl_worker.architecture import COMPONENTS, find_layers, find_projections
from hctl_worker.errors import SettingsError
from hctl_worker.merging import edited_matrix
from hctl_worker.model import LoadedModel
from scripts.make_random_model import TINY_ARCHITECTURES, byte_tokenizer, random_model, tiny_config

HIDDEN = 32


def tiny(architecture: str, layers: int = 2) -> LoadedModel:
    model = random_model(tiny_config(architecture, hidden=HIDDEN, layers=layers), seed=1)
    # Biases start at zero in some families; non-zero ones make the bias handling matter.
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and parameter.dim() >= 1:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return LoadedModel(model=model, tokenizer=None, dtype=torch.float32, source=architecture)


def logits(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(input_ids=input_ids, use_cache=False).logits.float()


def random_directions(n_layers: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_layers + 1, HIDDEN, generator=generator)
    return directions / directions.norm(dim=-1, keepdim=True)


def strong_params(direction_index: float | None = 0.5) -> AblationParams:
    kernel = ComponentKernel(
        max_weight=1.3, max_weight_position=0.5, min_weight=0.6, min_weight_distance=1.0
    )
    return AblationParams(direction_index, {"attention": kernel, "mlp": kernel})


INPUT_IDS = torch.tensor([[5, 9, 17, 33, 2, 40], [7, 7, 100, 12, 60, 3]])


# ---- pure maths ------------------------------------------------------------------------------


def test_kernel_is_a_tent_peaking_at_the_position() -> None:
    kernel = ComponentKernel(
        max_weight=1.5, max_weight_position=2.0, min_weight=0.5, min_weight_distance=2.0
    )
    assert kernel_weights(kernel, 6) == pytest.approx([0.5, 1.0, 1.5, 1.0, 0.5, 0.0])


def test_kernel_is_zero_beyond_the_distance_and_handles_fractional_positions() -> None:
    kernel = ComponentKernel(
        max_weight=1.0, max_weight_position=1.5, min_weight=0.0, min_weight_distance=1.0
    )
    assert kernel_weights(kernel, 4) == pytest.approx([0.0, 0.5, 0.5, 0.0])
    point = ComponentKernel(1.0, 1.0, 0.2, 0.0)
    assert kernel_weights(point, 3) == [0.0, 1.0, 0.0]


def test_full_edit_removes_the_direction_from_the_output() -> None:
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(8, 5, generator=generator)
    direction = torch.randn(8, generator=generator)
    direction /= direction.norm()
    edited = edited_matrix(matrix, direction, 1.0, "none")
    assert torch.allclose(direction @ edited, torch.zeros(5), atol=1e-5)
    # A weight above 1 over-ablates: the component flips sign.
    over = edited_matrix(matrix, direction, 1.5, "none")
    assert torch.allclose(direction @ over, -0.5 * (direction @ matrix), atol=1e-5)


def test_full_row_normalization_keeps_every_row_norm() -> None:
    generator = torch.Generator().manual_seed(4)
    matrix = torch.randn(8, 5, generator=generator)
    direction = torch.randn(8, generator=generator)
    direction /= direction.norm()
    edited = edited_matrix(matrix, direction, 1.0, "full")
    assert torch.allclose(edited.norm(dim=1), matrix.norm(dim=1), atol=1e-5)
    assert not torch.allclose(edited, matrix)


def test_params_round_trip_through_a_flat_dict() -> None:
    params = strong_params(2.25)
    flat = params.to_dict()
    assert flat["direction_index"] == 2.25
    assert flat["mlp.min_weight_distance"] == 1.0
    assert AblationParams.from_dict(flat) == params
    assert AblationParams.from_dict({**flat, "direction_index": None}).direction_index is None
    with pytest.raises(SettingsError):
        AblationParams.from_dict({"attention.max_weight": 1.0})
    with pytest.raises(SettingsError):
        AblationParams.from_dict({**flat, "attention.bogus": 1.0})


# ---- structure -------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_layers_and_projections_are_found_by_structure(architecture: str) -> None:
    loaded = tiny(architecture, layers=3)
    layers = find_layers(loaded.model)
    assert len(layers) == 3
    for layer in layers:
        projections = find_projections(layer, HIDDEN)
        assert set(projections) == set(COMPONENTS)
        assert len(projections["attention"]) == 1
        assert projections["mlp"], f"no MLP projection in {architecture}"
        for modules in projections.values():
            for module in modules:
                shapes = [p.shape for p in module.parameters(recurse=False) if p.dim() >= 2]
                # Linear: [hidden, in]; Conv1D: [in, hidden]; fused experts: [experts, ., .].
                assert any(HIDDEN in tuple(shape)[-2:] for shape in shapes)
        # Without the hint the hidden size is inferred from the block itself.
        assert find_projections(layer) == projections


def test_moe_finds_every_expert_and_the_shared_expert() -> None:
    qwen2_moe = tiny("qwen2_moe")
    names = {id(module): name for name, module in qwen2_moe.model.named_modules()}
    mlp = [names[id(m)] for m in find_projections(find_layers(qwen2_moe.model)[0], HIDDEN)["mlp"]]
    assert mlp == ["model.layers.0.mlp.experts", "model.layers.0.mlp.shared_expert.down_proj"]
    attention = find_projections(find_layers(qwen2_moe.model)[0], HIDDEN)["attention"]
    assert [names[id(m)] for m in attention] == ["model.layers.0.self_attn.o_proj"]


# ---- apply / restore / merge -----------------------------------------------------------------


@pytest.mark.parametrize("row_normalization", ["none", "full"])
@pytest.mark.parametrize(
    "architecture", ["qwen3", "gpt2", "gpt_neox", "phi", "qwen3_moe", "opt", "lfm2", "qwen3_next"]
)
def test_apply_changes_outputs_and_restore_gives_them_back_exactly(
    architecture: str, row_normalization: str
) -> None:
    loaded = tiny(architecture)
    before = logits(loaded, INPUT_IDS)
    ablator = Ablator(loaded, random_directions(2), row_normalization=row_normalization)
    for params in (strong_params(0.5), strong_params(None)):
        with ablator.applied(params):
            during = logits(loaded, INPUT_IDS)
        assert not torch.allclose(during, before, atol=1e-4)
        assert torch.equal(logits(loaded, INPUT_IDS), before)
    ablator.apply(strong_params(0.2))
    ablator.apply(strong_params(0.9))  # a second apply replaces the first
    ablator.restore()
    assert torch.equal(logits(loaded, INPUT_IDS), before)


@pytest.mark.parametrize("row_normalization", ["none", "pre", "full"])
@pytest.mark.parametrize(
    "architecture", ["llama", "gpt2", "phi", "qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3"]
)
def test_merge_computes_what_the_trial_computed(architecture: str, row_normalization: str) -> None:
    loaded = tiny(architecture)
    ablator = Ablator(loaded, random_directions(2), row_normalization=row_normalization)
    params = strong_params(0.7)
    with ablator.applied(params):
        during = logits(loaded, INPUT_IDS)
    ablator.merge(params)
    after = logits(loaded, INPUT_IDS)
    assert torch.allclose(after, during, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(after, logits(tiny(architecture), INPUT_IDS), atol=1e-4)


def test_an_untouched_component_and_zero_weights_leave_the_model_alone() -> None:
    loaded = tiny("qwen3")
    before = logits(loaded, INPUT_IDS)
    ablator = Ablator(loaded, random_directions(2))
    off = ComponentKernel(
        max_weight=0.0, max_weight_position=0.0, min_weight=0.0, min_weight_distance=1.0
    )
    with ablator.applied(AblationParams(0.5, {"mlp": off})):
        assert torch.equal(logits(loaded, INPUT_IDS), before)


def test_the_exported_model_reloads_with_the_trial_logits(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = tiny("qwen3")
    loaded.tokenizer = byte_tokenizer()
    ablator = Ablator(loaded, random_directions(2), row_normalization="full")
    params = strong_params(None)
    with ablator.applied(params):
        during = logits(loaded, INPUT_IDS)
    ablator.merge(params)
    loaded.model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.inference_mode():
        exported = reloaded.eval()(input_ids=INPUT_IDS, use_cache=False).logits
    assert torch.allclose(exported, during, atol=2e-5, rtol=1e-4)


def test_attention_output_loses_the_direction_at_weight_one() -> None:
    loaded = tiny("llama")
    directions = random_directions(2)
    ablator = Ablator(loaded, directions)
    kernel = ComponentKernel(1.0, 0.0, 1.0, 5.0)
    captured: list[torch.Tensor] = []
    o_proj = find_projections(find_layers(loaded.model)[1], HIDDEN)["attention"][0]
    with ablator.applied(AblationParams(None, {"attention": kernel})):
        # Registered after the ablation hook, so it sees the edited output.
        handle = o_proj.register_forward_hook(lambda m, i, o: captured.append(o))
        logits(loaded, INPUT_IDS)
        handle.remove()
    along = captured[0] @ directions[2]
    assert along.abs().max().item() < 1e-5
    assert math.isfinite(float(captured[0].norm()))


def test_projected_embeddings_do_not_hide_the_residual_width() -> None:
    from transformers import AutoModelForCausalLM, OPTConfig

    # OPT-350m style: 16-wide embeddings projected into a 32-wide residual stream.
    config = OPTConfig(
        vocab_size=300,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    loaded = LoadedModel(model=model, tokenizer=None, dtype=torch.float32, source="opt")
    ablator = Ablator(loaded, random_directions(2))
    assert ablator.describe() == {"attention": 2, "mlp": 2}
    before = logits(loaded, INPUT_IDS)
    with ablator.applied(strong_params()):
        assert not torch.allclose(logits(loaded, INPUT_IDS), before, atol=1e-4)
    assert torch.equal(logits(loaded, INPUT_IDS), before)


def test_a_vision_language_model_is_edited_in_its_language_model() -> None:
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=300,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    # A vision tower exactly as deep as the language model.
    vision = CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    model = AutoModelForImageTextToText.from_config(
        LlavaConfig(text_config=text, vision_config=vision)
    )
    names = {id(module): name for name, module in model.named_modules()}
    layers = find_layers(model)
    assert [names[id(layer)] for layer in layers] == [
        "model.language_model.layers.0",
        "model.language_model.layers.1",
    ]
    projections = find_projections(layers[1], HIDDEN)
    assert [names[id(m)] for m in projections["attention"]] == [
        "model.language_model.layers.1.self_attn.o_proj"
    ]


def test_unsupported_models_and_unknown_components_are_clear_errors() -> None:
    from hctl_worker.errors import ModelLoadError

    class NoLayers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, HIDDEN)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.embed

    with pytest.raises(ModelLoadError) as caught:
        Ablator(LoadedModel(NoLayers(), None, torch.float32, "x"), random_directions(2))
    assert caught.value.hint
    loaded = tiny("llama")
    ablator = Ablator(loaded, random_directions(2))
    kernel = ComponentKernel(1.0, 0.0, 1.0, 1.0)
    with pytest.raises(SettingsError):
        ablator.apply(AblationParams(0.0, {"embeddings": kernel}))
    with pytest.raises(SettingsError):
        Ablator(loaded, random_directions(2), row_normalization="sometimes")
    with pytest.raises(ValueError):
        Ablator(loaded, random_directions(5))
