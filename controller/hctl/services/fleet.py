"""A job on several pods (`hctl run MODEL --pods N [--gpus K]`): one search, one study.

The pods share the study through Optuna's `RDBStorage` on a PostgreSQL server that hctl starts
on the first pod (`database`, `fleet_launch`), with its data on that pod's volume. Each pod has
its own job directory (`<volume>/hctl/jobs/<job id>-pod<K>`, different names, so pods that share
a network volume do not share one) for its workers' events and log; the controller follows every
pod and merges their events into one view (`fleet_follow`).

How the other pods reach the database is decided here, before anything is rented:

- `private`: RunPod's private network between pods (REST v2 `globalNetworking`); the first pod
  also exposes the database's TCP port publicly, for a pod placed in a data centre that has no
  private network (it then gets a public address and port from RunPod);
- `public`: the first pod's public TCP port (a provider without a private network, e.g. the
  GraphQL API): created with that port exposed, RunPod maps it to a public port read back from
  the pod.

The database takes passwords only (scram-sha-256), one per job, 48 random hex characters.

A job record lists every pod (`JobRecord.members`); `pod_view` gives one pod's view of it, a
record of the kind a one-pod job has, so starting, stopping, following and releasing one pod use
the same code as a one-pod job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hctl.errors import ConfigError, JobError
from hctl.providers.base import Pod, Provider
from hctl.services.jobs import JobRecord, PodMember
from hctl.services.request import RunRequest

Network = Literal["private", "public"]


@dataclass(frozen=True)
class FleetPlan:
    """The pods of a job and how they reach the database on the first one."""

    pods: int
    network: Network
    database_port: int

    @property
    def note(self) -> str:
        if self.network == "private":
            return (
                f"the study is in PostgreSQL on pod 1; the other pods reach it over RunPod's "
                f"private network (globalNetworking), or, placed where that is not offered, at "
                f"pod 1's public TCP port {self.database_port}"
            )
        return (
            f"the study is in PostgreSQL on pod 1; the other pods reach it at pod 1's public "
            f"TCP port {self.database_port} (this provider has no private network between pods)"
        )

    @property
    def ports(self) -> list[str]:
        """The first pod's ports: SSH and the database."""
        return ["22/tcp", f"{self.database_port}/tcp"]


def plan_fleet(request: RunRequest, provider: Provider, database_port: int) -> FleetPlan | None:
    """The several-pod plan of a `--pods N` request (None for one pod); raises when the
    provider's pods cannot reach each other."""
    if (request.pods or 1) == 1:
        return None
    capabilities = provider.capabilities
    if capabilities.private_network:
        network: Network = "private"
    elif capabilities.public_tcp_ports:
        network = "public"
    else:
        raise ConfigError(
            f"--pods {request.pods}: the {provider.name} provider's pods cannot reach each "
            "other (no private network and no public TCP ports), so they cannot share a study.",
            "Use one pod with several GPUs instead: --gpus K (one worker per GPU).",
        )
    return FleetPlan(pods=request.pods or 1, network=network, database_port=database_port)


def job_dir_name(job_id: str, index: int) -> str:
    """Pod K's job directory under `<base>/jobs/`."""
    return f"{job_id}-pod{index + 1}"


def pod_view(record: JobRecord, member: PodMember) -> JobRecord:
    """One pod of a several-pod job, as a one-pod job record (not saved)."""
    return record.model_copy(
        update={
            "pod_id": member.pod_id,
            "pod_ids": [member.pod_id],
            "remote_job_dir": member.remote_job_dir,
            "price_per_hour": member.price_per_hour,
            "members": [],
        }
    )


def pod_views(record: JobRecord, *, with_lost: bool = False) -> list[JobRecord]:
    """Every pod of the job as its own record (one for a one-pod job)."""
    if not record.members:
        return [record]
    return [pod_view(record, member) for member in record.members if with_lost or not member.lost]


def database_address(first: Pod, pod: Pod, port: int) -> tuple[str, int, str]:
    """Where `pod`'s workers reach the database on `first`: host, port, and how (words)."""
    if pod.id == first.id:
        return "127.0.0.1", port, "on this pod"
    if first.private_ip and pod.private_ip:
        return first.private_ip, port, "over the private network"
    mapped = first.public_port(port)
    if mapped is None:
        raise JobError(
            f"Pod {pod.id} cannot reach the database: pod {first.id} has no private network "
            f"address for it and no public mapping of port {port}.",
            "Try again (RunPod places pods anew), or use one pod with --gpus K.",
        )
    return mapped.host, mapped.port, "at pod 1's public port"
