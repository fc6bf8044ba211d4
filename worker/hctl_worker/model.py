"""Loading the model to abliterate: dtype fallback, device placement, tokenizer and chat template.

Every failure that a user can fix (a missing folder, an architecture this transformers does not
know, a tokenizer without a chat template, a GPU that is too small) leaves this module as a
`ModelLoadError` / `NoChatTemplateError` / `OutOfMemoryError` with a hint, never as a traceback;
`model_errors.py` holds the translation of transformers', torch's and the hub's exceptions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from hctl_worker.architecture import find_layers, model_hidden_size
from hctl_worker.cpu_linear import install as install_cpu_linear
from hctl_worker.errors import ModelLoadError, NoChatTemplateError, OutOfMemoryError, WorkerError
from hctl_worker.model_errors import free_memory, translate_error
from hctl_worker.model_folder import check_model_file, check_model_folder

if TYPE_CHECKING:
    import transformers

DEFAULT_DTYPES: tuple[str, ...] = ("auto", "float16", "bfloat16", "float32")
SMOKE_TEST_PROMPT = "What is 1+1?"

_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
}


# How float32 linear layers compute on a CPU: "auto" measures oneDNN against torch's default.
CpuLinear = Literal["auto", "torch"]


@dataclass
class LoadedModel:
    """A causal language model ready for abliteration: left padding, a pad token, eval mode."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    dtype: torch.dtype
    source: str

    def template(self, prompts: Sequence[str], system_prompt: str | None) -> list[str]:
        """Chat-templated strings with the generation prompt; NoChatTemplateError if none."""
        return apply_chat_template(self.tokenizer, prompts, system_prompt)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go: the device of the input embeddings (the first shard)."""
        return self.model.get_input_embeddings().weight.device

    @cached_property
    def n_layers(self) -> int:
        """The number of decoder layers (found by structure, not by attribute names)."""
        return len(find_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return model_hidden_size(self.model)


def apply_chat_template(
    tokenizer: transformers.PreTrainedTokenizerBase,
    prompts: Sequence[str],
    system_prompt: str | None,
) -> list[str]:
    """Render each prompt as one user turn (after an optional system turn), ready for a reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError("the tokenizer has no chat template")
    rendered = []
    for prompt in prompts:
        messages = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as error:  # Jinja raises TemplateError for unsupported roles.
            if system_prompt is not None and "system" in str(error).lower():
                raise ModelLoadError(
                    f"the chat template does not accept a system prompt: {error}",
                    hint="Set system_prompt to nothing (an empty value) for this model.",
                ) from error
            raise ModelLoadError(
                f"the chat template failed: {error}",
                hint="Check the tokenizer's chat_template in the model folder.",
            ) from error
        rendered.append(str(text))
    return rendered


def parse_dtype(name: str) -> torch.dtype | str:
    """'auto' stays a string (transformers picks the checkpoint's dtype); others become torch dtypes."""
    if name == "auto":
        return "auto"
    try:
        return _DTYPES_BY_NAME[name.removeprefix("torch.")]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {name!r}",
            hint="Use auto, float16, bfloat16 or float32.",
        ) from None


def normalise_max_memory(max_memory: dict[str, str] | None) -> dict[int | str, str] | None:
    """Accelerate wants GPU indices as ints ("0" -> 0) and "cpu"/"disk" as strings."""
    if max_memory is None:
        return None
    return {int(key) if str(key).isdigit() else key: value for key, value in max_memory.items()}


def _looks_like_local_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else (absolute, relative, deeper) is a path."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def load_tokenizer(
    source: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer with a pad token (eos if it has none) and left padding for batched generation."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as error:
        raise translate_error(error, source) from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer of {source} has neither a pad nor an end-of-sequence token",
                hint="Give the tokenizer an eos_token in tokenizer_config.json.",
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    source: str,
    *,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    device_map: str | dict = "auto",
    max_memory: dict[str, str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    on_message: Callable[[str], None] | None = None,
    require_chat_template: bool = True,
    threads: int | None = None,
    cpu_linear: CpuLinear = "auto",
) -> LoadedModel:
    """Load `source` (local folder or hub id), trying each dtype until one passes a smoke test.

    The smoke test greedily generates one token; it catches dtypes that load but compute inf/nan
    (float16 overflow), which otherwise only shows up later as a crash inside the search.
    `cpu_linear="auto"` computes float32 linear layers on the CPU with oneDNN where it measures
    faster than torch's default (`cpu_linear.py`); "torch" keeps torch's.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    say = on_message or (lambda message: None)
    source = str(source)
    # Fewer fragmentation OOMs while batch sizes change; read at CUDA's first allocation.
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    expanded = os.path.expanduser(source)
    if _looks_like_local_path(source) and not Path(expanded).exists():
        raise ModelLoadError(
            f"the model folder {source} does not exist",
            hint="Check the path, or give a Hugging Face id like Qwen/Qwen3-0.6B.",
        )
    if Path(expanded).is_file():
        check_model_file(Path(expanded), source)
    if Path(expanded).is_dir():
        check_model_folder(Path(expanded), source)
        source_to_load = expanded
    else:
        source_to_load = source

    try:
        config = AutoConfig.from_pretrained(
            source_to_load, trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as error:
        raise translate_error(error, source) from error
    model_class = AutoModelForCausalLM
    if _has_vision(config):
        # Vision-language checkpoints load through their image-text class; the text decoder
        # inside is what gets abliterated.
        from transformers import AutoModelForImageTextToText

        model_class = AutoModelForImageTextToText
    tokenizer = load_tokenizer(
        source_to_load, trust_remote_code=trust_remote_code, revision=revision
    )
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(f"the tokenizer of {source} has no chat template")

    if not dtypes:
        raise ModelLoadError("no dtype to try", hint='Set dtypes, e.g. ["auto", "float32"].')
    last_error: WorkerError | None = None
    for dtype_name in dtypes:
        dtype = parse_dtype(dtype_name)
        say(f"loading {source} with dtype {dtype_name}")
        model = None
        try:
            model = model_class.from_pretrained(
                source_to_load,
                dtype=dtype,
                device_map=device_map,
                max_memory=normalise_max_memory(max_memory),
                trust_remote_code=trust_remote_code,
                revision=revision,
            )
            model.eval()
            loaded = LoadedModel(
                model=model,
                tokenizer=tokenizer,
                dtype=next(model.parameters()).dtype,
                source=source,
            )
            smoke_test(loaded)
        except Exception as error:
            translated = translate_error(error, source)
            # A missing model or an unknown architecture fails the same way for every dtype.
            if not isinstance(translated, OutOfMemoryError) and not _is_dtype_specific(error):
                raise translated from error
            say(f"dtype {dtype_name} failed: {translated.message}")
            last_error = translated
            del model
            free_memory()
            continue
        threads = configure_threads(loaded, threads)
        if cpu_linear == "auto" and (line := install_cpu_linear(model)):
            say(line)
        say(
            f"loaded {source} as {loaded.dtype} ({loaded.n_layers} layers"
            + (f", {threads} CPU threads)" if threads else ")")
        )
        return loaded
    assert last_error is not None
    raise last_error


def _has_vision(config) -> bool:
    return "vision_config" in config.to_dict()


def _is_dtype_specific(error: BaseException) -> bool:
    """Errors worth retrying with the next dtype: numerical failures and unsupported kernels."""
    if isinstance(error, SmokeTestError):
        return True
    text = str(error).lower()
    return any(
        marker in text
        for marker in ("probability tensor", "inf", "nan", "not implemented for", "dtype", "half")
    )


# Below this many parameters a CPU forward pass is dominated by per-operation overhead, and a
# second thread only adds synchronisation (measured: 1.1 ms vs 4-17 ms per step on 2 busy cores).
SMALL_MODEL_PARAMETERS = 10_000_000


def configure_threads(loaded: LoadedModel, threads: int | None = None) -> int | None:
    """Pick torch's CPU thread count when the model runs on the CPU; returns what was set.

    An explicit `threads` wins; tiny models get one thread; larger ones keep torch's default.
    """
    if loaded.input_device.type != "cpu":
        return None
    if threads is None:
        parameters = sum(parameter.numel() for parameter in loaded.model.parameters())
        if parameters >= SMALL_MODEL_PARAMETERS:
            return None
        threads = 1
    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


class SmokeTestError(RuntimeError):
    """The model loaded but produced non-finite logits."""


def smoke_test(loaded: LoadedModel) -> None:
    """Greedy one-token generation on a simple prompt; non-finite logits fail it."""
    tokenizer = loaded.tokenizer
    if getattr(tokenizer, "chat_template", None):
        text = apply_chat_template(tokenizer, [SMOKE_TEST_PROMPT], None)[0]
    else:
        text = SMOKE_TEST_PROMPT
    encoded = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        logits = loaded.model(
            input_ids=encoded["input_ids"].to(loaded.input_device),
            attention_mask=encoded["attention_mask"].to(loaded.input_device),
            use_cache=False,
        ).logits[:, -1, :]
    if not torch.isfinite(logits).all():
        raise SmokeTestError(f"non-finite logits (inf/nan) in {loaded.dtype}")


__all__ = [
    "DEFAULT_DTYPES",
    "LoadedModel",
    "apply_chat_template",
    "configure_threads",
    "load_model",
    "load_tokenizer",
    "smoke_test",
]
