"""What `hctl run MODEL` will do, decided before anything is created.

`plan_run` checks everything that can be checked before money is spent (the model, its size, the
GPU, the GPUs and pods of the job, the estimate, memory and disk, a token for gated models) and
creates nothing; `launch.start_job` then carries the plan out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hctl.errors import CapacityError, ConfigError
from hctl.gpus import resolve_gpu
from hctl.providers.base import GpuType, Pod
from hctl.services import calibration
from hctl.services.estimate import Estimate, alternatives, estimate_job, format_money
from hctl.services.fleet import FleetPlan, plan_fleet
from hctl.services.job_protocol import check_not_running
from hctl.services.jobs import TargetKind
from hctl.services.models import ModelInfo, inspect_model
from hctl.services.request import (
    RunRequest,
    build_worker_settings,
    check_request,
    check_trial_number,
)
from hctl.services.team import Team, plan_team
from hctl.services.toolkit import Toolkit

Notify = Callable[[str], None]


@dataclass
class RunPlan:
    """Everything decided before anything is created."""

    request: RunRequest
    model: ModelInfo
    target: TargetKind
    estimate: Estimate
    worker_settings: dict[str, Any]
    n_trials: int  # from the settings cascade: --trials, HERETIC_N_TRIALS, the file, the default
    gpu: GpuType | None = None
    pod: Pod | None = None  # an existing pod to reuse
    catalogue: list[GpuType] | None = None
    hf_token: str | None = None
    team: Team = field(default_factory=lambda: Team())
    fleet: FleetPlan | None = None  # --pods N: the pods and how they reach the database

    @property
    def creates_pod(self) -> bool:
        return self.target == "pod" and self.pod is None


def target_kind(request: RunRequest) -> TargetKind:
    if request.on is None:
        return "pod"
    if request.pod is not None:
        raise ConfigError("--pod and --on cannot be used together.", "Give one of them.")
    if request.on == "local":
        if os.name == "nt":
            # The detached launch and the event reads use a POSIX shell (setsid, tail, base64).
            raise ConfigError(
                "--on local needs a POSIX shell (Linux or macOS); this is Windows.",
                "Run on a pod (leave out --on), or on a Linux machine with --on ssh://USER@HOST:PORT.",
            )
        return "local"
    if request.on.startswith("ssh://"):
        return "ssh"
    raise ConfigError(
        f"--on {request.on!r} is not a target.",
        "Use --on local, --on ssh://USER@HOST:PORT, or --pod POD_ID.",
    )


def hf_token(toolkit: Toolkit) -> str | None:
    token = toolkit.settings.hf_token
    return token.get_secret_value() if token is not None else None


def plan_run(request: RunRequest, toolkit: Toolkit) -> RunPlan:
    """Check the request and estimate it; raises before anything is created."""
    check_request(request)
    target = target_kind(request)
    if target == "local" and request.job_dir:
        from hctl.remote.local import LocalRemote

        check_not_running(LocalRemote(), str(Path(request.job_dir).expanduser().resolve()))
    token = hf_token(toolkit)
    model = inspect_model(
        request.model, parameters_override=request.params, token=token, client=toolkit.hub_client
    )
    worker_settings = build_worker_settings(request, model)
    n_trials = int(worker_settings["n_trials"])
    check_trial_number(request, n_trials)
    response_tokens = int(worker_settings.get("max_response_length", 100))
    settings = toolkit.settings
    gpu: GpuType | None = None
    pod: Pod | None = None
    catalogue: list[GpuType] | None = None
    if target == "pod":
        provider = toolkit.provider()
        if request.spot and request.pod is None and not provider.capabilities.spot:
            raise ConfigError(
                f"The {provider.name} provider has no spot pods.",
                provider.capabilities.no_spot_hint,
            )
        catalogue = provider.gpu_types()
        if request.pod is not None:
            pod = toolkit.resolve_pod(provider, request.pod)
            gpu = next((item for item in catalogue if item.id == pod.gpu_type_id), None)
        else:
            gpu = resolve_gpu(catalogue, request.gpu or settings.gpu)
    team = plan_team(request, model, gpu, pod_gpus=pod.gpu_count if pod is not None else 1)
    fleet = (
        plan_fleet(request, toolkit.provider(), settings.database_port) if target == "pod" else None
    )
    estimate = estimate_job(
        model,
        gpu,
        n_trials=n_trials,
        cloud_type=settings.cloud_type,
        spot=request.spot,
        response_tokens=response_tokens,
        new_pod=target == "pod" and pod is None,
        on_this_machine=target == "local",
        volume_gb=settings.volume_gb if target == "pod" and pod is None else None,
        measured=calibration.load(toolkit.store.calibration_path) if target == "local" else None,
        gpu_count=team.gpu_count,
        workers=team.workers,
        pods=team.pods,
    )
    if pod is not None and pod.cost_per_hr:
        estimate = estimate.model_copy(update={"price_per_hour": pod.cost_per_hr})
    if target == "pod" and pod is None and estimate.price_per_hour is None:
        raise CapacityError(
            f"{estimate.gpu_name} is not offered{' as spot' if request.spot else ''} "
            f"in {settings.cloud_type.lower()} cloud right now.",
            alternatives_hint(model, catalogue or [], estimate, request, toolkit),
        )
    if not estimate.fits:
        raise ConfigError(
            f"Pre-flight check failed: {estimate.fit_problem}. Nothing was created.",
            alternatives_hint(model, catalogue or [], estimate, request, toolkit)
            if catalogue
            else "Use a machine with more GPU memory or disk.",
        )
    if request.upload and not token and not _token_on_machine(target, pod):
        raise ConfigError(
            f"--upload {request.upload} needs a Hugging Face token with write access, and none "
            "is set: the search would run and its upload fail.",
            "Create a write token at https://huggingface.co/settings/tokens, then export HF_TOKEN "
            "(or run `hctl config set hf_token`).",
        )
    if model.gated and not token:
        raise ConfigError(
            f"{model.reference} is a gated model and no Hugging Face token is set.",
            "Accept the model's licence on its hub page, then export HF_TOKEN (or run "
            "`hctl config set hf_token`).",
        )
    return RunPlan(
        request=request,
        model=model,
        target=target,
        estimate=estimate,
        worker_settings=worker_settings,
        n_trials=n_trials,
        gpu=gpu,
        pod=pod,
        catalogue=catalogue,
        hf_token=token,
        team=team,
        fleet=fleet,
    )


def _token_on_machine(target: TargetKind, pod: Pod | None) -> bool:
    """Whether the machine may have a hub token of its own: a given pod created with HF_TOKEN in
    its environment, or an SSH host (whose environment hctl cannot see)."""
    return target == "ssh" or (pod is not None and "HF_TOKEN" in pod.env)


def alternatives_hint(
    model: ModelInfo,
    catalogue: list[GpuType],
    estimate: Estimate,
    request: RunRequest,
    toolkit: Toolkit,
) -> str:
    offers = alternatives(
        model,
        catalogue,
        exclude=estimate.gpu_id,
        n_trials=estimate.n_trials,
        cloud_type=toolkit.settings.cloud_type,
        spot=request.spot,
    )
    if not offers:
        return "No other GPU type fits this model right now; try later or `hctl gpus`."
    choices = "; ".join(
        f"--gpu '{offer.gpu_name}' (about {format_money(offer.total_cost)} in total)"
        for offer in offers
    )
    return f"In stock and big enough: {choices}."
