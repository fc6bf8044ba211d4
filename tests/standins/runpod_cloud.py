"""The RunPod behind both emulated APIs: its pods, GPU catalogue, bills, account keys and faults.
(The HTTP server both front ends run on is `emulator_http.py`.)

`runpod_emulator.py` (GraphQL, executing RunPod's own schema) and `runpod_rest_emulator.py`
(REST v2, validated against RunPod's own OpenAPI document) are two views of one `RunPodCloud`,
so a test says the same thing to either: `inject_fault("capacity", operation="create")`,
`requests_for("create")`, `pods` (a snapshot of the pod table in one neutral shape).

Operations are named the same for both APIs: "gpus", "list", "get", "create", "stop", "start",
"terminate", "keys", "set_keys", "billing".

What RunPod does that this follows (`shared/reference/runpod-api.md`, the OpenAPI document):
a create places the pod on a host of the requested cloud (or either, on GraphQL's `ALL`:
secure first, when it has stock), and answers RunPod's capacity message when none is free, when
the GPU id is unknown, or when no host has an allowed CUDA version; a pod's `runtime` stays
empty for its first `ready_after_polls` reads; a stopped pod keeps its host and gets a new public
port when it starts; every pod carries a pod-scoped API key (RUNPOD_API_KEY on a real pod) that
may act on that pod only [emu: the scope is an assumption]; bills accrue per second while a pod
runs and outlive its termination. `elapse(seconds)` moves the emulated clock (bills, uptime).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

CAPACITY_MESSAGE = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)
SOMETHING_WENT_WRONG = "Something went wrong. Please try again later or contact support."
SPOT_AS_ON_DEMAND = "Cannot resume a spot pod as an on demand pod."
DEFAULT_API_KEY = "rpa_EMULATOR0TEST0KEY0000000000000000000000"

FaultKind = Literal[
    "unauthorized",  # HTTP 401
    "bad_request",  # HTTP 400 (GraphQL: a validation error; REST: a problem document)
    "rate_limited",  # HTTP 429 with Retry-After
    "server_error",  # HTTP 5xx (status given)
    "capacity",  # RunPod's "There are no longer any instances available..." refusal
    "something_went_wrong",  # GraphQL: INTERNAL_SERVER_ERROR 200; REST: a 500 problem
    "resolver_error",  # a refusal with the given `message` (GraphQL 200 errors; REST 400)
    "drop_after_apply",  # the operation is applied, then the connection closes unanswered
    "drop_before_apply",  # the connection closes before anything is applied
    "slow",  # RunPod works `delay_s` seconds before it applies the operation and answers
]


class CloudError(Exception):
    """A refusal of the emulated RunPod; each API front end answers it in its own envelope."""

    def __init__(self, kind: Literal["capacity", "not_found", "conflict", "invalid"], message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class CatalogueGpu:
    """One GPU type: prices per GPU-hour (None: not offered), stock per cloud, hosts' CUDA."""

    id: str
    display_name: str
    memory_gb: int
    secure_price: float | None
    community_price: float | None
    secure_spot_price: float | None
    community_spot_price: float | None
    stock: str | None = "High"  # secure cloud: "High" / "Medium" / "Low" / None (nothing free)
    max_gpu_count: int = 8
    community_stock: str | None | Literal["same"] = "same"
    cuda_versions: tuple[str, ...] = ("12.4", "12.6", "12.8", "12.9")

    def stock_in(self, cloud: str) -> str | None:
        if cloud == "COMMUNITY":
            stock = self.stock if self.community_stock == "same" else self.community_stock
            return stock if self.community_price else None
        return self.stock if self.secure_price else None

    def price_in(self, cloud: str, *, spot: bool = False) -> float | None:
        if cloud == "COMMUNITY":
            return self.community_spot_price if spot else self.community_price
        return self.secure_spot_price if spot else self.secure_price


def default_catalogue() -> list[CatalogueGpu]:
    """Ids, names and VRAM from RunPod's GPU list; prices from runpod-api.md §6 or plausible."""
    return [
        CatalogueGpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.44, 0.31, 0.29, 0.20, "High"),
        CatalogueGpu("NVIDIA GeForce RTX 3090", "RTX 3090", 24, 0.43, 0.22, 0.26, 0.16, "Medium"),
        CatalogueGpu("NVIDIA GeForce RTX 5090", "RTX 5090", 32, 0.89, 0.69, 0.55, 0.45, "Low"),
        CatalogueGpu(
            "NVIDIA RTX A4000",
            "RTX A4000",
            16,
            0.35,
            0.17,
            0.20,
            0.10,
            "High",
            cuda_versions=("11.8", "12.2", "12.4"),
        ),  # fmt: skip
        CatalogueGpu("NVIDIA RTX A6000", "RTX A6000", 48, 0.76, 0.49, 0.45, 0.25, "Low"),
        CatalogueGpu("NVIDIA L40S", "L40S", 48, 0.86, 0.79, 0.50, 0.45, "Medium"),
        CatalogueGpu("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.39, 1.19, 0.99, 0.82, None),
        CatalogueGpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.69, None, 1.75, None, None),
        CatalogueGpu("NVIDIA H100 PCIe", "H100 PCIe", 80, 2.39, 1.99, 1.60, 1.25, "Low"),
        # RunPod's GraphQL catalogue really contains this placeholder entry; clients skip it.
        CatalogueGpu("unknown", "unknown", 0, None, None, None, None, None, 0, cuda_versions=()),
    ]


@dataclass
class EmulatedPod:
    """One row of the pod table."""

    id: str
    name: str
    image: str
    gpu: CatalogueGpu
    gpu_count: int
    cloud: str  # SECURE or COMMUNITY: where it landed
    spot: bool
    cost_per_hr: float
    container_disk_gb: int
    volume_gb: int
    volume_mount_path: str
    ports: list[str]
    env: dict[str, str]
    host_suffix: str
    machine_id: str
    pod_key: str  # what RUNPOD_API_KEY holds on this pod
    cuda_version: str | None
    started_at: float  # the cloud's clock
    bid_per_gpu: float | None = None
    stop_after: str | None = None
    terminate_after: str | None = None
    allowed_cuda_versions: list[str] | None = None
    global_networking: bool = False
    docker_args: str = ""
    status: str = "RUNNING"  # RUNNING or EXITED (terminated pods leave the table)
    polls_until_ready: int = 0
    public_port: int = 17445
    public_ip: str = "213.173.108.12"
    direct_route: tuple[str, int] | None = None  # set by `route_ssh(each=...)`
    created_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    )

    def snapshot(self, host_id: str) -> dict[str, Any]:
        """The row as plain data, for tests to assert on (the same for both APIs)."""
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "imageName": self.image,
            "gpuTypeId": self.gpu.id,
            "gpuCount": self.gpu_count,
            "cloudType": self.cloud,
            "podType": "INTERRUPTABLE" if self.spot else "RESERVED",
            "costPerHr": self.cost_per_hr,
            "containerDiskInGb": self.container_disk_gb,
            "volumeInGb": self.volume_gb,
            "volumeMountPath": self.volume_mount_path,
            "ports": ",".join(self.ports),
            "env": dict(self.env),
            "bidPerGpu": self.bid_per_gpu,
            "stopAfter": self.stop_after,
            "terminateAfter": self.terminate_after,
            "allowedCudaVersions": self.allowed_cuda_versions,
            "cudaVersion": self.cuda_version,
            "globalNetworking": self.global_networking,
            "podHostId": host_id,
            "publicPort": self.public_port,
        }


@dataclass
class Fault:
    kind: FaultKind
    operation: str | None  # a neutral operation such as "create"; None: any
    times: int
    status: int = 500
    retry_after: float | None = None
    message: str = ""
    delay_s: float = 0.0


@dataclass
class RecordedRequest:
    """What one request asked for, for tests that check what was (not) sent."""

    operation: str  # neutral: "create", "list", ...
    api_operations: list[str]  # GraphQL root fields, or the REST operationId
    body: Any  # GraphQL variables, or the REST JSON body
    auth: str  # "bearer", "query", "pod" (a pod-scoped key), "none"
    query: str = ""  # GraphQL: the document; REST: METHOD /path?query
    status: int = 200

    @property
    def variables(self) -> Any:
        return self.body


class RunPodCloud:
    """The emulated account: pods, catalogue, bills, keys, faults. Thread-safe."""

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        ready_after_polls: int = 1,
        catalogue: list[CatalogueGpu] | None = None,
        pub_key: str = "",
    ) -> None:
        self.api_key = api_key
        self.ready_after_polls = ready_after_polls
        self.catalogue = catalogue if catalogue is not None else default_catalogue()
        self.pub_key = pub_key
        self.user_id = "user_2Xc9qEmulator"
        self.requests: list[RecordedRequest] = []
        self.lock = threading.RLock()
        self._pods: dict[str, EmulatedPod] = {}
        self._faults: list[Fault] = []
        self._ports = itertools.count(17445, 7)
        self._direct: tuple[str, int] | None = None
        self._each: list[tuple[str, int]] = []
        self._created = 0
        self._pod_host_id: str | None = None
        # The network between pods: a TCP port P other than 22 is public at the pod's address,
        # port P + `port_offset`; `globalNetworking` gives a pod `private_ip`, where the data
        # centre offers it (`global_networking_offered`).
        self.port_offset = 40000
        self.private_ip = "10.65.1.42"
        self.global_networking_offered = True
        self._offset_s = 0.0
        self._billed: dict[str, float] = {}  # pod id → USD up to its last status change
        self._billed_since: dict[str, float] = {}

    # --- what tests look at and set ---------------------------------------------------------

    @property
    def pods(self) -> list[dict[str, Any]]:
        """A snapshot of the pod table (terminated pods are gone), oldest first."""
        with self.lock:
            return [pod.snapshot(self.host_id(pod)) for pod in self._pods.values()]

    def pod(self, pod_id: str) -> dict[str, Any] | None:
        with self.lock:
            pod = self._pods.get(pod_id)
            return pod.snapshot(self.host_id(pod)) if pod else None

    def pod_key(self, pod_id: str) -> str:
        """The pod-scoped API key RunPod puts in the pod's RUNPOD_API_KEY."""
        return self._pods[pod_id].pod_key

    def requests_for(self, operation: str) -> list[RecordedRequest]:
        """The recorded requests for one operation ("create", ...) or API operation name."""
        return [
            request
            for request in self.requests
            if operation == request.operation or operation in request.api_operations
        ]

    def inject_fault(
        self,
        kind: FaultKind,
        *,
        operation: str | None = None,
        times: int = 1,
        status: int = 500,
        retry_after: float | None = None,
        message: str = "",
        delay_s: float = 0.0,
    ) -> None:
        """Make the next `times` requests (for `operation`, or any) fail this way."""
        with self.lock:
            self._faults.append(
                Fault(kind, operation, times, status, retry_after, message, delay_s)
            )

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def set_stock(self, gpu_id: str, stock: str | None, *, cloud: str | None = None) -> None:
        """A GPU type's stock ("High", "Medium", "Low", None: creates fail on capacity), in one
        cloud ("SECURE" / "COMMUNITY") or both."""
        with self.lock:
            gpu = self.gpu(gpu_id)
            assert gpu is not None, gpu_id
            if cloud in (None, "SECURE"):
                if cloud is None:
                    gpu.community_stock = "same"
                elif gpu.community_stock == "same":
                    gpu.community_stock = gpu.stock
                gpu.stock = stock
            if cloud == "COMMUNITY":
                gpu.community_stock = stock

    def route_ssh(
        self,
        *,
        direct: tuple[str, int] | None = None,
        pod_host_id: str | None = None,
        each: list[tuple[str, int]] | None = None,
    ) -> None:
        """Report SSH endpoints that lead somewhere real (e.g. a test sshd).

        `direct=(ip, port)`: every pod's port 22 maps to this public ip and port (also after a
        start). `each=[(ip, port), ...]`: the first pod created from now on maps to the first,
        the next to the second, and so on (round robin), for several stand-in pods.
        `pod_host_id`: every pod's proxy user name reads this. Applies to existing and future
        pods; None restores the default.
        """
        with self.lock:
            self._direct = direct
            self._pod_host_id = pod_host_id
            self._each = list(each or [])
            self._created = 0

    def add_pod(
        self,
        *,
        name: str,
        gpu_type_id: str = "NVIDIA GeForce RTX 4090",
        status: str = "RUNNING",
        ready: bool = True,
        env: dict[str, str] | None = None,
        spot: bool = False,
    ) -> dict[str, Any]:
        """Put a pod in the table directly (one created elsewhere, e.g. in RunPod's console)."""
        with self.lock:
            pod = self.create(
                {"name": name, "gpu_type_id": gpu_type_id, "cloud": "COMMUNITY",
                 "image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
                 "env": env or {}, "ports": ["22/tcp"], "spot": spot, "bid": 0.2 if spot else None},
                stock_checked=False,
            )  # fmt: skip
            if status != "RUNNING":
                self.stop(pod.id)
            pod.polls_until_ready = 0 if ready else self.ready_after_polls
            return pod.snapshot(self.host_id(pod))

    def elapse(self, seconds: float) -> None:
        """Let emulated time pass: running pods bill, uptimes grow."""
        with self.lock:
            self._offset_s += seconds

    def now(self) -> float:
        return time.monotonic() + self._offset_s

    # --- the account's behaviour (the front ends call these under `lock`) ------------------

    def gpu(self, gpu_id: str | None) -> CatalogueGpu | None:
        return next((gpu for gpu in self.catalogue if gpu.id == gpu_id), None)

    def host_id(self, pod: EmulatedPod) -> str:
        return self._pod_host_id or f"{pod.id}-{pod.host_suffix}"

    def direct_address(self, pod: EmulatedPod) -> tuple[str, int]:
        return pod.direct_route or self._direct or (pod.public_ip, pod.public_port)

    def find(self, pod_id: str) -> EmulatedPod | None:
        return self._pods.get(pod_id)

    def existing(self, pod_id: str) -> EmulatedPod:
        pod = self._pods.get(pod_id)
        if pod is None:
            raise CloudError("not_found", "pod not found")
        return pod

    def all_pods(self) -> list[EmulatedPod]:
        return list(self._pods.values())

    def key_scope(self, key: str | None) -> str | None:
        """What a key may act on: "*" (the account's key), one pod's id (that pod's own key,
        RUNPOD_API_KEY on the pod), or None (not a key of this account)."""
        if key == self.api_key:
            return "*"
        owner = next((pod for pod in self._pods.values() if pod.pod_key == key), None)
        return owner.id if owner is not None else None

    def take_fault(self, request: RecordedRequest) -> Fault | None:
        """The fault to apply to this request (its operation or API operation), used up."""
        names = {request.operation, *request.api_operations}
        for fault in self._faults:
            if fault.operation is None or fault.operation in names:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def create(self, given: dict[str, Any], *, stock_checked: bool = True) -> EmulatedPod:
        """Place a pod. `given`: name, image, gpu_type_id, gpu_count, cloud (SECURE, COMMUNITY,
        ALL), container_disk_gb, volume_gb, volume_mount_path, ports, env, spot, bid,
        stop_after, terminate_after, allowed_cuda_versions, min_cuda_version,
        global_networking, docker_args."""
        gpu = self.gpu(given.get("gpu_type_id"))
        if gpu is None or gpu.id == "unknown" or not given.get("image"):
            # RunPod answers an invalid GPU id with its capacity message (runpodctl PR #260).
            raise CloudError("capacity", CAPACITY_MESSAGE)
        cloud = given.get("cloud") or "SECURE"
        if cloud == "ALL":  # RunPod picks the host; secure first while it has stock
            cloud = "SECURE" if gpu.stock_in("SECURE") else "COMMUNITY"
        spot = bool(given.get("spot"))
        price = gpu.price_in(cloud, spot=spot)
        if stock_checked and (gpu.stock_in(cloud) is None or price is None):
            raise CloudError("capacity", CAPACITY_MESSAGE)
        host_cuda = _host_cuda(
            gpu, given.get("allowed_cuda_versions"), given.get("min_cuda_version")
        )
        if stock_checked and host_cuda is None:
            raise CloudError("capacity", CAPACITY_MESSAGE)
        if spot:
            bid = given.get("bid")
            if bid is None:
                raise CloudError("invalid", "bidPerGpu is required.")
            price = float(bid)
        count = int(given.get("gpu_count") or 1)
        pod_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(14))
        pod = EmulatedPod(
            id=pod_id,
            name=given.get("name") or pod_id,
            image=given["image"],
            gpu=gpu,
            gpu_count=count,
            cloud=cloud,
            spot=spot,
            cost_per_hr=round((price or 0.0) * count, 4),
            container_disk_gb=int(given.get("container_disk_gb") or 10),
            volume_gb=int(given.get("volume_gb") or 0),
            volume_mount_path=given.get("volume_mount_path") or "/workspace",
            ports=list(given.get("ports") or []),
            env=dict(given.get("env") or {}),
            host_suffix=secrets.token_hex(4),
            machine_id=secrets.token_hex(6),
            pod_key="rpa_POD_" + secrets.token_hex(16),
            cuda_version=host_cuda,
            started_at=self.now(),
            bid_per_gpu=float(given["bid"]) if spot and given.get("bid") is not None else None,
            stop_after=given.get("stop_after"),
            terminate_after=given.get("terminate_after"),
            allowed_cuda_versions=given.get("allowed_cuda_versions"),
            global_networking=bool(given.get("global_networking"))
            and self.global_networking_offered,
            docker_args=given.get("docker_args") or "",
            polls_until_ready=self.ready_after_polls,
            public_port=next(self._ports),
            direct_route=self._each[self._created % len(self._each)] if self._each else None,
        )
        self._created += 1
        self._pods[pod.id] = pod
        self._billed_since[pod.id] = pod.started_at
        self._billed.setdefault(pod.id, 0.0)
        return pod

    def stop(self, pod_id: str) -> EmulatedPod:
        pod = self.existing(pod_id)
        if pod.status == "RUNNING":
            self._accrue(pod)
            pod.status = "EXITED"
        return pod

    def start(self, pod_id: str, *, bid: float | None = None) -> EmulatedPod:
        pod = self.existing(pod_id)
        if pod.spot and bid is None:
            raise CloudError("invalid", SPOT_AS_ON_DEMAND)
        if pod.status != "RUNNING":
            pod.status = "RUNNING"
            pod.polls_until_ready = self.ready_after_polls
            pod.public_port = next(self._ports)  # a reset pod gets a new public TCP port
            pod.started_at = self.now()
            self._billed_since[pod.id] = pod.started_at
        if bid is not None:
            pod.bid_per_gpu = bid
            pod.cost_per_hr = round(bid * pod.gpu_count, 4)
        return pod

    def terminate(self, pod_id: str) -> None:
        pod = self.existing(pod_id)
        if pod.status == "RUNNING":
            self._accrue(pod)
        del self._pods[pod_id]

    def resume_bid(self, pod: EmulatedPod) -> float | None:
        """What a stopped spot pod must bid to run again: today's lowest spot price there."""
        if not pod.spot:
            return None
        return pod.gpu.price_in(pod.cloud, spot=True)

    def runtime_ready(self, pod: EmulatedPod, *, poll: bool) -> bool:
        """Whether the container is up: not while stopped, nor for `ready_after_polls` reads."""
        if pod.status != "RUNNING":
            return False
        if pod.polls_until_ready > 0:
            if poll:
                pod.polls_until_ready -= 1
            return False
        return True

    def uptime(self, pod: EmulatedPod) -> int:
        return int(self.now() - pod.started_at)

    def billed(self, pod_id: str) -> float:
        """USD billed for one pod so far (running time × its price; terminated pods keep it)."""
        amount = self._billed.get(pod_id, 0.0)
        pod = self._pods.get(pod_id)
        if pod is not None and pod.status == "RUNNING":
            amount += pod.cost_per_hr * (self.now() - self._billed_since[pod_id]) / 3600
        return amount

    def billed_pods(self) -> list[str]:
        return list(self._billed)

    def _accrue(self, pod: EmulatedPod) -> None:
        self._billed[pod.id] = self.billed(pod.id)
        self._billed_since[pod.id] = self.now()


def _host_cuda(gpu: CatalogueGpu, allowed: list[str] | None, minimum: str | None) -> str | None:
    """The newest host CUDA version that satisfies the constraint (exact set or a floor)."""

    def key(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split("."))

    versions = list(gpu.cuda_versions)
    if allowed:
        versions = [version for version in versions if version in allowed]
    if minimum:
        versions = [version for version in versions if key(version) >= key(minimum)]
    return max(versions, key=key) if versions else None
