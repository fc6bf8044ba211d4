"""The estimate: model sizes, the throughput model, prices, pre-flight checks."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from hctl.errors import BudgetError, ConfigError, UnknownGpuError
from hctl.gpus import resolve_gpu
from hctl.services.budget import Meter, check_estimate_within
from hctl.services.estimate import (
    alternatives,
    compare_gpus,
    estimate_job,
    format_duration,
    gpu_speed,
)
from hctl.services.lease import lease_deadline
from hctl.services.models import (
    NAME_SOURCE,
    ModelInfo,
    config_parameters,
    inspect_hub_model,
    inspect_model,
    parameters_from_name,
    parse_parameter_count,
)
from tests.e2e.fakes import CATALOGUE

QWEN3_4B_CONFIG = {
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "intermediate_size": 9728,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}


def write_safetensors(path: Path, shapes: dict[str, list[int]], dtype: str = "BF16") -> None:
    """A real safetensors file (header + zero bytes) without torch."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        count = 1
        for dimension in shape:
            count *= dimension
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + 2 * count],
        }
        offset += 2 * count
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * offset)


def test_parameter_counts_are_read_in_the_usual_spellings() -> None:
    assert parse_parameter_count("4B") == 4_000_000_000
    assert parse_parameter_count("0.5b") == 500_000_000
    assert parse_parameter_count("720M") == 720_000_000
    assert parse_parameter_count("7e9") == 7_000_000_000
    with pytest.raises(ConfigError, match="parameter count"):
        parse_parameter_count("four billion")


def test_a_local_model_is_sized_from_its_safetensors_headers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    write_safetensors(tmp_path / "model.safetensors", {"a": [10, 20], "b": [5]})
    info = inspect_model(str(tmp_path))
    assert info.parameters == 205
    assert info.source == "safetensors"
    assert info.weights_bytes_on_disk == (tmp_path / "model.safetensors").stat().st_size


def test_the_config_formula_lands_near_the_published_size_of_qwen3_4b() -> None:
    parameters = config_parameters(QWEN3_4B_CONFIG)
    assert parameters is not None
    assert 3.9e9 < parameters < 4.2e9


def test_an_unknown_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No model at"):
        inspect_model(str(tmp_path / "missing-model"))
    with pytest.raises(ConfigError, match="neither a model folder"):
        inspect_model("not a model")


def hub(handler) -> httpx.Client:  # noqa: ANN001
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_the_hub_gives_size_and_gating_when_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers.get("authorization")
        return httpx.Response(200, json={"safetensors": {"total": 4022468096}, "gated": "manual"})

    info = inspect_hub_model("Qwen/Qwen3-4B", token="hf_secret", client=hub(handler))
    assert info.parameters == 4022468096 and info.gated is True
    assert seen["auth"] == "Bearer hf_secret"


def test_a_repo_the_hub_does_not_know_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ConfigError, match="no model"):
        inspect_hub_model("nobody/nothing", client=hub(lambda request: httpx.Response(404)))


@pytest.mark.parametrize(
    ("repo_id", "parameters"),
    [
        ("Qwen/Qwen3-4B-Instruct-2507", 4e9),
        ("meta-llama/Llama-3.1-8B-Instruct", 8e9),  # 3.1 is a version, not a size
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6),
        ("google/gemma-2-2b-it", 2e9),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1.5e9),
        ("Qwen/Qwen3-30B-A3B", 30e9),  # the active count (A3B) is not the size
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", 56e9),  # experts x size: an upper bound
        ("microsoft/phi-4", None),
        ("org/model-v2", None),
    ],
)
def test_a_size_stated_in_a_repos_name_is_read(repo_id: str, parameters: float | None) -> None:
    assert parameters_from_name(repo_id) == parameters


def test_an_unreachable_hub_leaves_the_size_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("no route")

    info = inspect_hub_model("Qwen/Qwen3-4B", client=hub(handler))
    assert info.parameters is None
    # Offline (the tests' default), the hub is not even asked: the name's size, said as such,
    # or --params fill the gap.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    named = inspect_model("Qwen/Qwen3-4B")
    assert named.parameters == 4e9 and named.source == NAME_SOURCE
    assert inspect_model("Qwen/Qwen3-4B", parameters_override="3B").parameters == 3e9
    assert inspect_model("microsoft/phi-4").parameters is None


def test_the_estimate_adds_up_its_phases_and_prices_the_whole_job() -> None:
    model = ModelInfo(reference="Qwen/Qwen3-4B", parameters=4_000_000_000)
    gpu = resolve_gpu(CATALOGUE, "RTX 4090")
    estimate = estimate_job(model, gpu, n_trials=200)
    assert estimate.total_seconds == pytest.approx(sum(p.seconds for p in estimate.phases))
    assert estimate.total_cost == pytest.approx(0.34 * estimate.total_seconds / 3600)
    # The owner's measured figure: a 4B model on an RTX 4090 takes about 15 minutes.
    assert 10 * 60 < estimate.total_seconds < 25 * 60
    faster = estimate_job(model, resolve_gpu(CATALOGUE, "A100 PCIe"), n_trials=200)
    assert faster.seconds_per_trial < estimate.seconds_per_trial
    more = estimate_job(model, gpu, n_trials=400)
    assert more.seconds_of("search") == pytest.approx(2 * estimate.seconds_of("search"))


def test_an_estimate_needs_trials_and_a_size() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        estimate_job(ModelInfo(reference="m", parameters=10), None, n_trials=0)
    with pytest.raises(ConfigError, match="unknown") as raised:
        estimate_job(ModelInfo(reference="m"), None, n_trials=5)
    assert "--params" in raised.value.hint


def test_a_model_too_big_for_the_gpu_does_not_fit() -> None:
    model = ModelInfo(reference="big/70B", parameters=70_000_000_000)
    estimate = estimate_job(model, resolve_gpu(CATALOGUE, "RTX 4090"), n_trials=10)
    assert not estimate.fits and "GPU memory" in estimate.fit_problem
    small_disk = estimate_job(
        ModelInfo(reference="m/8B", parameters=8_000_000_000),
        resolve_gpu(CATALOGUE, "A100 PCIe"),
        n_trials=10,
        volume_gb=20,
    )
    assert not small_disk.fits and "disk" in small_disk.fit_problem


def test_gpus_are_found_by_id_or_name_and_unknown_ones_are_refused() -> None:
    assert resolve_gpu(CATALOGUE, "nvidia geforce rtx 3090").display_name == "RTX 3090"
    assert resolve_gpu(CATALOGUE, "A6000").id == "NVIDIA RTX A6000"
    with pytest.raises(UnknownGpuError, match="RTX 9999"):
        resolve_gpu(CATALOGUE, "RTX 9999")
    assert gpu_speed(resolve_gpu(CATALOGUE, "H200")) > gpu_speed(resolve_gpu(CATALOGUE, "RTX 3090"))


def test_comparison_puts_the_cheapest_fitting_gpu_first() -> None:
    model = ModelInfo(reference="m/8B", parameters=8_000_000_000)
    estimates = compare_gpus(
        model, CATALOGUE, n_trials=100, wanted=["A100 PCIe", "RTX 3090", "RTX 4090"]
    )
    costs = [estimate.total_cost for estimate in estimates if estimate.fits]
    assert costs == sorted(costs)
    offers = alternatives(model, CATALOGUE, exclude="NVIDIA GeForce RTX 4090", n_trials=100)
    assert offers and all(offer.gpu_id != "NVIDIA GeForce RTX 4090" for offer in offers)
    assert all(offer.fits for offer in offers)


def test_the_budget_refuses_an_estimate_over_the_cap_and_meters_spending() -> None:
    model = ModelInfo(reference="m/4B", parameters=4_000_000_000)
    estimate = estimate_job(model, resolve_gpu(CATALOGUE, "RTX 4090"), n_trials=200)
    with pytest.raises(BudgetError, match="Nothing was created"):
        check_estimate_within(estimate, 0.01)
    check_estimate_within(estimate, 100.0)
    meter = Meter(price_per_hour=0.5, started_at=1000.0, spent_before=0.25)
    assert meter.spent(1000.0 + 3600) == pytest.approx(0.75)
    assert meter.cap_reached(1000.0 + 3600, 0.75)
    assert not meter.cap_reached(1000.0, 0.75)


def test_the_lease_covers_the_estimate_generously() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    deadline = lease_deadline(3600, now)
    assert (deadline - now).total_seconds() >= 3 * 3600
    assert format_duration(3725) == "1h02m"


def test_a_gated_model_without_a_token_is_refused_before_renting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hctl.services.launch import RunRequest, plan_run
    from hctl.services.toolkit import Toolkit
    from hctl.settings import load_settings
    from tests.e2e.fakes import FakeProvider

    monkeypatch.delenv("HF_HUB_OFFLINE")
    provider = FakeProvider()
    toolkit = Toolkit(
        settings=load_settings(),
        provider_factory=lambda: provider,
        connect=lambda record: pytest.fail("nothing may be reached"),
        ensure_worker=lambda remote: pytest.fail("nothing may be installed"),
        wait_until_ready=lambda provider, pod_id: pytest.fail("nothing may be waited for"),
        resolve_pod=lambda provider, ref: provider.get(ref),
        hub_client=hub(
            lambda request: httpx.Response(
                200, json={"safetensors": {"total": 8_000_000_000}, "gated": "manual"}
            )
        ),
    )
    request = RunRequest(model="meta-llama/Llama-3.1-8B-Instruct", n_trials=10, gpu="A100 PCIe")
    with pytest.raises(ConfigError, match="gated model") as raised:
        plan_run(request, toolkit)
    assert "HF_TOKEN" in raised.value.hint
    assert provider.pods == {} and provider.specs == []
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    toolkit.settings = load_settings()
    plan = plan_run(request, toolkit)
    assert plan.model.parameters == 8_000_000_000 and plan.estimate.gpu_name == "A100 PCIe"
