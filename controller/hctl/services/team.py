"""How many pods, GPUs and workers a job gets, decided with the plan, before anything is rented.

`hctl run --gpus N` rents one pod with N GPUs: one worker per GPU (`CUDA_VISIBLE_DEVICES`) when
the model fits one GPU, else one worker that holds the model across all of them (`device_map`),
and the user is told which; `--pod EXISTING` with several GPUs gets the same. `--pods M` rents M
such pods (see `fleet`). `--workers N` runs N workers on this machine or an SSH host. The
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

    gpu_count: int = 1  # of each pod
    workers: int = 1  # on each pod (or machine)
    one_gpu_each: bool = False  # worker K sees GPU K-1 only
    note: str = ""  # what the user should know about the choice
    pods: int = 1

    @property
    def total_gpus(self) -> int:
        return self.gpu_count * self.pods

    @property
    def total_workers(self) -> int:
        return self.workers * self.pods


def plan_team(
    request: RunRequest, model: ModelInfo, gpu: GpuType | None, *, pod_gpus: int = 1
) -> Team:
    """One worker per GPU of a `--gpus N` pod (or of an existing pod with `pod_gpus` GPUs) when
    the model fits one GPU; else one worker that holds the model across all of them (device_map).
    `--workers N` elsewhere. `--pods M`: M such pods."""
    team = _pod_team(request, model, gpu, pod_gpus)
    pods = request.pods or 1
    if pods == 1:
        return team
    if team.one_gpu_each:
        each = f"{team.workers} workers on each (one per GPU)"
    elif team.gpu_count > 1:
        each = f"one worker on each across its {team.gpu_count} GPUs (the model needs them)"
    else:
        each = "one worker on each"
    return Team(
        gpu_count=team.gpu_count,
        workers=team.workers,
        one_gpu_each=team.one_gpu_each,
        pods=pods,
        note=f"{pods} pods, {each}: {team.workers * pods} workers share one search",
    )


def _pod_team(request: RunRequest, model: ModelInfo, gpu: GpuType | None, pod_gpus: int) -> Team:
    count = request.gpus if request.gpus is not None else pod_gpus
    if count == 1:
        return Team(workers=request.workers or 1)
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
