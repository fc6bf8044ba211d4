"""Refusal directions: difference of means, projection, separation, interpolation, and residual
extraction that does not depend on batching or padding."""

from __future__ import annotations

import pytest
import torch

from hctl_worker.directions import (
    interpolate_direction,
    last_token_activations,
    last_token_residuals,
    layer_separation,
    refusal_directions,
    written_along,
)
from hctl_worker.model import LoadedModel, load_model
from scripts.make_random_model import byte_tokenizer, make_random_model, random_model, tiny_config


def test_directions_are_unit_differences_of_means() -> None:
    bad = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 4.0]]])  # 2 prompts, 2 layers
    good = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    directions = refusal_directions(bad, good, orthogonalize=False)
    assert torch.allclose(directions, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_projection_removes_the_harmless_mean_component() -> None:
    good = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]])
    bad = torch.tensor([[[2.0, 1.0, 0.0]], [[2.0, 1.0, 0.0]]])
    plain = refusal_directions(bad, good, orthogonalize=False)
    projected = refusal_directions(bad, good, orthogonalize=True)
    assert torch.allclose(plain[0], torch.tensor([1.0, 1.0, 0.0]) / 2**0.5)
    assert torch.allclose(projected[0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(projected.norm(dim=-1), torch.ones(1))


def test_layer_separation_is_high_where_the_classes_split() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(40, 3, 8, generator=generator)
    good, bad = noise[:20].clone(), noise[20:].clone()
    bad[:, 2, 0] += 10.0  # only layer index 2 separates the classes
    separation = layer_separation(bad, good)
    assert separation.shape == (3,)
    assert int(separation.argmax()) == 2
    assert separation[2] > 5 * separation[:2].max()


def test_interpolation_skips_the_embeddings_entry_and_blends_neighbours() -> None:
    directions = torch.eye(4)  # entry k = output of layer k - 1
    assert torch.allclose(interpolate_direction(directions, 0.0), directions[1])
    assert torch.allclose(interpolate_direction(directions, 2.0), directions[3])
    halfway = interpolate_direction(directions, 1.5)
    assert torch.allclose(halfway, torch.tensor([0.0, 0.0, 1.0, 1.0]) / 2**0.5)
    assert torch.allclose(interpolate_direction(directions, 99.0), directions[3])
    assert halfway.norm().item() == pytest.approx(1.0)


def test_residuals_do_not_depend_on_batching_or_padding(tmp_path) -> None:
    path = make_random_model(tmp_path / "llama", "llama", hidden=32, layers=3)
    loaded = load_model(str(path), dtypes=["float32"], device_map="cpu")
    texts = loaded.template(
        ["hi", "a much longer prompt with many more tokens in it", "mid size"], None
    )
    together = last_token_residuals(loaded, texts, batch_size=3)
    alone = torch.cat([last_token_residuals(loaded, [text], batch_size=1) for text in texts])
    assert together.shape == (3, 4, 32)
    assert together.dtype == torch.float32 and together.device.type == "cpu"
    assert torch.allclose(together, alone, atol=1e-4)
    # Index 0 is the embeddings output of the last prompt token.
    last_token = loaded.tokenizer(texts[0], add_special_tokens=False)["input_ids"][-1]
    embedding = loaded.model.get_input_embeddings().weight[last_token]
    assert torch.allclose(together[0, 0], embedding.detach(), atol=1e-6)
    # The other entries are transformers' hidden states (the last one before the final norm).
    encoded = loaded.tokenizer(texts[1:2], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        reference = loaded.model(**encoded, output_hidden_states=True).hidden_states
    for index in range(3):
        assert torch.allclose(together[1, index], reference[index][0, -1], atol=1e-5)


@pytest.mark.parametrize("architecture", ["gpt2", "gpt_neox", "qwen3_moe", "lfm2", "qwen3_next"])
def test_residuals_are_the_hidden_states_on_other_architectures(architecture: str) -> None:
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "left"
    config = tiny_config(architecture, hidden=32, layers=2, vocab=len(tokenizer))
    loaded = LoadedModel(random_model(config), tokenizer, torch.float32, architecture)
    texts = ["short", "a somewhat longer prompt"]
    residuals = last_token_residuals(loaded, texts, batch_size=2)
    assert residuals.shape == (2, 3, 32)
    encoded = tokenizer(texts[1:], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        reference = loaded.model(**encoded, output_hidden_states=True).hidden_states
    for index in range(2):  # the last entry differs by the final norm
        assert torch.allclose(residuals[1, index], reference[index][0, -1], atol=1e-4)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "qwen3_moe"])
def test_component_writes_add_up_to_what_each_layer_adds(architecture: str) -> None:
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "left"
    config = tiny_config(architecture, hidden=32, layers=3, vocab=len(tokenizer))
    loaded = LoadedModel(random_model(config), tokenizer, torch.float32, architecture)
    texts = ["short", "a somewhat longer prompt", "mid size one"]
    activations = last_token_activations(loaded, texts, batch_size=2)
    assert activations.writes.shape == (3, 2, 32)
    # Attention plus MLP is what the layer added to the residual stream (the last layer's
    # output is read before the final norm, so this holds for every layer).
    added = activations.residuals.double().mean(dim=0).diff(dim=0)
    assert torch.allclose(activations.writes.sum(dim=1), added, atol=1e-4)
    if architecture == "llama":  # dense: attention is read at its output projection itself
        outputs = []
        layer = loaded.model.model.layers[1]
        handle = layer.self_attn.o_proj.register_forward_hook(
            lambda module, args, output: outputs.append(output[:, -1])
        )
        last_token_residuals(loaded, texts, batch_size=3)
        handle.remove()
        expected = torch.cat(outputs).double().mean(dim=0)
        assert torch.allclose(activations.writes[1, 0], expected, atol=1e-5)


def test_writes_along_a_direction_show_where_refusal_is_written() -> None:
    writes = torch.zeros(3, 2, 4)  # 3 layers, attention and MLP, hidden 4
    writes[0, 1] = torch.tensor([2.0, 0.0, 0.0, 1.0])  # layer 0's MLP writes along axis 0
    writes[2, 0] = torch.tensor([0.0, 3.0, 0.0, 0.0])  # layer 2's attention along axis 1
    directions = torch.eye(4)  # hidden state k's direction is axis k
    along = written_along(writes, directions)
    assert along.shape == (4, 3, 2)
    assert along[0].tolist() == [[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]
    assert along[1].tolist() == [[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]]
