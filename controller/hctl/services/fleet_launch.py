"""Starting a job on several pods (see `fleet`): every pod created and waited for, PostgreSQL
started on the first (`database.start_on`), then each pod's workers, on one study.

Any failure, or Ctrl-C, before every pod's workers run terminates every pod created for the job
(a create cut short is looked for by its unique name), and the job is marked failed: nothing is
left billing by accident.
"""

from __future__ import annotations

from hctl.errors import HctlError, JobError, PodNotFoundError
from hctl.providers.base import Pod, PodStatus, Provider
from hctl.services.database import Database, new_database, password_line, start_on
from hctl.services.fleet import FleetPlan, database_address, job_dir_name, pod_view
from hctl.services.jobs import JobRecord, PodMember, failed_to_start
from hctl.services.launch import WorkerDatabase, launch_workers, new_record
from hctl.services.planning import Notify, RunPlan
from hctl.services.provisioning import create_pod, pod_named, release_after_failure
from hctl.services.toolkit import Toolkit


def start_fleet(plan: RunPlan, toolkit: Toolkit, notify: Notify) -> JobRecord:
    """Create the job's pods, start its database and workers; returns the saved record of a
    running job that lists every pod."""
    fleet = plan.fleet
    assert fleet is not None
    store = toolkit.store
    record = store.save(new_record(plan, toolkit))
    notify(f"job {record.job_id}: {fleet.pods} pods; {fleet.note}")
    names = [f"hctl-{record.job_id}-{index + 1}" for index in range(fleet.pods)]
    try:
        record = _create_pods(plan, fleet, record, toolkit, notify, names)
        ready = []
        for member in record.members:
            notify(f"waiting for pod {member.pod_id} to become reachable")
            ready.append(toolkit.wait_until_ready(toolkit.provider(), member.pod_id))
        database = new_database(record.job_id, port=fleet.database_port)
        first = pod_view(record, record.members[0])
        remote = toolkit.connect(first)
        try:
            assert record.database_dir is not None
            start_on(remote, database, record.database_dir, first.remote_job_dir)
        finally:
            remote.close()
        notify(f"PostgreSQL runs on pod {first.pod_id}; its data: {record.database_dir}")
        record = store.save(record.model_copy(update={"database_url": database.url}))
        worker = _start_workers(plan, record, ready, database, toolkit, notify)
    except BaseException as error:
        _release_all(record, names, toolkit, notify, error)
        if isinstance(error, HctlError):
            raise JobError(
                f"Setting up the job failed: {error.message}", getattr(error, "hint", None)
            ) from None
        raise
    return store.save(record.model_copy(update={"status": "running", "worker_command": worker}))


def _create_pods(
    plan: RunPlan,
    fleet: FleetPlan,
    record: JobRecord,
    toolkit: Toolkit,
    notify: Notify,
    names: list[str],
) -> JobRecord:
    """Create every pod, recording each as soon as it exists."""
    base = f"{toolkit.settings.volume_path.rstrip('/')}/hctl"
    store = toolkit.store
    for index, name in enumerate(names):
        pod, pod_lease = create_pod(
            plan, record.job_id, toolkit, notify, name=name,
            ports=fleet.ports if index == 0 else None,
            global_networking=fleet.network == "private",
        )  # fmt: skip
        member = PodMember(
            pod_id=pod.id,
            remote_job_dir=f"{base}/jobs/{job_dir_name(record.job_id, index)}",
            first_worker=index * record.workers + 1,
            price_per_hour=pod.cost_per_hr or plan.estimate.price_per_hour or 0.0,
        )
        members = [*record.members, member]
        first = members[0]
        record = store.save(
            record.model_copy(
                update={
                    "members": members,
                    "pod_id": first.pod_id,
                    "pod_ids": [item.pod_id for item in members],
                    "remote_job_dir": first.remote_job_dir,
                    "database_dir": f"{base}/databases/{record.job_id}",
                    "lease_until": record.lease_until or pod_lease.until.timestamp(),
                    "lease_action": pod_lease.action,
                    "pod_created_here": True,
                    "price_per_hour": sum(item.price_per_hour for item in members),
                    "started_at": record.started_at or toolkit.clock(),
                }
            )
        )
    return record


def _start_workers(
    plan: RunPlan,
    record: JobRecord,
    ready: list[Pod],
    database: Database,
    toolkit: Toolkit,
    notify: Notify,
) -> str:
    """Start each pod's workers on the study; returns the worker's command."""
    assert plan.fleet is not None
    worker = record.worker_command
    for member, pod in zip(record.members, ready, strict=True):
        host, port, how = database_address(ready[0], pod, plan.fleet.database_port)
        notify(f"pod {pod.id} reaches the database {how} ({host}:{port})")
        view = pod_view(record, member)
        remote = toolkit.connect(view)
        try:
            worker, _ = launch_workers(
                view, plan.worker_settings, remote, toolkit, notify, token=plan.hf_token,
                database=WorkerDatabase(
                    url=database.at(host, port).url,
                    password_line=password_line(database),
                    first_worker=member.first_worker,
                ),
            )  # fmt: skip
        finally:
            remote.close()
    return worker


def _release_all(
    record: JobRecord, names: list[str], toolkit: Toolkit, notify: Notify, error: BaseException
) -> None:
    """Terminate every pod created for the job that could not start; mark it failed."""
    toolkit.store.save(failed_to_start(record, error))
    provider = toolkit.provider()
    pod_ids = [member.pod_id for member in record.members]
    if len(pod_ids) < len(names):
        # Interrupted while a create request was in flight: the pod may exist although its id
        # never reached us. It carries the job's unique name, so look for it.
        found = pod_named(provider, names[len(pod_ids)], notify)
        if found is not None:
            pod_ids.append(found)
    for pod_id in pod_ids:
        release_after_failure(
            provider, pod_id, created_here=True, started_here=False, notify=notify
        )


def resume_fleet(
    record: JobRecord, toolkit: Toolkit, notify: Notify, *, settings_values: dict
) -> JobRecord:
    """Continue a job on several pods on its own pods: each one still there is started again
    (a lost one is left out), then the database on the first, then the workers, which read the
    study where it is. The password files are still in the pods' job directories."""
    provider = toolkit.provider()
    first = record.members[0]
    try:
        status = provider.get(first.pod_id).status
    except PodNotFoundError:
        status = PodStatus.TERMINATED
    if status in (PodStatus.TERMINATED, PodStatus.FAILED):
        raise JobError(
            f"Pod {first.pod_id}, which held the study's database, is {status}: the study "
            "cannot be continued.",
            f"`hctl results {record.job_id}` shows the trials it ran; start a new job to search "
            "again.",
        )
    members, ready = [], []
    for member in record.members:
        pod = _started_again(provider, member, toolkit, notify)
        if pod is None:
            members.append(member.model_copy(update={"lost": member.lost or "gone"}))
            continue
        members.append(member.model_copy(update={"lost": ""}))
        ready.append(pod)
    record = toolkit.store.save(
        record.model_copy(update={"members": members, "started_at": toolkit.clock()})
    )
    assert record.database_dir is not None and record.database_url is not None
    port = record.database_url.rpartition("/")[0].rpartition(":")[2]
    database = Database(record.database_url.rpartition("/")[2], "", int(port), password="")
    view = pod_view(record, members[0])
    remote = toolkit.connect(view)
    try:
        start_on(remote, database, record.database_dir, view.remote_job_dir)
    finally:
        remote.close()
    notify(f"PostgreSQL runs again on pod {first.pod_id}")
    worker = record.worker_command
    live = [member for member in members if not member.lost]
    for member, pod in zip(live, ready, strict=True):
        host, port_there, how = database_address(ready[0], pod, database.port)
        notify(f"pod {pod.id} reaches the database {how} ({host}:{port_there})")
        view = pod_view(record, member)
        remote = toolkit.connect(view)
        try:
            worker, _ = launch_workers(
                view, settings_values, remote, toolkit, notify, token=None,
                database=WorkerDatabase(url=database.at(host, port_there).url, password_line="",
                                        first_worker=member.first_worker),
            )  # fmt: skip
        finally:
            remote.close()
    return toolkit.store.save(
        record.model_copy(update={"status": "running", "worker_command": worker})
    )


def _started_again(
    provider: Provider, member: PodMember, toolkit: Toolkit, notify: Notify
) -> Pod | None:
    """The pod running and reachable again; None when it is gone."""
    try:
        pod = provider.get(member.pod_id)
    except PodNotFoundError:
        notify(f"pod {member.pod_id} is gone: the search goes on without it")
        return None
    if pod.status in (PodStatus.TERMINATED, PodStatus.FAILED):
        notify(f"pod {member.pod_id} is {pod.status}: the search goes on without it")
        return None
    if not pod.active:
        provider.start(pod.id)
        notify(f"started pod {pod.id}")
    notify(f"waiting for pod {pod.id} to become reachable")
    return toolkit.wait_until_ready(provider, pod.id)
