"""From `hctl run MODEL` to a worker running detached on a machine.

`plan_run` checks everything that can be checked before money is spent (the model, its size, the
GPU, the estimate, memory and disk, a token for gated models) and creates nothing. `start_job`
then gets the machine (a new pod, a given one, an SSH host or this one), installs the worker,
uploads the settings (and a local model), and starts the worker detached in its job directory,
so it keeps going when the laptop sleeps. Any failure, or Ctrl-C, while a pod that hctl created
is being brought up terminates that pod: nothing is left billing by accident.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from hctl.errors import (
    CapacityError,
    ConfigError,
    HctlError,
    JobError,
    PodNotReadyError,
    RemoteError,
)
from hctl.gpus import resolve_gpu
from hctl.providers.base import GpuType, Pod, PodLease, Provider
from hctl.remote.base import Remote
from hctl.services import calibration, lease
from hctl.services.estimate import Estimate, alternatives, estimate_job, format_money
from hctl.services.job_protocol import SECRETS_FILE, launch_command, running_test
from hctl.services.jobs import JobRecord, TargetKind, new_job_id
from hctl.services.models import ModelInfo, inspect_model
from hctl.services.request import (
    RunRequest,
    build_worker_settings,
    check_request,
    check_trial_number,
)
from hctl.services.team import Team, plan_team
from hctl.services.toolkit import Toolkit
from hctl_worker.events import JOURNAL_FILE, SETTINGS_FILE
from hctl_worker.settings import PROMPT_TABLES

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
    team = plan_team(request, model, gpu)
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
    )
    if pod is not None and pod.cost_per_hr:
        estimate = estimate.model_copy(update={"price_per_hour": pod.cost_per_hr})
    if target == "pod" and pod is None and estimate.price_per_hour is None:
        raise CapacityError(
            f"{estimate.gpu_name} is not offered{' as spot' if request.spot else ''} "
            f"in {settings.cloud_type.lower()} cloud right now.",
            _alternatives_hint(model, catalogue or [], estimate, request, toolkit),
        )
    if not estimate.fits:
        raise ConfigError(
            f"Pre-flight check failed: {estimate.fit_problem}. Nothing was created.",
            _alternatives_hint(model, catalogue or [], estimate, request, toolkit)
            if catalogue
            else "Use a machine with more GPU memory or disk.",
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
    )


def _alternatives_hint(
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


# --- The machine ---------------------------------------------------------------------------


def remote_base_dir(record_target: TargetKind, remote: Remote, toolkit: Toolkit) -> str:
    """Where hctl keeps its files on the machine: the pod's volume, or the SSH user's home."""
    if record_target == "pod":
        return f"{toolkit.settings.volume_path.rstrip('/')}/hctl"
    result = remote.run('printf "%s" "$HOME"', timeout=30)
    home = result.output.strip()
    if result.exit_code != 0 or not home.startswith("/"):
        raise JobError(f"Cannot find the home folder on {remote.description}.")
    return f"{home}/hctl"


def create_pod(
    plan: RunPlan, job_id: str, toolkit: Toolkit, notify: Notify
) -> tuple[Pod, PodLease]:
    """A new pod named `hctl-<job id>`, with a lease sized from the estimate."""
    from hctl import pods, sshkeys

    settings = toolkit.settings
    assert plan.gpu is not None
    provider = toolkit.provider()
    key, created = sshkeys.ensure_key(settings.ssh_key_path)
    if created:
        notify(f"made a new SSH key for hctl: {settings.ssh_key_path}")
    lease_s = lease.lease_seconds(plan.estimate.total_seconds)
    pod_plan = pods.plan_pod(
        provider,
        settings,
        gpu=plan.gpu.id,
        gpu_count=plan.team.gpu_count,
        image=plan.request.image,
        spot=plan.request.spot,
        bid_per_gpu=plan.gpu.price(settings.cloud_type, spot=True) if plan.request.spot else None,
        name=f"hctl-{job_id}",
        max_hours=lease_s / 3600,
        at_limit="terminate",
        public_key=sshkeys.pod_public_keys(provider, key),
    )
    try:
        pod = pods.create_pod(provider, pod_plan)
    except CapacityError as error:
        raise CapacityError(
            f"{error.message} Nothing was created.",
            _alternatives_hint(
                plan.model, plan.catalogue or [], plan.estimate, plan.request, toolkit
            ),
        ) from None
    for note in pod_plan.notes:
        notify(note)
    gpus = f"{plan.team.gpu_count}x " if plan.team.gpu_count > 1 else ""
    notify(
        f"created pod {pod.id} ({gpus}{plan.gpu.display_name}, {format_money(pod.cost_per_hr)}/h)"
    )
    mismatch = pods.price_note(pod_plan, pod)
    if mismatch:
        notify(mismatch)
    assert pod_plan.spec.lease is not None
    notify(f"lease: {lease.describe(provider, pod_plan.spec.lease)}")
    return pod, pod_plan.spec.lease


def release_after_failure(
    provider: Provider, pod_id: str, *, created_here: bool, started_here: bool, notify: Notify
) -> None:
    """A pod brought up for a job that could not start is not left billing."""
    try:
        if created_here:
            provider.terminate(pod_id)
            notify(f"terminated pod {pod_id}: it is not billing")
        elif started_here:
            provider.stop(pod_id)
            notify(f"stopped pod {pod_id} again")
    except HctlError as error:
        notify(
            f"could not release pod {pod_id}: {error.message} — run `hctl terminate-pod {pod_id}`"
        )


def bring_up_pod(plan: RunPlan, record: JobRecord, toolkit: Toolkit, notify: Notify) -> JobRecord:
    """Create or start the pod and wait until it is reachable (bounded)."""
    provider = toolkit.provider()
    store = toolkit.store
    created_here = started_here = False
    pod_id = plan.pod.id if plan.pod is not None else None
    try:
        if plan.pod is None:
            pod, pod_lease = create_pod(plan, record.job_id, toolkit, notify)
            pod_id, created_here = pod.id, True
            record = store.save(
                record.model_copy(
                    update={
                        "pod_id": pod.id,
                        "pod_ids": [*record.pod_ids, pod.id],
                        "lease_until": pod_lease.until.timestamp(),
                        "lease_action": pod_lease.action,
                        "pod_created_here": True,
                        "price_per_hour": pod.cost_per_hr or plan.estimate.price_per_hour or 0.0,
                        "started_at": toolkit.clock(),
                    }
                )
            )
        else:
            pod = plan.pod
            if not pod.active:
                pod = provider.start(pod.id)
                started_here = True
                notify(f"started pod {pod.id}")
            record = store.save(
                record.model_copy(
                    update={
                        "pod_id": pod.id,
                        "price_per_hour": pod.cost_per_hr or plan.estimate.price_per_hour or 0.0,
                        "started_at": toolkit.clock(),
                    }
                )
            )
        notify(f"waiting for pod {pod_id} to become reachable")
        toolkit.wait_until_ready(provider, pod_id)
        return record
    except PodNotReadyError:
        release_after_failure(
            provider, pod_id, created_here=created_here, started_here=started_here, notify=notify
        )
        if created_here or started_here:
            what = "terminated" if created_here else "stopped again"
            outcome = f"so it was {what}: nothing more is billed for it."
        else:
            outcome = "it was left as it was."
        raise PodNotReadyError(
            f"Pod {pod_id} did not become reachable within "
            f"{toolkit.settings.ready_timeout_s:g} s, {outcome}",
            "Try again, or another GPU type or cloud (`hctl gpus`).",
        ) from None
    except BaseException:
        if pod_id is None and plan.pod is None:
            # Interrupted while the create request was in flight: the pod may exist although
            # its id never reached us. It carries the job's unique name, so look for it.
            pod_id = _pod_named(provider, f"hctl-{record.job_id}", notify)
            created_here = pod_id is not None
        if pod_id is not None:
            release_after_failure(
                provider,
                pod_id,
                created_here=created_here,
                started_here=started_here,
                notify=notify,
            )
        raise


def _pod_named(provider: Provider, name: str, notify: Notify) -> str | None:
    try:
        return next((pod.id for pod in provider.list() if pod.name == name), None)
    except HctlError as error:
        notify(
            f"could not check whether pod {name} was created: {error.message} — "
            "run `hctl list-pods` and terminate it if it is there"
        )
        return None


# --- Files on the machine ------------------------------------------------------------------


def upload_folder(remote: Remote, local: Path, remote_dir: str) -> None:
    """Upload a folder's files (recursively); a finished upload is marked and not repeated."""
    marker = f"{remote_dir}/.hctl-complete"
    if remote.run(f"test -f {shlex.quote(marker)}", timeout=30).exit_code == 0:
        return
    files = sorted(path for path in local.rglob("*") if path.is_file())
    folders = sorted({str(Path(remote_dir, path.relative_to(local).parent)) for path in files})
    remote.run("mkdir -p " + " ".join(shlex.quote(folder) for folder in folders), timeout=60)
    for path in files:
        remote.put(path, f"{remote_dir}/{path.relative_to(local).as_posix()}")
    remote.run(f"touch {shlex.quote(marker)}", timeout=30)


def content_tag(path: Path) -> str:
    """A short tag of a file or folder's names and sizes, to name its copy on the machine."""
    digest = hashlib.sha256()
    items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for item in items:
        digest.update(f"{item.relative_to(path.parent)}:{item.stat().st_size}".encode())
    return digest.hexdigest()[:10]


def place_inputs(
    settings: dict[str, Any], remote: Remote, base_dir: str, *, local_machine: bool
) -> dict[str, Any]:
    """Make the model and prompt files the settings name available on the machine.

    On this machine local paths only become absolute; elsewhere they are uploaded (once) under
    `<base>/models/` and `<base>/data/` and the settings point at the copies.
    """
    placed = dict(settings)
    model = Path(str(placed["model"])).expanduser()
    if model.is_dir():
        if local_machine:
            placed["model"] = str(model.resolve())
        else:
            target = f"{base_dir}/models/{model.resolve().name}-{content_tag(model)}"
            upload_folder(remote, model, target)
            placed["model"] = target
    for key in PROMPT_TABLES:
        table = placed.get(key)
        if not isinstance(table, dict) or "dataset" not in table:
            continue
        source = Path(str(table["dataset"])).expanduser()
        if not source.exists():
            continue  # a hub dataset id
        table = dict(table)
        if local_machine:
            table["dataset"] = str(source.resolve())
        elif source.is_dir():
            target = f"{base_dir}/data/{source.resolve().name}-{content_tag(source)}"
            upload_folder(remote, source, target)
            table["dataset"] = target
        else:
            target_dir = f"{base_dir}/data/{content_tag(source)}"
            remote.run(f"mkdir -p {shlex.quote(target_dir)}", timeout=30)
            target = f"{target_dir}/{source.name}"
            remote.put(source, target)
            table["dataset"] = target
        placed[key] = table
    return placed


def put_text(remote: Remote, text: str, remote_path: str) -> None:
    """Upload text through a private temporary file."""
    descriptor, name = tempfile.mkstemp(prefix="hctl-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        remote.put(Path(name), remote_path)
    finally:
        Path(name).unlink(missing_ok=True)


def secrets_env(values: dict[str, str | None]) -> str:
    return "".join(
        f"export {name}={shlex.quote(value)}\n" for name, value in values.items() if value
    )


def upload_secrets(remote: Remote, job_dir: str, values: dict[str, str | None]) -> None:
    text = secrets_env(values)
    if not text:
        return
    path = f"{job_dir}/{SECRETS_FILE}"
    put_text(remote, text, path)
    remote.run(f"chmod 600 {shlex.quote(path)}", timeout=30)


def check_not_running(remote: Remote, job_dir: str) -> None:
    """Refuse to start a second worker in a job directory whose worker still runs (its launcher
    lives exactly as long as it does; a worker started by hand there is refused by the worker's
    own lock on the events file)."""
    result = remote.run(f"if {running_test(job_dir)}; then echo busy; fi", timeout=30)
    if "busy" in result.output:
        raise JobError(
            f"A worker is already running in {job_dir} on {remote.description}.",
            "Let it finish (`hctl jobs` shows it; `hctl attach JOB` follows it), stop it with "
            "`hctl cancel JOB`, or give this run another --output folder.",
        )


def start_worker(
    record: JobRecord,
    plan_settings: dict[str, Any],
    remote: Remote,
    toolkit: Toolkit,
    notify: Notify,
    *,
    token: str | None,
    resume_files: dict[str, Path] | None = None,
) -> JobRecord:
    """Keep the pod's lease, install the worker, put the job directory in place, and start the
    worker detached."""
    job_dir = record.remote_job_dir
    if record.target == "pod" and record.lease_until is not None:
        kept = lease.keep_for_job(
            remote, toolkit.provider(), lease_until=record.lease_until,
            action=record.lease_action, job_dir=job_dir, now=toolkit.clock(),
        )  # fmt: skip
        if kept:
            notify(kept)
    check_not_running(remote, job_dir)
    handle = toolkit.ensure_worker(remote)
    worker = handle.command
    remote.run(f"umask 077 && mkdir -p {shlex.quote(job_dir)}", timeout=60)
    base_dir = job_dir.rsplit("/jobs/", 1)[0]
    settings = place_inputs(plan_settings, remote, base_dir, local_machine=record.target == "local")
    text = tomli_w.dumps(settings)
    toolkit.store.settings_path(record.job_id).write_text(text, encoding="utf-8")
    put_text(remote, text, f"{job_dir}/{SETTINGS_FILE}")
    for name, path in (resume_files or {}).items():
        # A file already on the machine is at least as new as the copy at home: keep it.
        there = remote.run(f"test -f {shlex.quote(f'{job_dir}/{name}')}", timeout=30)
        if path.is_file() and there.exit_code != 0:
            remote.put(path, f"{job_dir}/{name}")
            notify(f"uploaded the copy of {name} from this computer")
    upload_secrets(remote, job_dir, {"HF_TOKEN": token})
    self_stop = stop_command = None
    if record.target == "pod" and record.after != "keep":
        self_stop = toolkit.settings.self_stop_grace_s
        stop_command = toolkit.provider().self_stop_command("stop")
    result = remote.run(
        launch_command(
            worker, job_dir, env=handle.environment, self_stop_after_s=self_stop,
            stop_command=stop_command, workers=record.workers, one_gpu_each=record.one_gpu_each,
        ),
        timeout=60,
    )  # fmt: skip
    if result.exit_code != 0:
        raise JobError(
            f"Could not start the worker on {remote.description}: {result.output.strip()[-300:]}",
            f"See `hctl logs {record.job_id}`.",
        )
    started = f"{record.workers} workers" if record.workers > 1 else "worker"
    notify(f"{started} started on {remote.description} in {job_dir}")
    return toolkit.store.save(
        record.model_copy(update={"status": "running", "worker_command": worker})
    )


def new_record(plan: RunPlan, toolkit: Toolkit) -> JobRecord:
    request = plan.request
    job_id = new_job_id(toolkit.clock())
    settings = toolkit.settings
    return JobRecord(
        job_id=job_id,
        model=request.model,
        worker_model=str(plan.worker_settings.get("model")),
        n_trials=plan.n_trials,
        target=plan.target,
        pod_id=plan.pod.id if plan.pod is not None else None,
        address=request.on if plan.target == "ssh" else None,
        remote_job_dir="",
        gpu_id=plan.gpu.id if plan.gpu is not None else None,
        gpu_count=plan.team.gpu_count,
        workers=plan.team.workers,
        one_gpu_each=plan.team.one_gpu_each,
        price_per_hour=plan.estimate.price_per_hour or 0.0,
        max_cost=request.max_cost if request.max_cost is not None else settings.max_cost,
        after=request.after or settings.after,
        download_dir=str(request.download.expanduser().resolve()) if request.download else None,
        upload_repo=request.upload,
        trial_choice=request.trial,
        kl_limit=settings.kl_limit,
        started_at=toolkit.clock() if plan.target != "pod" else None,
        worker_settings=plan.worker_settings,
        parameters=plan.model.parameters,
        estimated_seconds_per_trial=plan.estimate.seconds_per_trial,
        estimated_cost=plan.estimate.total_cost,
    )


def local_job_dir(record: JobRecord, request: RunRequest, toolkit: Toolkit) -> str:
    if request.job_dir:
        return str(Path(request.job_dir).expanduser().resolve())
    return str((toolkit.store.folder(record.job_id) / "worker").resolve())


def start_job(plan: RunPlan, toolkit: Toolkit, notify: Notify) -> JobRecord:
    """Get the machine, start the worker; returns the saved record of a running job."""
    store = toolkit.store
    record = store.save(new_record(plan, toolkit))
    notify(f"job {record.job_id}")
    if plan.target == "pod":
        record = bring_up_pod(plan, record, toolkit, notify)
    try:
        remote = toolkit.connect(record)
        try:
            if plan.target == "local":
                job_dir = local_job_dir(record, plan.request, toolkit)
            else:
                job_dir = f"{remote_base_dir(plan.target, remote, toolkit)}/jobs/{record.job_id}"
            record = store.save(record.model_copy(update={"remote_job_dir": job_dir}))
            return start_worker(
                record, plan.worker_settings, remote, toolkit, notify, token=plan.hf_token
            )
        finally:
            remote.close()
    except BaseException as error:
        store.save(
            record.model_copy(
                update={"status": "failed", "message": getattr(error, "message", repr(error))}
            )
        )
        if record.pod_id is not None and plan.target == "pod":
            release_after_failure(
                toolkit.provider(),
                record.pod_id,
                created_here=plan.creates_pod,
                started_here=plan.pod is not None and not plan.pod.active,
                notify=notify,
            )
        if isinstance(error, RemoteError | JobError):
            raise JobError(
                f"Setting up the job failed: {error.message}", getattr(error, "hint", None)
            ) from None
        raise


__all__ = ["JOURNAL_FILE", "RunPlan", "RunRequest", "plan_run", "start_job"]
