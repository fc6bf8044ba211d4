"""What the provider really billed for a job's pods, to show next to the estimate.

Only pods created for the job count (a pod given with `--pod` bills for other work too). A
provider that reports no bills (RunPod GraphQL), no API key, or an API that cannot be reached
leave a job's bill unknown: nothing here ever makes `hctl jobs` or `hctl results` fail.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from hctl.errors import HctlError
from hctl.providers.base import Provider
from hctl.services.estimate import format_money
from hctl.services.jobs import JobRecord


def job_pods(record: JobRecord) -> list[str]:
    """The pods created for this job (older records name only the last one)."""
    if record.pod_ids:
        return list(record.pod_ids)
    return [record.pod_id] if record.pod_created_here and record.pod_id else []


def billed_by_job(
    records: list[JobRecord], provider_factory: Callable[[], Provider]
) -> dict[str, float]:
    """USD billed for each job's pods, by job id; jobs whose bill is unknown are left out."""
    wanted = {record.job_id: job_pods(record) for record in records if record.target == "pod"}
    wanted = {job_id: pods for job_id, pods in wanted.items() if pods}
    if not wanted:
        return {}
    starts = [
        datetime.fromisoformat(record.created_at) for record in records if record.job_id in wanted
    ]
    since = min(starts) - timedelta(days=1)  # a day bucket may begin before the job did
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    try:
        provider = provider_factory()
        if not provider.capabilities.billing:
            return {}
        by_pod = provider.billed(sorted({pod for pods in wanted.values() for pod in pods}), since)
    except HctlError:
        return {}
    if by_pod is None:
        return {}
    return {job_id: sum(by_pod.get(pod, 0.0) for pod in pods) for job_id, pods in wanted.items()}


def bill_text(record: JobRecord, billed: float | None) -> str:
    """`$1.23 billed (estimate $1.50)`, or what is known of it."""
    estimate = (
        f"estimate {format_money(record.estimated_cost)}"
        if record.estimated_cost is not None
        else ""
    )
    if billed is None:
        return estimate or "—"
    return f"{format_money(billed)} billed" + (f" ({estimate})" if estimate else "")
