"""The lease: a deadline for every pod hctl creates, so a pod forgotten by everyone stops billing.

A new pod gets `until` = now + the estimated job time × `LEASE_FACTOR` + `LEASE_MARGIN_S`.
Who keeps it depends on the provider (`Capabilities.lease`):

- a provider that enforces deadlines itself (RunPod GraphQL's `stopAfter` / `terminateAfter`)
  gets it with the create, and cannot move it later;
- otherwise (RunPod REST v2) the pod keeps it: `hctl.watchdog` runs on the pod, independent of
  the worker and of this computer, and stops or terminates the pod with the provider's
  `self_stop_command` (the pod's own credentials) when the lease passes. It is started at boot by
  the hctl worker image (`HCTL_LEASE_*` in the pod's environment, see `lease_environment`) and,
  for any image, by `arm` as soon as hctl reaches the pod over SSH. While a job writes events
  the deadline moves with them: it is never earlier than the last progress + `EXTEND_S`.

A job that outlives its lease loses its pod, not its results: the journal and events are copied
home after every trial and `hctl resume JOB` continues on a new pod.
"""

from __future__ import annotations

import inspect
import json
import shlex
from datetime import datetime, timedelta, timezone

from hctl import watchdog
from hctl.errors import RemoteError
from hctl.providers.base import LeaseAction, Pod, PodLease, Provider
from hctl.remote.base import Remote
from hctl.services.estimate import format_duration
from hctl.settings import Settings
from hctl_worker.events import EVENTS_FILE

LEASE_FACTOR = 3.0
LEASE_MARGIN_S = 3600.0
MINIMUM_LEASE_S = 2 * 3600.0
EXTEND_S = 3600.0  # a job that wrote an event within this long keeps its pod
WATCHDOG_POLL_S = 30.0
LEASE_FILE = "lease.json"
WATCHDOG_FILE = "watchdog.py"


def lease_seconds(estimated_seconds: float) -> float:
    return max(MINIMUM_LEASE_S, estimated_seconds * LEASE_FACTOR + LEASE_MARGIN_S)


def lease_deadline(estimated_seconds: float, now: datetime | None = None) -> datetime:
    """When the pod should be stopped or terminated if nothing else did first."""
    start = now if now is not None else datetime.now(timezone.utc)
    return start + timedelta(seconds=lease_seconds(estimated_seconds))


def kept_by_pod(provider: Provider) -> bool:
    """Whether a lease on this provider's pods needs the pod's own watchdog."""
    return not provider.capabilities.lease and provider.self_stop_command("stop") is not None


def lease_environment(
    provider: Provider, lease: PodLease, volume_path: str, *, extend_s: float = 0.0
) -> dict[str, str]:
    """What a new pod's environment carries so the hctl image's start script keeps the lease
    from the first second (see `images/start.sh`); {} when the provider keeps it itself."""
    command = provider.self_stop_command(lease.action)
    if provider.capabilities.lease or command is None:
        return {}
    return {
        "HCTL_LEASE_UNTIL": f"{lease.until.timestamp():.0f}",
        "HCTL_LEASE_COMMAND": command,
        "HCTL_LEASE_EXTEND_S": f"{extend_s:.0f}",
        "HCTL_LEASE_FILE": f"{volume_path.rstrip('/')}/hctl/{LEASE_FILE}",
    }


def arm(
    remote: Remote,
    provider: Provider,
    lease: PodLease,
    base_dir: str,
    *,
    watch: list[str] | None = None,
    extend_s: float = EXTEND_S,
    poll_s: float = WATCHDOG_POLL_S,
) -> str:
    """Write the lease on the pod (`<base_dir>/lease.json`) and make sure its watchdog runs.

    A watchdog already running (from boot, or an earlier job) reads the new lease on its next
    round; otherwise one is started in its own session, so it outlives this connection. Returns
    the lease file's path. Raises RemoteError when the watchdog cannot be started.
    """
    command = provider.self_stop_command(lease.action)
    if command is None:
        raise RemoteError(f"The {provider.name} provider gives pods no way to stop themselves.")
    folder = shlex.quote(base_dir)
    lease_file = f"{base_dir}/{LEASE_FILE}"
    script = f"{base_dir}/{WATCHDOG_FILE}"
    pid_file = shlex.quote(f"{base_dir}/watchdog.pid")
    document = {"until": lease.until.timestamp(), "command": command, "extend_s": extend_s,
                "watch": list(watch or []), "poll_s": poll_s}  # fmt: skip
    # Written next to the lease and moved into place, so the watchdog never reads half a file.
    setup = (
        f"umask 077 && mkdir -p {folder} && "
        f"printf %s {shlex.quote(json.dumps(document))} > {shlex.quote(lease_file + '.new')} && "
        f"mv -f {shlex.quote(lease_file + '.new')} {shlex.quote(lease_file)} && "
        f"printf %s {shlex.quote(inspect.getsource(watchdog))} > {shlex.quote(script)} && "
        "if command -v setsid >/dev/null 2>&1; then S=setsid; else S=nohup; fi; "
        f"$S python3 {shlex.quote(script)} {shlex.quote(lease_file)} "
        ">/dev/null 2>&1 </dev/null & "
        f"for i in $(seq 100); do [ -s {pid_file} ] && break; sleep 0.1; done; test -s {pid_file}"
    )
    result = remote.run(setup, timeout=60)
    if result.exit_code != 0:
        raise RemoteError(
            f"Could not start the pod's lease watchdog on {remote.description}: "
            f"{result.output.strip()[-300:]}",
            "The pod has no deadline now: stop it yourself when done (`hctl stop-pod`).",
        )
    return lease_file


def keep_for_job(
    remote: Remote,
    provider: Provider,
    *,
    lease_until: float,
    action: LeaseAction,
    job_dir: str,
    now: float,
) -> str | None:
    """On a provider without deadlines, start the pod's watchdog for a job (before the long
    install), with the job's events as its sign of progress; what to tell the user, or None
    when the provider keeps the lease itself."""
    if not kept_by_pod(provider):
        return None
    # A job started again on its pod (a resume) has at least the minimum lease from now.
    until = datetime.fromtimestamp(max(lease_until, now + MINIMUM_LEASE_S), timezone.utc)
    base_dir = job_dir.rsplit("/jobs/", 1)[0]
    arm(remote, provider, PodLease(until=until, action=action), base_dir,
        watch=[f"{job_dir}/{EVENTS_FILE}"])  # fmt: skip
    return (
        f"the pod keeps its own lease: it {action}s itself at {until:%Y-%m-%d %H:%M} UTC, "
        "later while the job makes progress"
    )


def arm_over_ssh(pod: Pod, provider: Provider, lease: PodLease, settings: Settings) -> str:
    """`arm` on a reachable pod, through its SSH endpoints; the lease file's path."""
    from hctl.targets import connect_pod

    remote = connect_pod(pod, settings)
    try:
        return arm(remote, provider, lease, f"{settings.volume_path.rstrip('/')}/hctl")
    finally:
        remote.close()


def plan_text(provider: Provider, estimated_seconds: float) -> str:
    """What `hctl run` says about a new pod's lease before it asks."""
    length = format_duration(lease_seconds(estimated_seconds))
    if provider.capabilities.lease:
        return (
            f"A new pod gets a lease of {length} (RunPod terminates it then, whatever happens to "
            "this computer)."
        )
    return (
        f"A new pod gets a lease of {length} (it terminates itself then, whatever happens to "
        "this computer; later only while the job keeps making progress)."
    )


def describe(provider: Provider, lease: PodLease) -> str:
    """One line saying who stops the pod at the deadline."""
    action: LeaseAction = lease.action
    moment = f"{lease.until:%Y-%m-%d %H:%M} UTC"
    if provider.capabilities.lease:
        return f"RunPod {action}s it at {moment} at the latest."
    return (
        f"The pod {action}s itself at {moment} (later while a job on it makes progress): "
        "RunPod's REST API keeps no deadline, so a watchdog on the pod does, started at boot by "
        "the hctl image or by hctl as soon as it reaches the pod."
    )
