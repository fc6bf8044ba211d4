"""How the pod commands show pods and GPU types: the tables of `hctl gpus` and `hctl list-pods`,
a pod's plan before `hctl create-pod` creates it, and a pod's SSH endpoints once it is reachable.
"""

from __future__ import annotations

from hctl import pods as pod_service
from hctl.output import Cell, Column, print_line
from hctl.providers.base import GpuType, Pod, Provider
from hctl.services import lease


def money(value: float | None) -> str:
    """A price as the pod commands print it: dollars and cents, "-" where there is none."""
    return "-" if value is None else f"${value:.2f}"


def _uptime(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _endpoints(pod: Pod) -> str:
    lines = [
        f"{endpoint.kind}: {endpoint.user}@{endpoint.host} -p {endpoint.port}"
        for endpoint in pod.ssh
    ]
    return "\n".join(lines) or "-"


GPU_COLUMNS = [
    Column("GPU id", whole=True),
    Column("name"),
    Column("VRAM", justify="right"),
    Column("secure", justify="right"),
    Column("community", justify="right"),
    Column("spot", justify="right"),
    Column("stock"),
]
POD_COLUMNS = [
    Column("name", whole=True),
    Column("id", whole=True),
    Column("status"),
    Column("GPU"),
    Column("$/h", justify="right"),
    Column("uptime", justify="right"),
    Column("SSH", whole=True),
]


def gpu_rows(gpus: list[GpuType]) -> list[list[Cell]]:
    return [
        [
            gpu.id,
            gpu.display_name,
            f"{gpu.memory_gb} GB",
            money(gpu.price("SECURE")),
            money(gpu.price("COMMUNITY")),
            money(gpu.price("ALL", spot=True)),
            gpu.stock or "none",
        ]
        for gpu in gpus
    ]


def pod_rows(pods: list[Pod]) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for pod in pods:
        gpu = f"{pod.gpu_count}x {pod.gpu_display_name or pod.gpu_type_id or '?'}"
        rows.append(
            [
                pod.name,
                pod.id,
                str(pod.status),
                gpu + (" spot" if pod.spot else ""),
                money(pod.cost_per_hr),
                _uptime(pod.uptime_seconds),
                _endpoints(pod),
            ]
        )
    return rows


def describe_plan(plan: pod_service.PodPlan, provider: Provider) -> None:
    spec = plan.spec
    print_line(
        f"{spec.name}: {spec.gpu_count}x {plan.gpu.display_name} ({'any' if spec.cloud_type == 'ALL' else spec.cloud_type.lower()} cloud"
        f"{', spot' if spec.spot else ''}), {spec.image}, {spec.container_disk_gb} GB disk + "
        + (
            f"{spec.volume_gb} GB volume at {spec.volume_mount_path}"
            if spec.volume_gb
            else "no volume"
        )
    )
    if spec.lease is not None:
        print_line(lease.describe(provider, spec.lease))
    for note in plan.notes:
        print_line(note)
    print_line(
        f"Price: {money(plan.price_per_hour)}/h for the GPU"
        f" + about {money(plan.storage_per_hour)}/h for the disks."
    )


def describe_ready(pod: Pod) -> None:
    print_line(f"{pod.name} ({pod.id}) is reachable.", style="green")
    print_line(_endpoints(pod))
