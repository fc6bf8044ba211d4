"""Model loading: tokenizer set-up, chat template, the dtype fallback chain, and the errors a
user sees for a missing folder, an unknown architecture, no chat template, or no memory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hctl_worker.errors import ModelLoadError, NoChatTemplateError, OutOfMemoryError
from hctl_worker.model import load_model
from hctl_worker.model_errors import translate_error
from scripts.make_random_model import make_random_model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("models") / "qwen3", "qwen3", hidden=32)


def test_loads_with_left_padding_a_pad_token_and_the_chat_template(model_folder) -> None:
    messages: list[str] = []
    loaded = load_model(
        str(model_folder), dtypes=["float32"], device_map="cpu", on_message=messages.append
    )
    assert loaded.dtype == torch.float32
    assert loaded.n_layers == 2
    assert loaded.input_device.type == "cpu"
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token is not None
    assert loaded.source == str(model_folder)
    assert any("float32" in message for message in messages)
    [with_system, without] = [
        loaded.template(["Hi there"], system)[0] for system in ("Be brief.", None)
    ]
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert without.startswith("<|im_start|>user\nHi there<|im_end|>")
    assert with_system.endswith("<|im_start|>assistant\n")


def test_a_tokenizer_without_pad_token_gets_eos(model_folder, tmp_path) -> None:
    folder = tmp_path / "nopad"
    shutil.copytree(model_folder, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    loaded = load_model(str(folder), dtypes=["float32"], device_map="cpu")
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token


def test_dtype_fallback_skips_a_dtype_that_overflows(model_folder, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "overflow"
    shutil.copytree(model_folder, folder)
    weights = load_file(folder / "model.safetensors")
    # Logits of about 1e6 are fine in float32 and infinite in float16 (max 65504).
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1e7
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    messages: list[str] = []
    loaded = load_model(
        str(folder), dtypes=["float16", "float32"], device_map="cpu", on_message=messages.append
    )
    assert loaded.dtype == torch.float32
    assert any("float16 failed" in message for message in messages)


def test_a_missing_folder_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_model("/nowhere/model", dtypes=["float32"], device_map="cpu")
    assert "does not exist" in caught.value.message
    assert caught.value.hint


def test_a_folder_without_config_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), dtypes=["float32"], device_map="cpu")


def test_an_unknown_architecture_says_to_upgrade_transformers(model_folder, tmp_path) -> None:
    folder = tmp_path / "future"
    shutil.copytree(model_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen99"
    config["architectures"] = ["Qwen99ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(folder), dtypes=["float32"], device_map="cpu")
    assert "upgrade" in caught.value.hint


def test_the_upgrade_hint_for_transformers_messages() -> None:
    error = translate_error(ValueError("Could not find Qwen3ForCausalLM in transformers"), "m")
    assert isinstance(error, ModelLoadError) and "upgrade" in error.hint
    oom = translate_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "m")
    assert isinstance(oom, OutOfMemoryError) and oom.hint


def test_a_device_that_is_not_there_points_at_device_map() -> None:
    error = translate_error(AssertionError("Torch not compiled with CUDA enabled"), "m")
    assert "device_map" in error.hint and "dtype" not in error.hint


def test_a_hub_that_cannot_be_reached_is_said_so() -> None:
    """transformers' own words for a hub it cannot reach (an OSError): the network, not a
    wrong model id, is what to check."""
    text = (
        "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
        "them in the cached files."
    )
    error = translate_error(OSError(text), "Qwen/Qwen3-4B")
    assert error.message.startswith("cannot download the model Qwen/Qwen3-4B: We couldn't")
    assert "cannot reach the Hugging Face hub" in error.hint
    missing = translate_error(OSError("nobody/nothing is not a local folder"), "nobody/nothing")
    assert missing.message.startswith("cannot find the model")


def test_no_chat_template_is_its_own_error(model_folder, tmp_path) -> None:
    folder = tmp_path / "base"
    shutil.copytree(model_folder, folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(NoChatTemplateError) as caught:
        load_model(str(folder), dtypes=["float32"], device_map="cpu")
    assert caught.value.hint
    loaded = load_model(
        str(folder), dtypes=["float32"], device_map="cpu", require_chat_template=False
    )
    with pytest.raises(NoChatTemplateError):
        loaded.template(["hi"], None)


def test_max_memory_keys_become_gpu_indices() -> None:
    from hctl_worker.model import normalise_max_memory

    assert normalise_max_memory(None) is None
    assert normalise_max_memory({"0": "20GiB", "1": "30GiB", "cpu": "64GiB"}) == {
        0: "20GiB",
        1: "30GiB",
        "cpu": "64GiB",
    }
