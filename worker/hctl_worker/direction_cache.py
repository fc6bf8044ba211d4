"""The job's refusal directions, computed once per job and cached in its directory.

`directions.safetensors` holds the directions, the separation per hidden state and the
harmful-minus-harmless writes per layer and component (see directions.py), with the key of the
settings they were measured for. safetensors and torch are imported only here.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from hctl_worker.errors import JobDirectoryError
from hctl_worker.job_directory import JobPaths, partial_path
from hctl_worker.locks import FileLock

if TYPE_CHECKING:
    import torch

# What the directions cache holds: the directions, the separation per hidden state, and the
# harmful-minus-harmless writes per layer and component (see directions.py).
CACHED_MEASUREMENTS = ("directions", "separation", "writes")


def read_cached_directions(paths: JobPaths, key: str) -> dict[str, torch.Tensor] | None:
    """The job's cached measurements when they were made for `key` and are complete."""
    from safetensors import safe_open

    if paths.directions.exists():
        # A damaged or older cache is recomputed, never trusted.
        with contextlib.suppress(Exception), safe_open(str(paths.directions), "pt") as handle:
            if (handle.metadata() or {}).get("key") == key:
                return {name: handle.get_tensor(name) for name in CACHED_MEASUREMENTS}
    return None


def write_cached_directions(
    paths: JobPaths, key: str, model: str, measurements: dict[str, torch.Tensor]
) -> None:
    from safetensors.torch import save_file

    partial = partial_path(paths.directions)
    save_file(
        {name: measurements[name].contiguous() for name in CACHED_MEASUREMENTS},
        str(partial),
        metadata={"key": key, "model": model},
    )
    partial.replace(paths.directions)


def directions_lock(paths: JobPaths) -> FileLock:
    """Held while a worker reads or computes the job's directions: workers starting together on
    one job compute them once, the others wait and read the cache."""
    return FileLock(paths.root / "directions.lock")


def load_cached_directions(paths: JobPaths) -> torch.Tensor:
    """The job's directions for export; an error when the job never computed them."""
    from safetensors.torch import load_file

    if not paths.directions.exists():
        raise JobDirectoryError(
            f"job {paths.job_id} has no refusal directions yet",
            "Run the search first (hctl-worker run --job-dir ...).",
        )
    return load_file(str(paths.directions))["directions"]


__all__ = [
    "CACHED_MEASUREMENTS",
    "directions_lock",
    "load_cached_directions",
    "read_cached_directions",
    "write_cached_directions",
]
