"""The provider boundary: the models that cross it and the protocol a provider implements.

These speak no vendor. A pod's status is one of `PodStatus`, prices are `PriceOffer`s (a cloud
tier, on demand or spot, a price per GPU-hour, its stock), and what a pod runs to stop itself
comes from the provider (`Provider.self_stop_command`). Nothing outside a provider's own package
knows which API it talks to (RunPod REST v2, or RunPod GraphQL until it retires).
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Literal, Protocol

from pydantic import BaseModel, Field

CloudType = Literal["SECURE", "COMMUNITY", "ALL"]
Stock = Literal["high", "medium", "low"]  # None where a type is used: nothing free
LeaseAction = Literal["stop", "terminate"]
STOCK_RANK: dict[str | None, int] = {"high": 3, "medium": 2, "low": 1, None: 0}


class PodStatus(str, Enum):
    """Where a pod is in its life, whatever the provider calls it."""

    STARTING = "starting"  # placed or being placed, its container not up yet: it bills
    RUNNING = "running"  # its container is up
    STOPPED = "stopped"  # compute released, the volume kept: it can start again
    FAILED = "failed"  # its container is in an error state
    TERMINATED = "terminated"  # gone for good

    def __str__(self) -> str:
        return self.value


class PriceOffer(BaseModel):
    """One way to rent a GPU type: in which cloud tier, on demand or spot, at what price."""

    cloud: Literal["SECURE", "COMMUNITY"]
    spot: bool = False
    price_per_gpu_hour: float
    stock: Stock | None = None  # None: none free now (or unknown)


class GpuType(BaseModel):
    """One GPU type of the catalogue and the offers to rent it."""

    id: str  # what a pod spec takes, e.g. "NVIDIA GeForce RTX 4090"
    display_name: str  # e.g. "RTX 4090"
    memory_gb: int
    offers: list[PriceOffer] = Field(default_factory=list)
    max_gpu_count: int | None = None
    cuda_versions: list[str] = Field(default_factory=list)  # hosts' CUDA versions; [] = unknown

    def offer(self, cloud_type: CloudType = "ALL", spot: bool = False) -> PriceOffer | None:
        """The offer a new pod gets: the cheapest in stock in that cloud (or either), else the
        cheapest at all; None when the type is not offered that way."""
        offers = [
            offer
            for offer in self.offers
            if offer.spot == spot and cloud_type in ("ALL", offer.cloud)
        ]
        if not offers:
            return None
        in_stock = [offer for offer in offers if offer.stock is not None]
        return min(in_stock or offers, key=lambda offer: offer.price_per_gpu_hour)

    def price(self, cloud_type: CloudType = "ALL", spot: bool = False) -> float | None:
        """The price per GPU-hour of `offer(cloud_type, spot)`; None when not offered."""
        offer = self.offer(cloud_type, spot)
        return offer.price_per_gpu_hour if offer is not None else None

    @property
    def stock(self) -> Stock | None:
        """The best stock of its on-demand offers; None when nothing is free."""
        levels = [offer.stock for offer in self.offers if not offer.spot]
        return max(levels, key=STOCK_RANK.__getitem__, default=None)


class PodLease(BaseModel):
    """A deadline for a pod: at `until` it is stopped or terminated, whatever else happens."""

    until: datetime  # timezone-aware
    action: LeaseAction = "stop"


class PodSpec(BaseModel):
    """What to create. `cloud_type` is a concrete tier once planned (see `hctl.pods.plan_pod`)."""

    name: str
    gpu_type_id: str
    gpu_count: int = 1
    image: str
    container_disk_gb: int = 40
    volume_gb: int = 50
    volume_mount_path: str = "/workspace"
    ports: list[str] = Field(default_factory=lambda: ["22/tcp"])
    env: dict[str, str] = Field(default_factory=dict)
    cloud_type: CloudType = "ALL"
    spot: bool = False
    bid_per_gpu: float | None = None  # spot only
    support_public_ip: bool = True
    start_ssh: bool = True
    allowed_cuda_versions: list[str] = Field(default_factory=list)  # [] = any host
    global_networking: bool = False  # a private network between the account's pods
    lease: PodLease | None = None  # enforced by the provider when it can (see Capabilities)


class SshEndpoint(BaseModel):
    """One way to reach a pod over SSH."""

    kind: Literal["proxy", "direct"]
    user: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"


class PortMapping(BaseModel):
    """A pod's TCP port as reached from outside: `private` inside the pod is `host:port`."""

    private: int
    host: str
    port: int


class GpuUse(BaseModel):
    """How busy one of a pod's GPUs is, as the provider reports it (no SSH needed)."""

    utilisation_percent: int | None = None
    memory_percent: int | None = None


class Pod(BaseModel):
    """A pod as hctl sees it."""

    id: str
    name: str
    status: PodStatus
    gpu_type_id: str | None = None
    gpu_display_name: str | None = None
    gpu_count: int = 1
    cost_per_hr: float = 0.0
    cloud: str | None = None  # the tier it landed in, when the provider says
    image: str = ""
    container_disk_gb: int | None = None
    volume_gb: float | None = None
    volume_mount_path: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    uptime_seconds: int | None = None
    ready: bool = False  # running, with its SSH port mapped
    ssh: list[SshEndpoint] = Field(default_factory=list)
    gpus: list[GpuUse] = Field(default_factory=list)  # empty until the provider reports them
    public_ports: list[PortMapping] = Field(
        default_factory=list
    )  # TCP ports mapped to the internet
    private_ip: str | None = None  # its address on the private network between pods, if any
    spot: bool = False
    created_at: datetime | None = None

    @property
    def active(self) -> bool:
        """Starting or running: it holds (and bills for) its GPUs."""
        return self.status in (PodStatus.STARTING, PodStatus.RUNNING)

    @property
    def stopped(self) -> bool:
        return self.status in (PodStatus.STOPPED, PodStatus.FAILED)

    def endpoint(self, kind: Literal["proxy", "direct"]) -> SshEndpoint | None:
        return next((endpoint for endpoint in self.ssh if endpoint.kind == kind), None)

    def public_port(self, private: int) -> PortMapping | None:
        return next((mapping for mapping in self.public_ports if mapping.private == private), None)


class Capabilities(BaseModel):
    """What a provider can do beyond the protocol's basics, and how to say what it cannot."""

    spot: bool = False
    lease: bool = False  # it enforces `PodSpec.lease` itself (else the pod must: hctl.watchdog)
    billing: bool = False  # it reports what each pod was really billed
    spot_note: str = ""  # said whenever a spot pod is planned (e.g. the API it depends on)
    no_spot_hint: str = ""  # the hint when spot is asked of a provider without it
    # How the pods of one job can reach each other (a database on the first, see `fleet`):
    private_network: bool = False  # a private network between the account's pods
    public_tcp_ports: bool = False  # a pod's TCP ports exposed on a public address


class Provider(Protocol):
    """Where machines come from. Every method raises `hctl.errors.ProviderError` subclasses."""

    name: str
    capabilities: Capabilities

    def gpu_types(self) -> list[GpuType]: ...

    def create(self, spec: PodSpec) -> Pod: ...

    def get(self, pod_id: str) -> Pod: ...  # raises PodNotFoundError

    def list(self) -> list[Pod]: ...

    def start(self, pod_id: str) -> Pod: ...

    def stop(self, pod_id: str) -> Pod: ...

    def terminate(self, pod_id: str) -> None: ...

    def self_stop_command(self, action: LeaseAction) -> str | None:
        """A POSIX shell command that, run on one of this provider's pods, stops (or terminates)
        that pod with the pod's own identity and credentials; None when there is no such way."""
        ...

    def billed(self, pod_ids: list[str], since: datetime) -> dict[str, float] | None:
        """USD billed for each of these pods since `since` (terminated ones included); None
        when the provider cannot tell."""
        ...
