"""Pods, below the command line: finding one, planning and creating one, waiting until it answers,
saying what a failed stop or terminate left running.

Provider-independent: everything here works through the `Provider` protocol, so the run command,
the remote layer and the pod commands share it, and tests can drive it with any provider.
`plan_pod` checks everything before anything is sent, and prices the pod in the cloud tier it
will land in (the quote is what the pod costs, not the cheapest price anywhere).
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, Field

from hctl.errors import (
    ConfigError,
    PodNotFoundError,
    PodNotReadyError,
    ProviderError,
    UnknownGpuError,
)
from hctl.gpus import required_cuda_versions, resolve_gpu
from hctl.providers.base import (
    CloudType,
    GpuType,
    LeaseAction,
    Pod,
    PodLease,
    PodSpec,
    PodStatus,
    PriceOffer,
    Provider,
)
from hctl.services.lease import lease_environment
from hctl.settings import DEFAULT_IMAGE, MAX_CONTAINER_DISK_GB, MAX_VOLUME_GB, Settings

HCTL_POD_PREFIX = "hctl-"
MIN_VOLUME_GB = 10  # RunPod's floor for a pod volume
MAX_LEASE_HOURS = 24 * 30
MAX_BID_PER_GPU = 100.0
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PORT_ENTRY = re.compile(r"^(\d{1,5})/(tcp|http)$")


def is_hctl_pod(pod: Pod) -> bool:
    return pod.name.startswith(HCTL_POD_PREFIX)


# --- finding a pod -----------------------------------------------------------------------------


def resolve_pod(
    provider: Provider, ref: str | None, *, status: Literal["running", "stopped"] = "running"
) -> Pod:
    """The pod `ref` names (an id, else a name); with no `ref`, the only hctl pod in `status`.

    `status` only matters without `ref`: "running" (starting or running) for commands that need
    a live pod, "stopped" for `start-pod`.
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
        if is_hctl_pod(pod) and (pod.active if status == "running" else pod.stopped)
    ]
    state = status
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
        if not pod.active:
            raise PodNotReadyError(
                f"Pod {pod.name} ({pod.id}) is {pod.status}, so it will not become reachable.",
                f"Start it with `hctl start-pod {pod.id}`."
                if pod.status != PodStatus.TERMINATED
                else "Create a new one with `hctl create-pod`.",
            )
        if elapsed >= timeout_s:
            raise PodNotReadyError(
                f"Pod {pod.name} ({pod.id}) was not reachable after {elapsed:.0f} s "
                "(its SSH port is not mapped yet); it is still billing.",
                "A large image may still be downloading: check `hctl list-pods` later, or stop "
                f"paying for it with `hctl terminate-pod {pod.id}`.",
            )
        sleep(max(0.0, min(interval_s, timeout_s - elapsed)))


# --- planning and creating ---------------------------------------------------------------------


class PodPlan(BaseModel):
    """A pod about to be created, with what it will cost and what to tell about it."""

    spec: PodSpec
    gpu: GpuType
    offer: PriceOffer | None = None  # on demand: the offer the quote comes from
    price_per_hour: float  # for the whole pod, before storage
    notes: list[str] = Field(default_factory=list)  # said before the user confirms

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


def check_sizes(
    *,
    container_disk_gb: int,
    volume_gb: int,
    max_hours: float | None = None,
    bid_per_gpu: float | None = None,
    spot: bool = False,
) -> None:
    """Refuse values no one means (a negative disk, 99999999 GB, a NaN bid) before any request."""
    for value in (max_hours, bid_per_gpu):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{value} is not a number.", "Give a plain number, e.g. 4.")
    if not 10 <= container_disk_gb <= MAX_CONTAINER_DISK_GB:
        raise ConfigError(
            f"Container disk {container_disk_gb} GB is "
            + ("too small." if container_disk_gb < 10 else "more than anyone means."),
            f"Use 10 to {MAX_CONTAINER_DISK_GB} GB (--container-disk 40 is the default).",
        )
    if volume_gb < 0:
        raise ConfigError(f"Volume {volume_gb} GB is negative.", "Use 0 for no volume.")
    if volume_gb and not MIN_VOLUME_GB <= volume_gb <= MAX_VOLUME_GB:
        raise ConfigError(
            f"Volume {volume_gb} GB is out of range.",
            f"Use 0 for no volume, or {MIN_VOLUME_GB} to {MAX_VOLUME_GB} GB.",
        )
    if max_hours is not None and not (0 < max_hours <= MAX_LEASE_HOURS):
        raise ConfigError(
            f"--max-hours {max_hours:g} must be more than 0 and at most {MAX_LEASE_HOURS}.",
            "E.g. --max-hours 4.",
        )
    if spot and (bid_per_gpu is None or not 0 < bid_per_gpu <= MAX_BID_PER_GPU):
        raise ConfigError(
            "A spot pod needs a bid: --bid USD (per GPU-hour)."
            if bid_per_gpu is None
            else f"--bid {bid_per_gpu:g} is not a price per GPU-hour.",
            "`hctl gpus --spot` shows the spot prices; bid at least that.",
        )
    if bid_per_gpu is not None and not spot:
        raise ConfigError("--bid only applies to spot pods.", "Add --spot, or drop --bid.")


def plan_pod(
    provider: Provider,
    settings: Settings,
    *,
    gpu: str | None = None,
    gpu_count: int = 1,
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
    at_limit: LeaseAction = "stop",
    public_key: str | None = None,
    global_networking: bool = False,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> PodPlan:
    """Check everything about a pod before anything is sent that could create (and bill) one."""
    container_disk_gb = (
        settings.container_disk_gb if container_disk_gb is None else container_disk_gb
    )
    volume_gb = settings.volume_gb if volume_gb is None else volume_gb
    cloud_type = cloud_type or settings.cloud_type
    check_sizes(
        container_disk_gb=container_disk_gb, volume_gb=volume_gb, max_hours=max_hours,
        bid_per_gpu=bid_per_gpu, spot=spot,
    )  # fmt: skip
    if at_limit == "terminate" and max_hours is None:
        raise ConfigError(
            "--terminate-at-limit needs --max-hours: without a limit there is nothing to act on.",
            "Add --max-hours HOURS (e.g. --max-hours 4 --terminate-at-limit), or leave it out.",
        )
    if spot and not provider.capabilities.spot:
        raise ConfigError(
            f"The {provider.name} provider has no spot pods.", provider.capabilities.no_spot_hint
        )
    gpu_type = resolve_gpu(provider.gpu_types(), gpu or settings.gpu)
    offer = gpu_type.offer(cloud_type, spot=spot)
    if offer is None:
        where = {"SECURE": "secure cloud", "COMMUNITY": "community cloud"}.get(cloud_type, "RunPod")
        raise UnknownGpuError(
            f"{gpu_type.display_name} is not offered {'as spot' if spot else 'on demand'} in "
            f"{where}.",
            "Try another --cloud, or another GPU (`hctl gpus`).",
        )
    image = image or settings.image
    if not image.strip() or any(character.isspace() for character in image):
        raise ConfigError(
            f"{image!r} is not a container image.",
            f"Give one like --image {DEFAULT_IMAGE} (or leave out --image for the image setting).",
        )
    cuda = required_cuda_versions(image, gpu_type, settings.min_cuda_version)
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
    lease = (
        PodLease(until=now() + timedelta(hours=max_hours), action=at_limit) if max_hours else None
    )
    if lease is not None:
        full_env.update(lease_environment(provider, lease, settings.volume_path))
    spec = PodSpec(
        name=pod_name,
        gpu_type_id=gpu_type.id,
        gpu_count=gpu_count,
        image=image,
        container_disk_gb=container_disk_gb,
        volume_gb=volume_gb,
        volume_mount_path=settings.volume_path,
        ports=ports or ["22/tcp"],
        env=full_env,
        # The tier of the offer quoted, never "either": the pod must cost what was quoted.
        cloud_type=offer.cloud,
        spot=spot,
        bid_per_gpu=bid_per_gpu,
        allowed_cuda_versions=cuda,
        global_networking=global_networking,
        lease=lease,
    )
    unit_price = bid_per_gpu if spot and bid_per_gpu is not None else offer.price_per_gpu_hour
    notes = [provider.capabilities.spot_note] if spot and provider.capabilities.spot_note else []
    return PodPlan(
        spec=spec,
        gpu=gpu_type,
        offer=None if spot else offer,
        price_per_hour=unit_price * spec.gpu_count,
        notes=notes,
    )


def create_pod(provider: Provider, plan: PodPlan) -> Pod:
    """Create the planned pod; the provider guarantees a lost answer does not create two."""
    return provider.create(plan.spec)


def price_note(plan: PodPlan, pod: Pod) -> str | None:
    """What to say when the created pod costs other than quoted (None: it costs the quote)."""
    if not pod.cost_per_hr or abs(pod.cost_per_hr - plan.price_per_hour) < 0.005:
        return None
    return (
        f"note: RunPod bills this pod ${pod.cost_per_hr:.2f}/h, not the "
        f"${plan.price_per_hour:.2f}/h quoted."
    )


@contextmanager
def left_as_it_was_on_failure(target: Pod, action: LeaseAction) -> Iterator[None]:
    """A stop or terminate RunPod would not do leaves the pod as it was: say so, and what it
    goes on costing, not only that the API failed."""
    try:
        yield
    except PodNotFoundError:
        raise
    except ProviderError as error:
        billing = (
            f" and billing ${target.cost_per_hr:.2f}/h"
            if target.status in (PodStatus.RUNNING, PodStatus.STARTING)
            else ""
        )
        raise type(error)(
            f"Could not {action} {target.name} ({target.id}): {error.message} It is still "
            f"{target.status}{billing}.",
            f"{error.hint} Then run `hctl {action}-pod {target.id}` again.".strip(),
        ) from None
