"""Float32 linear layers through oneDNN (`cpu_linear.py`): the model computes what it computed
through torch's default, to float rounding, and keeps its hooks, its edits and its gradients."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

import hctl_worker.cpu_linear as cpu_linear
from hctl_worker.cpu_linear import MIN_ROWS, cpu_float32_linears, install, linear_of, route
from tests.worker.random_models import random_loaded


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma2"])
def test_a_routed_model_computes_what_it_did(architecture: str) -> None:
    loaded = random_loaded(architecture)
    model = loaded.model
    input_ids = torch.randint(3, 200, (6, 9), generator=torch.Generator().manual_seed(1))
    before = _logits(model, input_ids)
    layers = cpu_float32_linears(model)
    assert layers and all(linear_of(layer) is functional.linear for layer in layers)
    route(layers)
    assert all(linear_of(layer) is cpu_linear.onednn_linear for layer in layers)
    after = _logits(model, input_ids)
    scale = float(before.abs().max())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5 * scale)
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_routed_layers_keep_hooks_edits_and_gradients() -> None:
    layer = torch.nn.Linear(16, 24)
    route([layer])
    rows = torch.randn(MIN_ROWS + 4, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = functional.linear(rows, layer.weight, layer.bias)
        torch.testing.assert_close(layer(rows), expected, rtol=1e-5, atol=1e-5)
        # A forward hook still sees (and may change) the output.
        handle = layer.register_forward_hook(lambda module, args, output: output * 0)
        assert not layer(rows).any()
        handle.remove()
    # An edit in place is seen at the next call (the weight is read each time, not packed).
    with torch.no_grad():
        layer.weight.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(
            layer(rows), functional.linear(rows, layer.weight, layer.bias), rtol=1e-5, atol=1e-5
        )
    # With gradients wanted, torch's own product runs, and gives them.
    wanted = rows.clone().requires_grad_(True)
    layer(wanted).sum().backward()
    assert wanted.grad is not None and layer.weight.grad is not None


def test_few_rows_go_through_torchs_own_product() -> None:
    weight = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    rows = torch.randn(MIN_ROWS - 1, 16, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(cpu_linear.onednn_linear(rows, weight), functional.linear(rows, weight))


def test_install_says_what_it_measured_and_routes_only_when_faster() -> None:
    loaded = random_loaded("llama")
    line = install(loaded.model)
    assert line is not None and line.startswith("CPU linear layers: ")
    layers = cpu_float32_linears(loaded.model)
    routed = [layer for layer in layers if linear_of(layer) is cpu_linear.onednn_linear]
    assert bool(routed) == line.startswith("CPU linear layers: oneDNN")
    for layer in layers:  # every shape is named in the line, with its measurements
        assert "x".join(map(str, layer.weight.shape)) + ": " in line


def test_each_shape_takes_onednn_only_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """As measured on a Zen 4 machine: only the output head's wide product is faster."""
    loaded = random_loaded("llama")
    head = loaded.model.get_output_embeddings()
    measured = {tuple(head.weight.shape): [1.40, 1.15]}  # the rest: [1.04, 1.01]
    monkeypatch.setattr(
        cpu_linear,
        "_speedup",
        lambda weight, rows: measured.get(tuple(weight.shape), [1.04, 1.01])[
            cpu_linear.MEASURED_ROWS.index(rows)
        ],
    )
    line = install(loaded.model)
    layers = cpu_float32_linears(loaded.model)
    assert line.startswith(f"CPU linear layers: oneDNN for 1 of {len(layers)} (")
    assert "torch's default for the rest" in line
    for layer in layers:
        expected = cpu_linear.onednn_linear if layer is head else functional.linear
        assert linear_of(layer) is expected


def test_onednn_pays_on_average_and_never_slower() -> None:
    assert cpu_linear.pays([2.19, 2.07])
    assert cpu_linear.pays([1.40, 1.15])  # the head on Zen 4: 1.27x on average
    assert not cpu_linear.pays([1.04, 1.05])  # about as fast: nothing to take
    assert not cpu_linear.pays([2.0, 0.95])  # slower at one of the rows


def test_without_onednn_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "_onednn_kernel", lambda: None)
    loaded = random_loaded("llama")
    assert install(loaded.model) is None
    assert all(linear_of(layer) is functional.linear for layer in cpu_float32_linears(loaded.model))
