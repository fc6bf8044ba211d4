"""GPU types, below the command line: the one resolver every command uses, filters, and CUDA.

`resolve_gpu` is how `hctl run --gpu`, `hctl create-pod GPU`, `hctl estimate --gpu` and the
`gpu` setting find a GPU type, so they all accept the same names: the provider's id ("NVIDIA
GeForce RTX 4090"), its display name ("RTX 4090"), or words that name one type only ("4090").
Several matches or none are an `UnknownGpuError` that lists the candidates.

`required_cuda_versions` reads the CUDA version an image was built for from its tag (RunPod's
images say it: `...-cu1281-...`, `...-cuda12.4.1-...`), so a pod is placed only on hosts whose
driver can run it.
"""

from __future__ import annotations

import difflib
import math
import re

from hctl.errors import ConfigError, UnknownGpuError
from hctl.providers.base import CloudType, GpuType

# CUDA versions hosts report, for a provider whose catalogue does not list them per GPU type.
KNOWN_CUDA_VERSIONS = (
    "11.8",
    *(f"12.{minor}" for minor in range(10)),
    *(f"13.{minor}" for minor in range(10)),
)
_CUDA_TAG = re.compile(r"(?:^|[-_:.])cu(?:da)?-?(\d{2})(\d)(\d?)(?=$|[-_.])|cuda-?(\d+)\.(\d+)")


def _words(text: str) -> list[str]:
    return [word for word in re.split(r"[^a-z0-9]+", text.lower()) if word]


def resolve_gpu(catalogue: list[GpuType], query: str) -> GpuType:
    """The GPU type `query` names: an id or display name (any case), else the only type whose
    name holds every word of the query. Raises UnknownGpuError with the candidates otherwise."""
    wanted = query.strip().lower()
    for gpu in catalogue:
        if wanted in (gpu.id.lower(), gpu.display_name.lower()):
            return gpu
    words = _words(query)
    matches = [
        gpu
        for gpu in catalogue
        if words and set(words) <= set(_words(gpu.id) + _words(gpu.display_name))
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = " or ".join(f'"{gpu.id}"' for gpu in matches[:5])
        raise UnknownGpuError(f"{len(matches)} GPU types match {query!r}.", f"Say which: {names}.")
    close = suggest_gpu_types(catalogue, query)
    if close:
        hint = "Did you mean " + " or ".join(f'"{gpu.id}"' for gpu in close) + "?"
        hint += " `hctl gpus` lists them all."
    else:
        hint = "Run `hctl gpus` to list the GPU types and their ids."
    raise UnknownGpuError(f"There is no GPU type {query!r}.", hint)


def suggest_gpu_types(catalogue: list[GpuType], query: str, limit: int = 3) -> list[GpuType]:
    """The GPU types whose id or display name is closest to `query`."""
    wanted = query.strip().lower()

    def closeness(gpu: GpuType) -> float:
        names = (gpu.id.lower(), gpu.display_name.lower())
        return max(difflib.SequenceMatcher(None, wanted, name).ratio() for name in names)

    scored = sorted(((closeness(gpu), gpu) for gpu in catalogue), key=lambda pair: -pair[0])
    return [gpu for score, gpu in scored if score >= 0.6][:limit]


def check_gpu_filters(min_vram_gb: int | None, max_price: float | None) -> None:
    """Refuse filters that match nothing anyone means (a NaN or negative price, negative GB)."""
    if max_price is not None and not (math.isfinite(max_price) and max_price >= 0):
        raise ConfigError(
            f"--max-price {max_price:g} is not a price.", "Give USD per GPU-hour, e.g. 2.5."
        )
    if min_vram_gb is not None and min_vram_gb < 0:
        raise ConfigError(f"--min-vram {min_vram_gb} is negative.", "Give GB, e.g. 24.")


def select_gpu_types(
    catalogue: list[GpuType],
    *,
    min_vram_gb: int | None = None,
    max_price: float | None = None,
    in_stock: bool = False,
    cloud_type: CloudType = "ALL",
    spot: bool = False,
) -> list[GpuType]:
    """The GPU types that pass the filters, cheapest first (those not offered last). The
    filters are not checked here: callers run `check_gpu_filters` before asking the provider."""

    def offered(gpu: GpuType) -> bool:
        offer = gpu.offer(cloud_type, spot)
        return offer is not None and offer.stock is not None

    chosen = [
        gpu
        for gpu in catalogue
        if (min_vram_gb is None or gpu.memory_gb >= min_vram_gb)
        and (not in_stock or offered(gpu))
        and (max_price is None or (gpu.price(cloud_type, spot) or float("inf")) <= max_price)
    ]
    return sorted(
        chosen,
        key=lambda gpu: (
            gpu.price(cloud_type, spot) is None,
            gpu.price(cloud_type, spot) or 0,
            gpu.id,
        ),
    )


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def image_cuda_version(image: str) -> str | None:
    """The CUDA version (`major.minor`) an image's tag says it was built for, or None."""
    tag = image.rsplit("/", 1)[-1]
    match = _CUDA_TAG.search(tag.lower())
    if match is None:
        return None
    if match.group(1):
        return f"{int(match.group(1))}.{int(match.group(2))}"
    return f"{int(match.group(4))}.{int(match.group(5))}"


def required_cuda_versions(image: str, gpu: GpuType, minimum: str | None = None) -> list[str]:
    """The host CUDA versions a pod of `image` on `gpu` may get: those at or above what the
    image needs (`minimum` overrides the tag; "any" lifts the constraint). [] = any host."""
    needed = minimum if minimum is not None else image_cuda_version(image)
    if not needed or needed == "any":
        return []
    if not re.fullmatch(r"\d+\.\d+", needed):
        raise ConfigError(
            f"CUDA version {needed!r} is not MAJOR.MINOR.", "Set min_cuda_version like 12.8."
        )
    offered = gpu.cuda_versions or list(KNOWN_CUDA_VERSIONS)
    allowed = [version for version in offered if _version_key(version) >= _version_key(needed)]
    if not allowed:
        raise ConfigError(
            f"No {gpu.display_name} host has CUDA {needed} or newer, which {image} needs.",
            "Choose another GPU (`hctl gpus`), or an image built for an older CUDA.",
        )
    return sorted(allowed, key=_version_key)
