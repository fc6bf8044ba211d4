"""The provider boundary: the models that cross it and the protocol a provider implements.

Nothing outside a provider's own package may know how it talks to its cloud (RunPod's GraphQL
API retires in 2027; REST v2 must be able to replace it behind this same protocol).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Protocol

from pydantic import BaseModel, Field

CloudType = Literal["SECURE", "COMMUNITY", "ALL"]


class GpuType(BaseModel):
    """One GPU type of the catalogue with its prices per GPU-hour (None: not offered that way)."""

    id: str  # what a pod spec takes, e.g. "NVIDIA GeForce RTX 4090"
    display_name: str  # e.g. "RTX 4090"
    memory_gb: int
    secure_price: float | None = None
    community_price: float | None = None
    secure_spot_price: float | None = None
    community_spot_price: float | None = None
    stock_status: str | None = None  # "High" / "Medium" / "Low" / None (none in stock)
    max_gpu_count: int | None = None

    def price(self, cloud_type: CloudType = "ALL", spot: bool = False) -> float | None:
        """The lowest price per GPU-hour for this cloud type, or None when not offered."""
        if spot:
            candidates = {
                "SECURE": [self.secure_spot_price],
                "COMMUNITY": [self.community_spot_price],
                "ALL": [self.secure_spot_price, self.community_spot_price],
            }[cloud_type]
        else:
            candidates = {
                "SECURE": [self.secure_price],
                "COMMUNITY": [self.community_price],
                "ALL": [self.secure_price, self.community_price],
            }[cloud_type]
        offered = [price for price in candidates if price]
        return min(offered) if offered else None


class PodSpec(BaseModel):
    """What to create."""

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
    terminate_after: datetime | None = None  # a lease: the provider terminates the pod then
    stop_after: datetime | None = None


class SshEndpoint(BaseModel):
    """One way to reach a pod over SSH."""

    kind: Literal["proxy", "direct"]
    user: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"


class Pod(BaseModel):
    """A pod as hctl sees it."""

    id: str
    name: str
    status: str  # CREATED RUNNING RESTARTING EXITED PAUSED DEAD TERMINATED
    gpu_type_id: str | None = None
    gpu_display_name: str | None = None
    gpu_count: int = 1
    cost_per_hr: float = 0.0
    image: str = ""
    container_disk_gb: int | None = None
    volume_gb: float | None = None
    volume_mount_path: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    pod_host_id: str | None = None  # the proxy's routing user, `<pod id>-<8 hex>`
    uptime_seconds: int | None = None
    ready: bool = False  # runtime present with port 22 mapped
    ssh: list[SshEndpoint] = Field(default_factory=list)
    spot: bool = False
    last_status_change: str | None = None

    def endpoint(self, kind: Literal["proxy", "direct"]) -> SshEndpoint | None:
        return next((endpoint for endpoint in self.ssh if endpoint.kind == kind), None)


class Provider(Protocol):
    """Where machines come from. Every method raises `hctl.errors.ProviderError` subclasses."""

    def gpu_types(self) -> list[GpuType]: ...

    def create(self, spec: PodSpec) -> Pod: ...

    def get(self, pod_id: str) -> Pod: ...  # raises PodNotFoundError

    def list(self) -> list[Pod]: ...

    def start(self, pod_id: str) -> Pod: ...

    def stop(self, pod_id: str) -> Pod: ...

    def terminate(self, pod_id: str) -> None: ...
