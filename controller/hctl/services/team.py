"""How many GPUs and workers a job gets, decided with the plan, before anything is rented.

`hctl run --gpus N` rents one pod with N GPUs: one worker per GPU (`CUDA_VISIBLE_DEVICES`) when
the model fits one GPU, else one worker that holds the model across all of them (`device_map`),
and the user is told which. `--workers N` runs N workers on this machine or an SSH host. The
workers of a job share one search (see `hctl_worker.study`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hctl.errors import ConfigError
from hctl.providers.base import GpuType
from hctl.services.estimate import required_gpu_memory_gb
from hctl.services.models import ModelInfo
from hctl.services.request import RunRequest


@dataclass(frozen=True)
class Team:
    """How many GPUs and workers a job gets, and how they pair up."""

    gpu_count: int = 1
    workers: int = 1
    one_gpu_each: bool = False  # worker K sees GPU K-1 only
    note: str = ""  # what the user should know about the choice


def plan_team(request: RunRequest, model: ModelInfo, gpu: GpuType | None) -> Team:
    """One worker per GPU of a `--gpus N` pod when the model fits one GPU; else one worker that
    holds the model across all of them (device_map). `--workers N` elsewhere."""
    if request.gpus is None or request.gpus == 1:
        return Team(workers=request.workers or 1)
    count = request.gpus
    if gpu is not None and gpu.max_gpu_count is not None and count > gpu.max_gpu_count:
        raise ConfigError(
            f"--gpus {count}: a pod has at most {gpu.max_gpu_count} x {gpu.display_name}.",
            f"Give --gpus {gpu.max_gpu_count} or fewer, or another --gpu (`hctl gpus`).",
        )
    needed = required_gpu_memory_gb(model)
    if gpu is not None and needed is not None and gpu.memory_gb < needed:
        return Team(
            gpu_count=count,
            note=(
                f"{model.reference} needs about {needed:.0f} GB, more than one "
                f"{gpu.display_name} ({gpu.memory_gb} GB): one worker holds it across the "
                f"{count} GPUs, and trials run one at a time"
            ),
        )
    return Team(
        gpu_count=count,
        workers=count,
        one_gpu_each=True,
        note=f"{count} workers, one per GPU, share one search",
    )
