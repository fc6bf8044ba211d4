"""What a local model folder must hold before the worker loads it: a config, weights, a tokenizer.

transformers fails late, or not at all, on a folder that lacks a part: without a tokenizer file it
makes an empty tokenizer (one token), which only breaks inside the search; without weights it
says so in words about hub ids. So the folder is looked at first, and what is missing is named.
Torch-free.
"""

from __future__ import annotations

from pathlib import Path

from hctl_worker.errors import ModelLoadError

# What a transformers model folder holds: its weights and (for a tokenizer) one of these files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
GGUF_HINT = (
    "Give the model's transformers folder (config.json, *.safetensors, tokenizer), e.g. the "
    "repository the GGUF was converted from."
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def check_model_file(path: Path, source: str) -> None:
    """A model named by one of its files (the weights, a GGUF file): ModelLoadError naming the
    folder to give instead."""
    if path.suffix == ".gguf":
        raise ModelLoadError(
            f"{source} is a GGUF file, which this worker cannot edit",
            hint=GGUF_HINT,
        )
    raise ModelLoadError(
        f"{source} is a file, not a model folder",
        hint=f"Give the folder that holds config.json and the weights: {path.parent}",
    )


def check_model_folder(folder: Path, source: str) -> None:
    """A local model folder holds a config, weights and a tokenizer (ModelLoadError naming what
    is missing otherwise): transformers makes an empty tokenizer when a folder has none, which
    would only fail later, inside the search."""
    files = [path.name for path in folder.iterdir() if path.is_file()]
    gguf = next((name for name in files if name.endswith(".gguf")), None)
    if gguf and not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise ModelLoadError(
            f"{source} holds a GGUF file ({gguf}), which this worker cannot edit",
            hint=GGUF_HINT,
        )
    if "config.json" not in files:
        raise ModelLoadError(
            f"{source} is not a model folder (no config.json in it)",
            hint="Point at the folder that holds config.json and the weights.",
        )
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise ModelLoadError(
            f"{source} has no weights (no *.safetensors or *.bin file in it)",
            hint="Copy the model's weight files into the folder, or download it again.",
        )
    if not any(name in TOKENIZER_FILES or name.endswith(".tiktoken") for name in files):
        raise ModelLoadError(
            f"{source} has no tokenizer (none of {', '.join(TOKENIZER_FILES)} in it)",
            hint="Copy the tokenizer files of the model's repository into the folder.",
        )


__all__ = ["TOKENIZER_FILES", "WEIGHT_SUFFIXES", "check_model_file", "check_model_folder"]
