"""What goes wrong with the model, said in the worker's error tree.

A transformers, torch or hub exception met while loading a model or tokenizer becomes a
`ModelLoadError` or `OutOfMemoryError` with a hint (`translate_error`); an allocation failure
anywhere (loading, a batch, a trial) is recognised as running out of memory (`is_out_of_memory`),
and the memory cached by then is given back before the next attempt (`free_memory`).
"""

from __future__ import annotations

import gc
import re

import torch

from hctl_worker.errors import ModelLoadError, OutOfMemoryError, WorkerError

_UNKNOWN_ARCHITECTURE = re.compile(
    r"Could not find \w+|does not recognize this architecture|Unrecognized model|"
    r"model type `?\w+`? .*not recognized|Unrecognized configuration class",
    re.IGNORECASE,
)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocation failures, which all surface as RuntimeError variants."""
    if isinstance(error, OutOfMemoryError):
        return True
    if hasattr(torch.cuda, "OutOfMemoryError") and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, (RuntimeError, MemoryError)) and (
        "out of memory" in text
        or "can't allocate memory" in text
        or "cannot allocate memory" in text
        or isinstance(error, MemoryError)
    )


def free_memory() -> None:
    """Give cached accelerator memory back after a failure, so the next attempt can use it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    gc.collect()


def translate_error(error: BaseException, source: str) -> WorkerError:
    """Map a transformers/torch/hub exception met while loading to the worker's error tree."""
    if isinstance(error, WorkerError):
        return error
    if is_out_of_memory(error):
        return OutOfMemoryError(f"out of memory while loading {source}: {_first_line(error)}")
    text = str(error)
    if _UNKNOWN_ARCHITECTURE.search(text) or isinstance(error, (ImportError, AttributeError)):
        return ModelLoadError(
            f"cannot load {source}: {_first_line(error)}",
            hint=(
                "This transformers version does not know the model's architecture: upgrade it "
                "(pip install -U transformers), or set trust_remote_code = true if the model "
                "ships its own code and you trust it."
            ),
        )
    if "trust_remote_code" in text:
        return ModelLoadError(
            f"{source} needs its own code to load",
            hint="Set trust_remote_code = true if you trust this model's code.",
        )
    if "couldn't connect" in text:  # transformers' words for a hub it cannot reach
        return ModelLoadError(
            f"cannot download the model {source}: {_first_line(error)}",
            hint=(
                "This machine cannot reach the Hugging Face hub: check its network (or "
                "HF_ENDPOINT), or give a model folder that is already on it."
            ),
        )
    if isinstance(error, OSError) or "not a valid model identifier" in text:
        return ModelLoadError(
            f"cannot find the model {source}: {_first_line(error)}",
            hint=(
                "Give a local model folder (with config.json) or a Hugging Face id like "
                "Qwen/Qwen3-0.6B; for gated or private models set HF_TOKEN."
            ),
        )
    if "cuda" in text.lower() or "device" in text.lower():
        return ModelLoadError(
            f"cannot load {source}: {_first_line(error)}",
            hint=f"Check device_map: this machine has {torch.cuda.device_count()} GPU(s) torch "
            'can use; "auto" puts the model on those there are (and the CPU).',
        )
    return ModelLoadError(
        f"cannot load {source}: {_first_line(error)}",
        hint='Try another dtype (dtypes = ["float32"]) or check the model folder.',
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


__all__ = ["free_memory", "is_out_of_memory", "translate_error"]
