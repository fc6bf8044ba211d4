"""Getting a pod for a job: a new one (named `hctl-<job id>`, with a lease) or a given one,
started and waited for until it is reachable. Any failure, or Ctrl-C, while a pod that hctl
created is being brought up terminates that pod: nothing is left billing by accident.
"""

from __future__ import annotations

from hctl.errors import CapacityError, HctlError, JobError, PodNotReadyError
from hctl.interrupts import releasing
from hctl.providers.base import Pod, PodLease, Provider
from hctl.remote.base import Remote
from hctl.services import lease
from hctl.services.estimate import format_money
from hctl.services.jobs import JobRecord, TargetKind
from hctl.services.planning import Notify, RunPlan, alternatives_hint
from hctl.services.toolkit import Toolkit


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
    plan: RunPlan,
    job_id: str,
    toolkit: Toolkit,
    notify: Notify,
    *,
    name: str | None = None,
    ports: list[str] | None = None,
    global_networking: bool = False,
) -> tuple[Pod, PodLease]:
    """A new pod named `name` (default `hctl-<job id>`), with a lease sized from the estimate."""
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
        name=name or f"hctl-{job_id}",
        ports=ports,
        max_hours=lease_s / 3600,
        at_limit="terminate",
        public_key=sshkeys.pod_public_keys(provider, key),
        global_networking=global_networking,
    )
    try:
        pod = pods.create_pod(provider, pod_plan)
    except CapacityError as error:
        raise CapacityError(
            f"{error.message} Nothing was created.",
            alternatives_hint(
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
    """A pod brought up for a job that could not start is not left billing; a Ctrl-C during the
    release is held off (see `hctl.interrupts`), and the user is told when it was not released."""
    if not (created_here or started_here):
        return
    verb = "terminate" if created_here else "stop"
    still = (
        f"still releasing pod {pod_id} so that it does not go on billing; "
        "Ctrl-C again leaves it as it is"
    )
    try:
        with releasing(pod_id, verb, notify, still):
            if created_here:
                provider.terminate(pod_id)
                notify(f"terminated pod {pod_id}: it is not billing")
            else:
                provider.stop(pod_id)
                notify(f"stopped pod {pod_id} again")
    except HctlError as error:
        notify(f"could not release pod {pod_id}: {error.message} — run `hctl {verb}-pod {pod_id}`")


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
            pod_id = pod_named(provider, f"hctl-{record.job_id}", notify)
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


def pod_named(provider: Provider, name: str, notify: Notify) -> str | None:
    try:
        return next((pod.id for pod in provider.list() if pod.name == name), None)
    except HctlError as error:
        notify(
            f"could not check whether pod {name} was created: {error.message} — "
            "run `hctl list-pods` and terminate it if it is there"
        )
        return None
