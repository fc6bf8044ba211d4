"""Pods, below the command line: finding one, planning and creating one, waiting until it answers.

Provider-independent: everything here works through the `Provider` protocol, so the run command,
the remote layer and the pod commands share it, and tests can drive it with any provider.
"""

from __future__ import annotations

import difflib
import re
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel

from hctl.errors import ConfigError, PodNotFoundError, PodNotReadyError, UnknownGpuError
from hctl.providers.base import CloudType, GpuType, Pod, PodSpec, Provider
from hctl.settings import Settings

HCTL_POD_PREFIX = "hctl-"
STOPPED_STATUSES = ("EXITED", "PAUSED", "DEAD", "TERMINATED")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PORT_ENTRY = re.compile(r"^(\d{1,5})/(tcp|http)$")


def is_hctl_pod(pod: Pod) -> bool:
    return pod.name.startswith(HCTL_POD_PREFIX)


# --- GPU types ---------------------------------------------------------------------------------


def find_gpu_type(catalogue: list[GpuType], query: str) -> GpuType:
    """The GPU type whose id is `query` (any case); otherwise UnknownGpuError with close matches.

    Only ids are accepted: RunPod's display names ("RTX 4090") and near-misses ("NVIDIA RTX
    4090") are what RunPod itself answers with a misleading "no instances available".
    """
    wanted = query.strip().lower()
    for gpu in catalogue:
        if gpu.id.lower() == wanted:
            return gpu
    matches = suggest_gpu_types(catalogue, query)
    if matches:
        hint = "Did you mean " + " or ".join(f'"{gpu.id}"' for gpu in matches) + "?"
        hint += " `hctl gpus` lists them all."
    else:
        hint = "Run `hctl gpus` to list the GPU types and their ids."
    raise UnknownGpuError(f"RunPod has no GPU type with the id {query!r}.", hint)


def suggest_gpu_types(catalogue: list[GpuType], query: str, limit: int = 3) -> list[GpuType]:
    """The GPU types closest to `query`, compared with both their ids and display names."""
    wanted = query.strip().lower()
    exact = [gpu for gpu in catalogue if gpu.display_name.lower() == wanted]
    if exact:
        return exact[:limit]

    def closeness(gpu: GpuType) -> float:
        names = (gpu.id.lower(), gpu.display_name.lower())
        score = max(difflib.SequenceMatcher(None, wanted, name).ratio() for name in names)
        if wanted and any(wanted in name or name in wanted for name in names):
            score += 0.5  # "4090" or "rtx 4090" is contained in the full name
        return score

    scored = sorted(((closeness(gpu), gpu) for gpu in catalogue), key=lambda pair: -pair[0])
    return [gpu for score, gpu in scored if score >= 0.6][:limit]


# --- finding a pod -----------------------------------------------------------------------------


def resolve_pod(
    provider: Provider, ref: str | None, *, status: Literal["RUNNING", "STOPPED"] = "RUNNING"
) -> Pod:
    """The pod `ref` names (an id, else a name); with no `ref`, the only hctl pod in `status`.

    `status` only matters without `ref`: "RUNNING" for commands that need a live pod, "STOPPED"
    for `start-pod`.
    """
    pods = provider.list()
    if ref:
        by_id = [pod for pod in pods if pod.id == ref]
        by_name = [pod for pod in pods if pod.name == ref]
        if by_id:
            return by_id[0]
        if len(by_name) == 1:
            return by_name[0]
        if len(by_name) > 1:
            raise ConfigError(
                f"{len(by_name)} pods are named {ref!r}: {_listing(by_name)}.",
                "Name the pod by its id instead.",
            )
        raise PodNotFoundError(f"No pod with the id or name {ref!r}.", _known_pods_hint(pods))
    wanted = [
        pod
        for pod in pods
        if is_hctl_pod(pod)
        and ((pod.status == "RUNNING") if status == "RUNNING" else pod.status in STOPPED_STATUSES)
    ]
    state = "running" if status == "RUNNING" else "stopped"
    if len(wanted) == 1:
        return wanted[0]
    if not wanted:
        raise PodNotFoundError(f"There is no {state} hctl pod.", _known_pods_hint(pods))
    raise ConfigError(
        f"There are {len(wanted)} {state} hctl pods: {_listing(wanted)}.",
        "Say which one: give its id or name.",
    )


def _listing(pods: list[Pod]) -> str:
    return ", ".join(f"{pod.name} ({pod.id}, {pod.status})" for pod in pods)


def _known_pods_hint(pods: list[Pod]) -> str:
    if not pods:
        return "You have no pods; `hctl create-pod` makes one."
    return f"Your pods: {_listing(pods)}."


# --- waiting -----------------------------------------------------------------------------------


def wait_until_ready(
    provider: Provider,
    pod_id: str,
    *,
    timeout_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_poll: Callable[[Pod, float], None] | None = None,
    interval_s: float = 5.0,
) -> Pod:
    """Poll until the pod is reachable (runtime up, port 22 mapped); return it, fresh.

    The pod is read anew on every poll, so its SSH endpoints are the current ones (a resumed pod
    has new public ports). `on_poll(pod, elapsed_s)` sees every reading (for a spinner). On
    timeout this raises PodNotReadyError and leaves the pod alone: the caller decides whether to
    terminate it.
    """
    started = clock()
    while True:
        pod = provider.get(pod_id)
        elapsed = clock() - started
        if on_poll is not None:
            on_poll(pod, elapsed)
        if pod.ready:
            return pod
        if pod.status in STOPPED_STATUSES:
            raise PodNotReadyError(
                f"Pod {pod.name} ({pod.id}) is {pod.status}, so it will not become reachable.",
                f"Start it with `hctl start-pod {pod.id}`.",
            )
        if elapsed >= timeout_s:
            raise PodNotReadyError(
                f"Pod {pod.name} ({pod.id}) was not reachable after {elapsed:.0f} s "
                "(RunPod has not reported its SSH port yet); it is still billing.",
                "A large image may still be downloading: check `hctl list-pods` later, or stop "
                f"paying for it with `hctl terminate-pod {pod.id}`.",
            )
        sleep(max(0.0, min(interval_s, timeout_s - elapsed)))


# --- planning and creating ---------------------------------------------------------------------


class PodPlan(BaseModel):
    """A pod about to be created, with what it will cost."""

    spec: PodSpec
    gpu: GpuType
    price_per_hour: float  # for the whole pod, before storage

    @property
    def storage_per_hour(self) -> float:
        """Disk costs while running: $0.10 per GB-month for container disk and volume."""
        return (self.spec.container_disk_gb + self.spec.volume_gb) * 0.10 / 730


def parse_env(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings into a dict; anything else is a ConfigError naming the bad item."""
    env: dict[str, str] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not ENV_NAME.match(key):
            raise ConfigError(
                f"--env {item!r} is not KEY=VALUE with KEY made of letters, digits and _.",
                "Write it like --env HF_TOKEN=hf_xxx (repeat --env for several).",
            )
        env[key] = value
    return env


def parse_ports(text: str) -> list[str]:
    """`22/tcp,8888/http` into a list, checked; RunPod wants `<port>/<tcp|http>` entries."""
    ports = [entry.strip() for entry in text.split(",") if entry.strip()]
    for entry in ports:
        match = PORT_ENTRY.match(entry)
        if not match or not 1 <= int(match.group(1)) <= 65535:
            raise ConfigError(
                f"Port {entry!r} is not PORT/tcp or PORT/http.",
                "Write ports like --ports 22/tcp,8888/http.",
            )
    if "22/tcp" not in ports:
        ports.insert(0, "22/tcp")  # hctl reaches pods over SSH; without it only the proxy works
    return ports


def new_pod_name(name: str | None = None) -> str:
    """A unique hctl pod name: `hctl-<name or random>`; unique names make creates safe to repeat."""
    if name is None:
        return f"{HCTL_POD_PREFIX}{secrets.token_hex(4)}"
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", name):
        raise ConfigError(
            f"Pod name {name!r} is not allowed.",
            "Use up to 63 letters, digits, '.', '_' or '-', starting with a letter or digit.",
        )
    return name if name.startswith(HCTL_POD_PREFIX) else HCTL_POD_PREFIX + name


def plan_pod(
    provider: Provider,
    settings: Settings,
    *,
    gpu: str | None = None,
    image: str | None = None,
    container_disk_gb: int | None = None,
    volume_gb: int | None = None,
    cloud_type: CloudType | None = None,
    spot: bool = False,
    bid_per_gpu: float | None = None,
    name: str | None = None,
    env: dict[str, str] | None = None,
    ports: list[str] | None = None,
    max_hours: float | None = None,
    at_limit: Literal["stop", "terminate"] = "stop",
    public_key: str | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> PodPlan:
    """Check everything about a pod before anything is sent that could create (and bill) one."""
    container_disk_gb = (
        settings.container_disk_gb if container_disk_gb is None else container_disk_gb
    )
    volume_gb = settings.volume_gb if volume_gb is None else volume_gb
    cloud_type = cloud_type or settings.cloud_type
    if container_disk_gb < 10:
        raise ConfigError(
            f"Container disk {container_disk_gb} GB is too small.",
            "Use at least 10 GB (--container-disk 40 is the default).",
        )
    if volume_gb < 0:
        raise ConfigError(f"Volume {volume_gb} GB is negative.", "Use 0 for no volume.")
    if max_hours is not None and max_hours <= 0:
        raise ConfigError(f"--max-hours {max_hours:g} must be more than 0.", "E.g. --max-hours 4.")
    if spot and (bid_per_gpu is None or bid_per_gpu <= 0):
        raise ConfigError(
            "A spot pod needs a bid: --bid USD (per GPU-hour).",
            "`hctl gpus` shows the spot prices; bid at least that.",
        )
    if bid_per_gpu is not None and not spot:
        raise ConfigError("--bid only applies to spot pods.", "Add --spot, or drop --bid.")
    catalogue = provider.gpu_types()
    gpu_type = find_gpu_type(catalogue, gpu or settings.gpu)
    unit_price = bid_per_gpu if spot else gpu_type.price(cloud_type)
    if unit_price is None:
        where = {"SECURE": "secure cloud", "COMMUNITY": "community cloud"}.get(cloud_type, "RunPod")
        raise UnknownGpuError(
            f"{gpu_type.display_name} is not offered on demand in {where}.",
            "Try another --cloud, or another GPU (`hctl gpus`).",
        )
    names_in_use = {pod.name for pod in provider.list()}
    pod_name = new_pod_name(name)
    if pod_name in names_in_use:
        raise ConfigError(
            f"A pod named {pod_name!r} exists already.",
            "Choose another --name (hctl needs unique names to never create a pod twice).",
        )
    full_env = {
        "HF_HOME": f"{settings.volume_path}/.cache/huggingface",
        "PIP_CACHE_DIR": f"{settings.volume_path}/.cache/pip",
        **(env or {}),
    }
    if public_key:
        full_env["PUBLIC_KEY"] = public_key
    lease = now() + timedelta(hours=max_hours) if max_hours else None
    spec = PodSpec(
        name=pod_name,
        gpu_type_id=gpu_type.id,
        image=image or settings.image,
        container_disk_gb=container_disk_gb,
        volume_gb=volume_gb,
        volume_mount_path=settings.volume_path,
        ports=ports or ["22/tcp"],
        env=full_env,
        cloud_type=cloud_type,
        spot=spot,
        bid_per_gpu=bid_per_gpu,
        terminate_after=lease if at_limit == "terminate" else None,
        stop_after=lease if at_limit == "stop" else None,
    )
    return PodPlan(spec=spec, gpu=gpu_type, price_per_hour=unit_price * spec.gpu_count)


def create_pod(provider: Provider, plan: PodPlan) -> Pod:
    """Create the planned pod; the provider guarantees a lost answer does not create two."""
    return provider.create(plan.spec)


def select_gpu_types(
    catalogue: list[GpuType],
    *,
    min_vram_gb: int | None = None,
    max_price: float | None = None,
    in_stock: bool = False,
    cloud_type: CloudType = "ALL",
    spot: bool = False,
) -> list[GpuType]:
    """The GPU types that pass the filters, cheapest first (those not offered last)."""
    chosen = [
        gpu
        for gpu in catalogue
        if (min_vram_gb is None or gpu.memory_gb >= min_vram_gb)
        and (not in_stock or gpu.stock_status)
        and (max_price is None or (gpu.price(cloud_type, spot) or float("inf")) <= max_price)
    ]
    return sorted(
        chosen,
        key=lambda gpu: (
            gpu.price(cloud_type, spot) is None,
            gpu.price(cloud_type, spot) or 0,
            gpu.id,
        ),
    )
