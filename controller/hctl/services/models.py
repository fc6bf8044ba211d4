"""What hctl knows about a model before renting anything: its size and whether it is gated.

A model is either a local folder (read directly: safetensors headers, else `config.json`) or a
Hugging Face repo id. For a repo id the hub's HTTP API is asked when it is reachable (never
required, never when `HF_HUB_OFFLINE` is set); else the size comes from `--params`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import httpx
from pydantic import BaseModel

from hctl.errors import ConfigError

HUB_API = "https://huggingface.co/api/models"
BYTES_PER_PARAMETER_BF16 = 2

_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


# The size stated in a repo's name, used when the hub cannot say (offline, gated, unreachable).
NAME_SOURCE = "its name; the hub was not asked or did not say, --params corrects it"


class ModelInfo(BaseModel):
    """A model's reference and size, and where those facts came from."""

    reference: str  # what the user typed: a folder or a repo id
    local_path: Path | None = None  # set for a local folder
    parameters: int | None = None
    source: str = "unknown"  # "safetensors", "config.json", "hub", NAME_SOURCE, "--params"
    gated: bool | None = None  # None: unknown (hub not reachable)
    weights_bytes_on_disk: int | None = None  # the files as stored (local folders only)

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def bf16_bytes(self) -> int | None:
        """The weights' size in bf16, which is how the worker holds them on a GPU."""
        if self.parameters is None:
            return None
        return self.parameters * BYTES_PER_PARAMETER_BF16

    @property
    def download_bytes(self) -> int:
        """What has to reach the machine: the files as stored, else the bf16 size."""
        if self.weights_bytes_on_disk is not None:
            return self.weights_bytes_on_disk
        return self.bf16_bytes or 0


def parse_parameter_count(text: str) -> int:
    """`4B`, `0.5B`, `720M`, `7e9` or `4000000000` as a number of parameters."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not match:
        raise ConfigError(
            f"Cannot read {text!r} as a parameter count.", "Write it like 4B, 0.5B or 720M."
        )
    number, suffix = match.groups()
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[suffix.lower()]
    count = int(float(number) * scale)
    if count <= 0:
        raise ConfigError(f"The parameter count {text!r} is not positive.", "Write it like 4B.")
    return count


def parameters_from_name(repo_id: str) -> int | None:
    """The size a hub repo's name states (`Qwen3-4B-Instruct` 4B, `gemma-2-2b-it` 2B,
    `Mixtral-8x7B` 56B, `Qwen3-30B-A3B` 30B: the active count is not the size); the largest
    when it states several; None when it states none."""
    counts = []
    for part in re.split(r"[-_ ]", repo_id.rsplit("/", 1)[-1]):
        match = re.fullmatch(r"(?:([0-9]+)x)?([0-9]+(?:\.[0-9]+)?[mMbB])", part)
        if match and float(match.group(2)[:-1]) > 0:
            experts, size = match.groups()
            counts.append(int(experts or 1) * parse_parameter_count(size))
    return max(counts) if counts else None


def format_parameter_count(count: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


def looks_like_local_path(reference: str) -> bool:
    """A reference names a local folder when it exists or is written like a path."""
    if Path(reference).expanduser().exists():
        return True
    return (
        reference.startswith((".", "/", "~", "\\"))
        or reference.count("/") > 1
        or bool(re.match(r"^[A-Za-z]:[\\/]", reference))
    )


def safetensors_parameters(folder: Path) -> tuple[int, int] | None:
    """Parameters and bytes of the safetensors files in `folder`, read from their headers only."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    parameters = 0
    size = 0
    for path in files:
        with path.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dimension in tensor["shape"]:
                count *= dimension
            parameters += count
        size += path.stat().st_size
    return parameters, size


def config_parameters(config: dict) -> int | None:
    """An approximate parameter count of a decoder-only transformer from its config.json."""
    config = config.get("text_config", config)
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        vocabulary = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    heads = int(config.get("num_attention_heads") or 1)
    key_value_heads = int(config.get("num_key_value_heads") or heads)
    head_dimension = int(config.get("head_dim") or hidden // heads)
    attention = hidden * head_dimension * (2 * heads + 2 * key_value_heads)
    feed_forward = 3 * hidden * intermediate
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 1)
    if experts > 1:
        expert_intermediate = int(config.get("moe_intermediate_size") or intermediate)
        feed_forward = 3 * hidden * expert_intermediate * experts
    embeddings = vocabulary * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * (attention + feed_forward)


def inspect_local_model(folder: Path) -> ModelInfo:
    """Size of a local model folder; a folder without a model in it is a clear error."""
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ConfigError(
            f"No model at {folder}: expected a folder with config.json and *.safetensors.",
            "Give a Hugging Face repo id (like Qwen/Qwen3-4B-Instruct-2507) or a model folder.",
        )
    counted = safetensors_parameters(folder)
    if counted is not None:
        parameters, size = counted
        return ModelInfo(
            reference=str(folder),
            local_path=folder.resolve(),
            parameters=parameters,
            source="safetensors",
            gated=False,
            weights_bytes_on_disk=size,
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"Cannot read {folder / 'config.json'}: {error}") from None
    return ModelInfo(
        reference=str(folder),
        local_path=folder.resolve(),
        parameters=config_parameters(config),
        source="config.json",
        gated=False,
    )


def hub_is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def inspect_hub_model(
    repo_id: str, *, token: str | None = None, client: httpx.Client | None = None
) -> ModelInfo:
    """Size and gating of a hub model, or an unknown size when the hub cannot be reached.

    A repo the hub says does not exist is an error (nothing gets rented for it); a hub that
    cannot be reached is not (the pod may well reach it).
    """
    info = ModelInfo(reference=repo_id)
    if hub_is_offline():
        return info
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    own_client = client is None
    client = client or httpx.Client(timeout=5.0)
    try:
        response = client.get(
            f"{HUB_API}/{repo_id}", params={"expand[]": ["safetensors", "gated"]}, headers=headers
        )
    except httpx.HTTPError:
        return info
    finally:
        if own_client:
            client.close()
    if response.status_code == 404:
        raise ConfigError(
            f"The Hugging Face hub has no model {repo_id!r}.",
            "Check the spelling (owner/name), or give a local model folder.",
        )
    if response.status_code in {401, 403}:
        # The hub hides gated or private repos from anonymous callers this way.
        return info.model_copy(update={"gated": True})
    if response.status_code != 200:
        return info
    try:
        body = response.json()
    except ValueError:
        return info
    safetensors = body.get("safetensors") or {}
    total = safetensors.get("total")
    gated = body.get("gated")
    return info.model_copy(
        update={
            "parameters": int(total) if total else None,
            "source": "hub" if total else "unknown",
            "gated": bool(gated) if gated is not None else None,
        }
    )


def inspect_model(
    reference: str,
    *,
    parameters_override: str | None = None,
    token: str | None = None,
    client: httpx.Client | None = None,
) -> ModelInfo:
    """Everything hctl can learn about a model without renting anything."""
    if looks_like_local_path(reference):
        info = inspect_local_model(Path(reference).expanduser())
    else:
        if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", reference):
            raise ConfigError(
                f"{reference!r} is neither a model folder nor a Hugging Face repo id.",
                "Give a repo id like Qwen/Qwen3-4B-Instruct-2507, or a folder with config.json.",
            )
        info = inspect_hub_model(reference, token=token, client=client)
        guess = parameters_from_name(reference) if info.parameters is None else None
        if guess is not None:
            info = info.model_copy(update={"parameters": guess, "source": NAME_SOURCE})
    if parameters_override:
        info = info.model_copy(
            update={"parameters": parse_parameter_count(parameters_override), "source": "--params"}
        )
    return info
