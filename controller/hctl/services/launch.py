"""From a plan to a worker running detached on a machine.

`start_job` gets the machine (a new pod, a given one, an SSH host or this one; see
`provisioning`), installs the worker, uploads the settings (and a local model, see `uploads`),
and starts the worker detached in its job directory, so it keeps going when the laptop sleeps.
The plan itself is `planning.plan_run`; a job on several pods is `fleet_launch`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from hctl.errors import JobError, RemoteError
from hctl.remote.base import Remote
from hctl.services import lease
from hctl.services.job_protocol import PGPASS_FILE, check_not_running, launch_command
from hctl.services.jobs import JobRecord, failed_to_start, new_job_id
from hctl.services.planning import Notify, RunPlan, RunRequest, hf_token, plan_run
from hctl.services.provisioning import bring_up_pod, release_after_failure, remote_base_dir
from hctl.services.toolkit import Toolkit, check_local_worker
from hctl.services.uploads import place_inputs, put_text, upload_private, upload_secrets
from hctl_worker.events import JOURNAL_FILE, SETTINGS_FILE


@dataclass(frozen=True)
class WorkerDatabase:
    """The study's database as one pod's workers reach it (a job on several pods)."""

    url: str  # postgresql://USER@HOST:PORT/DB, no password
    # the .pgpass line (the password inside), written 0600; "": already there
    password_line: str = field(repr=False)
    first_worker: int  # the pod's workers are named from this number on


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
    """Start the job's workers on its machine (see `launch_workers`); returns the saved record
    of the running job."""
    worker, one_gpu_each = launch_workers(
        record, plan_settings, remote, toolkit, notify, token=token, resume_files=resume_files
    )
    return toolkit.store.save(
        record.model_copy(
            update={"status": "running", "worker_command": worker, "one_gpu_each": one_gpu_each}
        )
    )


def launch_workers(
    record: JobRecord,
    plan_settings: dict[str, Any],
    remote: Remote,
    toolkit: Toolkit,
    notify: Notify,
    *,
    token: str | None,
    resume_files: dict[str, Path] | None = None,
    database: WorkerDatabase | None = None,
) -> tuple[str, bool]:
    """Keep the pod's lease, install the worker, put the job directory in place, and start the
    workers detached; returns the worker's command and whether each worker has a GPU of its own.

    `database`: the study is in that database (a job on several pods, see `fleet_launch`): its
    password goes into the job directory's 0600 `.pgpass`, the workers get its URL without it.
    """
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
    if database is not None and database.password_line:
        upload_private(remote, database.password_line, f"{job_dir}/{PGPASS_FILE}")
    one_gpu_each = record.one_gpu_each or gpu_each_on_host(record, remote, notify)
    self_stop = stop_command = None
    if record.target == "pod" and record.after != "keep":
        self_stop = toolkit.settings.self_stop_grace_s
        stop_command = toolkit.provider().self_stop_command("stop")
    result = remote.run(
        launch_command(
            worker, job_dir, env=handle.environment, self_stop_after_s=self_stop,
            stop_command=stop_command, workers=record.workers, one_gpu_each=one_gpu_each,
            first_worker=database.first_worker if database else 1,
            storage=database.url if database else None,
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
    return worker, one_gpu_each


def gpu_each_on_host(record: JobRecord, remote: Remote, notify: Notify) -> bool:
    """`--on ssh://... --workers N` on a host with N GPUs or more: each worker gets its own
    (CUDA_VISIBLE_DEVICES), as on a pod with `--gpus N`."""
    if record.target != "ssh" or record.workers < 2:
        return False
    listing = remote.run(
        "nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null", timeout=60
    ).output
    count = sum(1 for line in listing.splitlines() if line.strip().isdigit())
    if count < record.workers:
        if count:
            notify(
                f"{remote.description} has {count} GPU(s) for {record.workers} workers: they share"
            )
        return False
    notify(f"{remote.description} has {count} GPUs: each of the {record.workers} workers gets one")
    return True


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
    if plan.target == "local":
        check_local_worker()
    store = toolkit.store
    record = store.save(new_record(plan, toolkit))
    notify(f"job {record.job_id}")
    if plan.target == "pod":
        try:
            record = bring_up_pod(plan, record, toolkit, notify)
        except BaseException as error:
            # bring_up_pod released the pod; the saved record is the one that names it.
            store.save(failed_to_start(store.load(record.job_id), error))
            raise
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
        store.save(failed_to_start(record, error))
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


__all__ = ["JOURNAL_FILE", "Notify", "RunPlan", "RunRequest", "hf_token", "plan_run", "start_job"]
