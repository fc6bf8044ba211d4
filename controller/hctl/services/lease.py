"""The lease: a deadline the provider enforces, so a pod forgotten by everyone still stops billing.

A new pod is created with `terminate_after` = now + the estimated job time × `LEASE_FACTOR` +
`LEASE_MARGIN_S`. The Provider protocol has no call to move that deadline later, so the lease is
sized generously instead of being extended while the job makes progress, and hctl says so. A job
that outlives its lease loses its pod, but not its results: the journal and events are copied
home after every trial and `hctl resume JOB` continues on a new pod.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

LEASE_FACTOR = 3.0
LEASE_MARGIN_S = 3600.0
MINIMUM_LEASE_S = 2 * 3600.0


def lease_seconds(estimated_seconds: float) -> float:
    return max(MINIMUM_LEASE_S, estimated_seconds * LEASE_FACTOR + LEASE_MARGIN_S)


def lease_deadline(estimated_seconds: float, now: datetime | None = None) -> datetime:
    """When the provider should terminate the pod if nothing else did first."""
    start = now if now is not None else datetime.now(timezone.utc)
    return start + timedelta(seconds=lease_seconds(estimated_seconds))
