"""Resuming a job from the journal and events copied home: on its own pod when that still
exists, else on a new pod (or a given one) whose fresh job directory gets the copies; the worker
then skips every trial the journal holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hctl.errors import JobError, PodNotFoundError
from hctl.providers.base import PodStatus
from hctl.services.estimate import format_money
from hctl.services.fleet_launch import resume_fleet
from hctl.services.jobs import JobRecord
from hctl.services.planning import Notify, hf_token
from hctl.services.provisioning import release_after_failure
from hctl.services.runs import meter_for
from hctl.services.sync import local_progress, worker_alive
from hctl.services.toolkit import Toolkit
from hctl_worker.events import EVENTS_FILE, JOURNAL_FILE


def resume_job(
    record: JobRecord,
    toolkit: Toolkit,
    notify: Notify,
    *,
    n_trials: int | None = None,
    gpu: str | None = None,
    pod: str | None = None,
    confirm: Callable[[str], None] | None = None,
) -> JobRecord:
    """Run the worker again on the job's journal: trials already done are not redone.

    On its pod when that still exists (started again if stopped), else on a new pod (or the
    one given) where the journal and events copied home are uploaded into a fresh job directory.
    """
    store = toolkit.store
    if (
        pod is None
        and (record.target != "pod" or _pod_usable(record, toolkit))
        and worker_alive(record, toolkit) is True
    ):
        raise JobError(
            f"Job {record.job_id} is still running.",
            f"Follow it with `hctl attach {record.job_id}`.",
        )
    progress = local_progress(record, toolkit)
    total = n_trials if n_trials is not None else record.n_trials
    if total < 1:
        raise JobError("--trials must be at least 1.", "Give the total number of trials.")
    # A search that ended on a pod that went away before the model was saved is finished on a
    # new pod: the worker there finds every trial done and goes on to the export.
    finished = record.status == "finished" or (
        record.status != "interrupted"
        and progress.done is not None
        and progress.trials_done >= record.n_trials
    )
    if finished and total <= progress.trials_done:
        raise JobError(
            f"Job {record.job_id} is finished: its {progress.trials_done} trials ran.",
            f"`hctl results {record.job_id}` shows them; `hctl resume {record.job_id} --trials N` "
            f"with N above {progress.trials_done} runs more.",
        )
    settings_values = dict(record.worker_settings)
    settings_values["n_trials"] = total
    # A resumed search may find a better trial: the choice, export and download are redone.
    updates: dict = {
        "n_trials": total,
        "worker_settings": settings_values,
        "status": "preparing",
        "chosen_trial": None,
        "saved_model_dir": None,
        "downloaded_to": None,
    }
    if record.target == "pod":
        meter = meter_for(record, toolkit)
        last_seen = max(
            (event.ts for event in store.events(record.job_id) if hasattr(event, "ts")),
            default=meter.started_at,
        )
        spent = meter.spent(last_seen) if record.started_at is not None else record.spent_before
        updates["spent_before"] = spent
    if record.members and (gpu is not None or pod is not None):
        raise JobError(
            f"Job {record.job_id} runs on several pods; it continues on its own pods.",
            f"Leave out --gpu and --pod: `hctl resume {record.job_id}`.",
        )
    record = store.save(record.model_copy(update=updates))
    if record.members:
        notify(f"resuming job {record.job_id}: {progress.trials_done} trials done, {total} wanted")
        return resume_fleet(record, toolkit, notify, settings_values=settings_values)
    created_now = False
    if record.target == "pod":
        record, created_now = _resume_machine(
            record, toolkit, notify, gpu=gpu, pod=pod, confirm=confirm
        )
    else:
        record = store.save(record.model_copy(update={"started_at": toolkit.clock()}))
    notify(f"resuming job {record.job_id}: {progress.trials_done} trials done, {total} wanted")
    remote = toolkit.connect(record)
    try:
        from hctl.services.launch import start_worker

        return start_worker(
            record,
            settings_values,
            remote,
            toolkit,
            notify,
            token=hf_token(toolkit),
            resume_files={
                JOURNAL_FILE: store.journal_path(record.job_id),
                EVENTS_FILE: store.events_path(record.job_id),
            },
        )
    except BaseException:
        # Only a pod created for this resume goes; the job's own pod keeps its volume.
        if created_now and record.pod_id:
            release_after_failure(
                toolkit.provider(), record.pod_id, created_here=True, started_here=False,
                notify=notify,
            )  # fmt: skip
        raise
    finally:
        remote.close()


def _pod_usable(record: JobRecord, toolkit: Toolkit) -> bool:
    try:
        pod = toolkit.provider().get(record.pod_id or "")
    except PodNotFoundError:
        return False
    return pod.status not in (PodStatus.TERMINATED, PodStatus.FAILED)


def _team_of(plan: Any) -> dict[str, Any]:
    team = plan.team
    return {"gpu_count": team.gpu_count, "workers": team.workers, "one_gpu_each": team.one_gpu_each}


def _resume_machine(
    record: JobRecord,
    toolkit: Toolkit,
    notify: Notify,
    *,
    gpu: str | None,
    pod: str | None,
    confirm: Callable[[str], None] | None,
) -> tuple[JobRecord, bool]:
    """The pod to continue on: the job's own if it still exists, the given one, or a new one
    (then the flag is True)."""
    from hctl.services.planning import RunRequest, plan_run
    from hctl.services.provisioning import bring_up_pod, remote_base_dir

    reuse_own = pod is None and gpu is None and _pod_usable(record, toolkit)
    if reuse_own:
        pod = record.pod_id
        notify(f"pod {pod} still exists: continuing there")
    request = RunRequest(
        # The worker settings hold the model as an absolute path (or a repo id): a resume works
        # from any folder.
        model=str(record.worker_settings.get("model") or record.model),
        n_trials=max(1, record.n_trials - len(local_progress(record, toolkit).trials)),
        gpu=(gpu or record.gpu_id) if pod is None else None,  # a given pod has its own GPU
        pod=pod,
        params=str(record.parameters) if record.parameters else None,
        after=record.after,
        # A new pod gets as many GPUs as the job had (one worker each, when the model fits one).
        gpus=record.gpu_count if pod is None and record.gpu_count > 1 else None,
    )
    plan = plan_run(request, toolkit)
    plan.worker_settings = record.worker_settings
    if confirm is not None and plan.creates_pod:
        confirm(
            f"Create a new {plan.estimate.gpu_name} pod to finish job {record.job_id} for about "
            f"{format_money(plan.estimate.total_cost)}?"
        )
    record = toolkit.store.save(
        record.model_copy(
            update={"pod_id": None if plan.creates_pod else plan.pod.id if plan.pod else None,
                    "pod_created_here": plan.creates_pod or (reuse_own and record.pod_created_here),
                    "gpu_id": plan.gpu.id if plan.gpu else record.gpu_id,
                    **(_team_of(plan) if plan.creates_pod else {})}
        )
    )  # fmt: skip
    record = bring_up_pod(plan, record, toolkit, notify)
    if plan.creates_pod:
        record = toolkit.store.save(record.model_copy(update={"pod_created_here": True}))
    remote = toolkit.connect(record)
    try:
        job_dir = f"{remote_base_dir('pod', remote, toolkit)}/jobs/{record.job_id}"
    finally:
        remote.close()
    record = toolkit.store.save(record.model_copy(update={"remote_job_dir": job_dir}))
    return record, plan.creates_pod
