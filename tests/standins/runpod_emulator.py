"""A local stand-in for RunPod's GraphQL API: a real HTTP server executing a real schema.

It follows `shared/reference/runpod-api.md` (the API as RunPod's own clients use it):

- `POST /graphql` with `{"query": ..., "variables": ...}`; values may come as variables (as hctl and
  runpodctl send them) or as inline literals (as RunPod's Python SDK sends them).
- Authentication by `Authorization: Bearer <key>` or `?api_key=<key>` (the header wins).
- A wrong or missing key answers HTTP 401; a query that does not parse or validate answers 400;
  a resolver failure answers 200 with `errors` and `data.<field>: null`, as RunPod does.
- Pods: a create answers `RUNNING` at once, but `runtime` stays null for `ready_after_polls`
  reads; `podStop` → `EXITED` with `runtime` null; `podResume` → `RUNNING` on a new public port;
  `podTerminate` → the pod is gone (`pod(input)` answers null).
- A GPU catalogue with prices, stock and RunPod's `unknown` entry; `myself { pubKey }` and
  `updateUserSettings`.
- Faults on demand (`inject_fault`): 401, 429 with `Retry-After`, 5xx, the capacity error
  (verbatim), "Something went wrong", and a connection dropped after a create was applied.

Run it by hand with `python scripts/runpod_emulator.py`; tests use the fixtures in
`tests/standins/runpod.py`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from graphql import (
    GraphQLError,
    GraphQLObjectType,
    OperationDefinitionNode,
    OperationType,
    build_schema,
    execute,
    parse,
    validate,
)

CAPACITY_MESSAGE = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)
SOMETHING_WENT_WRONG = "Something went wrong. Please try again later or contact support."
SPOT_AS_ON_DEMAND = "Cannot resume a spot pod as an on demand pod."
DEFAULT_API_KEY = "rpa_EMULATOR0TEST0KEY0000000000000000000000"

FaultKind = Literal[
    "unauthorized",  # HTTP 401
    "bad_request",  # HTTP 400 with a GraphQL error
    "rate_limited",  # HTTP 429 with Retry-After
    "server_error",  # HTTP 5xx (status given)
    "capacity",  # 200 + RunPod's "no longer any instances available" resolver error
    "something_went_wrong",  # 200 + INTERNAL_SERVER_ERROR "Something went wrong..."
    "resolver_error",  # 200 + a resolver error with the given `message` (code RUNPOD)
    "drop_after_apply",  # the operation is applied, then the connection closes unanswered
    "drop_before_apply",  # the connection closes before anything is applied
    "slow",  # applied, but answered only after `delay_s` seconds (client timeouts)
]

# The fields both create inputs (on-demand and spot) take, written once.
_DEPLOY_FIELDS = """
  name: String imageName: String gpuTypeId: String gpuTypeIdList: [String] gpuCount: Int
  cloudType: CloudTypeEnum containerDiskInGb: Int volumeInGb: Int volumeMountPath: String
  volumeKey: String ports: String env: [EnvironmentVariableInput] dockerArgs: String
  startSsh: Boolean startJupyter: Boolean supportPublicIp: Boolean minVcpuCount: Int
  minMemoryInGb: Int minDisk: Int minDownload: Int minUpload: Int dataCenterId: String
  countryCode: String networkVolumeId: String templateId: String containerRegistryAuthId: String
  deployCost: Float stopAfter: String terminateAfter: String cudaVersion: String
  allowedCudaVersions: [String] instanceIds: [String] computeType: ComputeType
  savingsPlan: String aiApiId: String port: Int minCudaVersion: String compliance: [String]
"""

SCHEMA_SDL = """
scalar Void

enum PodStatus { CREATED RUNNING RESTARTING EXITED PAUSED DEAD TERMINATED }
enum PodType { INTERRUPTABLE RESERVED BID BACKGROUND }
enum CloudTypeEnum { SECURE COMMUNITY ALL }
enum ComputeType { CPU GPU }

type Query {
  myself: User
  pod(input: PodFilter): Pod
  gpuTypes(input: GpuTypeFilter): [GpuType]
  dataCenters: [DataCenter]
}

type Mutation {
  podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput): Pod
  podRentInterruptable(input: PodRentInterruptableInput): Pod
  podStop(input: PodStopInput): Pod
  podResume(input: PodResumeInput): Pod
  podBidResume(input: PodBidResumeInput): Pod
  podTerminate(input: PodTerminateInput): Void
  updateUserSettings(input: UpdateUserSettingsInput): User
}

type User {
  id: String!
  email: String
  pubKey: String
  clientBalance: Float
  currentSpendPerHr: Float
  spendLimit: Int
  pods: [Pod]
  networkVolumes: [NetworkVolume]
}

type NetworkVolume { id: String! name: String size: Int dataCenterId: String }

input PodFilter { podId: String }
input GpuTypeFilter { id: String ids: [String] }
input EnvironmentVariableInput { key: String! value: String }

input PodFindAndDeployOnDemandInput {
  DEPLOY_FIELDS
}

input PodRentInterruptableInput {
  bidPerGpu: Float
  DEPLOY_FIELDS
}

input PodStopInput { podId: String! incrementVersion: Boolean }
input PodResumeInput {
  podId: String! gpuCount: Int syncMachine: Boolean computeType: ComputeType
  allowedCudaVersions: [String]
}
input PodBidResumeInput { podId: String! bidPerGpu: Float! gpuCount: Int! }
input PodTerminateInput { podId: String! }
input UpdateUserSettingsInput { pubKey: String }

input GpuLowestPriceInput {
  gpuCount: Int secureCloud: Boolean minMemoryInGb: Int minVcpuCount: Int totalDisk: Int
  minDisk: Int minDownload: Int minUpload: Int countryCode: String dataCenterId: String
  supportPublicIp: Boolean allowedCudaVersions: [String] cudaVersion: String
  compliance: [String] includeAiApi: Boolean
}

type GpuType {
  id: String! displayName: String memoryInGb: Int secureCloud: Boolean communityCloud: Boolean
  securePrice: Float communityPrice: Float secureSpotPrice: Float communitySpotPrice: Float
  oneWeekPrice: Float oneMonthPrice: Float threeMonthPrice: Float maxGpuCount: Int
  manufacturer: String cudaCores: Int
  lowestPrice(input: GpuLowestPriceInput): LowestPrice
}

type LowestPrice {
  gpuName: String gpuTypeId: String minimumBidPrice: Float uninterruptablePrice: Float
  stockStatus: String availableGpuCounts: [Int] minMemory: Int minVcpu: Int rentedCount: Int
  totalCount: Int rentalPercentage: Float countryCode: String supportPublicIp: Boolean
}

type DataCenter { id: String! name: String location: String gpuAvailability: [GpuAvailability] }
type GpuAvailability { gpuTypeId: String displayName: String stockStatus: String }

type Pod {
  id: String! name: String! imageName: String! desiredStatus: PodStatus! podType: PodType
  costPerHr: Float! adjustedCostPerHr: Float! lowestBidPriceToResume: Float gpuCount: Int!
  vcpuCount: Float! memoryInGb: Float! containerDiskInGb: Int volumeInGb: Float
  volumeMountPath: String volumeEncrypted: Boolean! ports: String port: Int env: [String]
  dockerArgs: String dockerId: String templateId: String containerRegistryAuthId: String
  machineId: String! lastStatusChange: String lastStartedAt: String createdAt: String
  uptimeSeconds: Int locked: Boolean networkVolumeId: String
  machine: PodMachineInfo
  runtime: PodRuntime
}

type PodMachineInfo {
  gpuDisplayName: String gpuTypeId: String podHostId: String location: String
  dataCenterId: String costPerHr: Float currentPricePerGpu: Float secureCloud: Boolean
  supportPublicIp: Boolean
}

type PodRuntime {
  uptimeInSeconds: Int ports: [PodRuntimePort] gpus: [PodRuntimeGpu] container: PodRuntimeContainer
}
type PodRuntimePort { ip: String isIpPublic: Boolean privatePort: Int publicPort: Int type: String }
type PodRuntimeGpu { id: String gpuUtilPercent: Int memoryUtilPercent: Int }
type PodRuntimeContainer { cpuPercent: Int memoryPercent: Int }
""".replace("  DEPLOY_FIELDS\n", _DEPLOY_FIELDS.lstrip("\n") + "\n")


@dataclass
class CatalogueGpu:
    """One GPU type the emulator offers: prices per GPU-hour (None: not offered) and stock."""

    id: str
    display_name: str
    memory_gb: int
    secure_price: float | None
    community_price: float | None
    secure_spot_price: float | None
    community_spot_price: float | None
    stock: str | None = "High"  # "High" / "Medium" / "Low" / None (nothing free)
    max_gpu_count: int = 8

    def on_demand_price(self, cloud_type: str) -> float | None:
        offered = {
            "SECURE": [self.secure_price],
            "COMMUNITY": [self.community_price],
        }.get(cloud_type, [self.secure_price, self.community_price])
        prices = [price for price in offered if price]
        return min(prices) if prices else None

    def spot_price(self) -> float | None:
        prices = [price for price in (self.secure_spot_price, self.community_spot_price) if price]
        return min(prices) if prices else None


def default_catalogue() -> list[CatalogueGpu]:
    """Ids, names and VRAM from RunPod's GPU list; prices from runpod-api.md §6 or plausible."""
    return [
        CatalogueGpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.44, 0.31, 0.29, 0.20, "High"),
        CatalogueGpu("NVIDIA GeForce RTX 3090", "RTX 3090", 24, 0.43, 0.22, 0.26, 0.16, "Medium"),
        CatalogueGpu("NVIDIA GeForce RTX 5090", "RTX 5090", 32, 0.89, 0.69, 0.55, 0.45, "Low"),
        CatalogueGpu("NVIDIA RTX A4000", "RTX A4000", 16, 0.35, 0.17, 0.20, 0.10, "High"),
        CatalogueGpu("NVIDIA RTX A6000", "RTX A6000", 48, 0.76, 0.49, 0.45, 0.25, "Low"),
        CatalogueGpu("NVIDIA L40S", "L40S", 48, 0.86, 0.79, 0.50, 0.45, "Medium"),
        CatalogueGpu("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.39, 1.19, 0.99, 0.82, None),
        CatalogueGpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.69, None, 1.75, None, None),
        CatalogueGpu("NVIDIA H100 PCIe", "H100 PCIe", 80, 2.39, 1.99, 1.60, 1.25, "Low"),
        # RunPod's catalogue really contains this placeholder entry; clients must skip it.
        CatalogueGpu("unknown", "unknown", 0, None, None, None, None, None, 0),
    ]


@dataclass
class EmulatedPod:
    """One row of the emulator's pod table."""

    id: str
    name: str
    image_name: str
    gpu_type_id: str
    gpu_display_name: str
    gpu_count: int
    cloud_type: str
    pod_type: str  # RESERVED (on demand) or INTERRUPTABLE (spot)
    cost_per_hr: float
    container_disk_gb: int
    volume_gb: int
    volume_mount_path: str
    ports: str
    env: dict[str, str]
    pod_host_id: str
    machine_id: str
    bid_per_gpu: float | None = None
    stop_after: str | None = None
    terminate_after: str | None = None
    docker_args: str | None = None
    status: str = "RUNNING"
    polls_until_ready: int = 0
    public_ip: str = "213.173.108.12"
    public_port: int = 17445
    started_at: float = field(default_factory=time.monotonic)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    last_status_change: str = ""

    def snapshot(self) -> dict[str, Any]:
        """The row as plain data, for tests to assert on."""
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "imageName": self.image_name,
            "gpuTypeId": self.gpu_type_id,
            "gpuCount": self.gpu_count,
            "cloudType": self.cloud_type,
            "podType": self.pod_type,
            "costPerHr": self.cost_per_hr,
            "containerDiskInGb": self.container_disk_gb,
            "volumeInGb": self.volume_gb,
            "volumeMountPath": self.volume_mount_path,
            "ports": self.ports,
            "env": dict(self.env),
            "bidPerGpu": self.bid_per_gpu,
            "stopAfter": self.stop_after,
            "terminateAfter": self.terminate_after,
            "podHostId": self.pod_host_id,
            "publicPort": self.public_port,
        }


@dataclass
class Fault:
    kind: FaultKind
    operation: str | None  # a root field name such as "podFindAndDeployOnDemand"; None: any
    times: int
    status: int = 500
    retry_after: float | None = None
    message: str = ""
    delay_s: float = 0.0


@dataclass
class RecordedRequest:
    """What one request asked for, for tests that check what was (not) sent."""

    operations: list[str]  # root field names
    variables: dict[str, Any]
    query: str
    auth: str  # "bearer", "query", "none"
    status: int = 200


class RunPodEmulator:
    """The emulator's state and its HTTP server. Thread-safe; start with `start()`."""

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        ready_after_polls: int = 1,
        catalogue: list[CatalogueGpu] | None = None,
        pub_key: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.ready_after_polls = ready_after_polls
        self.catalogue = catalogue if catalogue is not None else default_catalogue()
        self.pub_key = pub_key
        self.user_id = "user_2Xc9qEmulator"
        self.requests: list[RecordedRequest] = []
        self._pods: dict[str, EmulatedPod] = {}
        self._faults: list[Fault] = []
        self._lock = threading.RLock()
        self._ports = itertools.count(17445, 7)
        self._direct: tuple[str, int] | None = None
        self._pod_host_id: str | None = None
        self._schema = build_schema(SCHEMA_SDL)
        self._attach_resolvers()
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- the server ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The GraphQL endpoint, e.g. `http://127.0.0.1:8765/graphql`."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/graphql"

    @property
    def base_url(self) -> str:
        """The address without `/graphql`, as RunPod's Python SDK wants it (RUNPOD_API_BASE_URL)."""
        return self.url.removesuffix("/graphql")

    def env(self) -> dict[str, str]:
        """The environment that points hctl at this emulator and turns real waiting off."""
        return {
            "HCTL_RUNPOD_API_URL": self.url,
            "RUNPOD_API_KEY": self.api_key,
            "HCTL_READY_POLL_INTERVAL_S": "0",
            "HCTL_API_BACKOFF_S": "0",
        }

    def start(self) -> RunPodEmulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> RunPodEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what tests look at and set ---------------------------------------------------------

    @property
    def pods(self) -> list[dict[str, Any]]:
        """A snapshot of the pod table (terminated pods are gone), oldest first."""
        with self._lock:
            return [pod.snapshot() for pod in self._pods.values()]

    def pod(self, pod_id: str) -> dict[str, Any] | None:
        with self._lock:
            pod = self._pods.get(pod_id)
            return pod.snapshot() if pod else None

    def requests_for(self, operation: str) -> list[RecordedRequest]:
        """The recorded requests that asked for one root field, e.g. "podFindAndDeployOnDemand"."""
        return [request for request in self.requests if operation in request.operations]

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
        with self._lock:
            self._faults.append(
                Fault(kind, operation, times, status, retry_after, message, delay_s)
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_stock(self, gpu_id: str, stock: str | None) -> None:
        """Set a GPU type's stock: "High", "Medium", "Low", or None (creates fail on capacity)."""
        with self._lock:
            self._gpu(gpu_id).stock = stock  # type: ignore[union-attr]

    def route_ssh(
        self, *, direct: tuple[str, int] | None = None, pod_host_id: str | None = None
    ) -> None:
        """Report SSH endpoints that lead somewhere real (e.g. a test sshd).

        `direct=(ip, port)`: every pod's runtime maps privatePort 22 to this public ip and port
        (also after a resume). `pod_host_id`: every pod's `machine.podHostId` (the proxy's user
        name) reads this. Applies to existing and future pods; None restores the default.
        """
        with self._lock:
            self._direct = direct
            self._pod_host_id = pod_host_id

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
        with self._lock:
            pod = self._new_pod(
                {
                    "name": name,
                    "gpuTypeId": gpu_type_id,
                    "imageName": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
                    "env": [{"key": k, "value": v} for k, v in (env or {}).items()],
                    "ports": "22/tcp",
                    "bidPerGpu": 0.2 if spot else None,
                },
                spot=spot,
            )
            pod.status = status
            pod.polls_until_ready = 0 if ready else self.ready_after_polls
            return pod.snapshot()

    # --- request handling --------------------------------------------------------------------

    def handle(
        self, body: bytes, headers: dict[str, str], query_string: str
    ) -> tuple[int, dict[str, str], dict[str, Any] | None, Fault | None]:
        """Answer one POST: (status, extra headers, JSON body or None to drop, applied fault)."""
        auth, key = _credentials(headers, query_string)
        try:
            payload = json.loads(body or b"{}")
            query = payload["query"]
            variables = payload.get("variables") or {}
            if not isinstance(query, str) or not isinstance(variables, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return 400, {}, _errors("Request body must be JSON with a `query` string."), None
        try:
            document = parse(query)
        except GraphQLError as error:
            return 400, {}, {"errors": [error.formatted]}, None
        operations = _root_fields(document)
        record = RecordedRequest(operations, copy.deepcopy(variables), query, auth)
        with self._lock:
            self.requests.append(record)
            if key != self.api_key:
                record.status = 401
                return 401, {}, _errors("Unauthorized"), None
            fault = self._take_fault(operations)
        if fault is not None and fault.kind == "unauthorized":
            record.status = 401
            return 401, {}, _errors("Unauthorized"), None
        if fault is not None:
            answer = self._fault_answer(fault, operations)
            if answer is not None:
                record.status = answer[0]
                return (*answer, fault)
        problems = validate(self._schema, document)
        if problems:
            record.status = 400
            return 400, {}, {"errors": [problem.formatted for problem in problems]}, None
        with self._lock:
            result = execute(self._schema, document, variable_values=variables)
        if result.data is None and result.errors:  # variables that do not coerce
            record.status = 400
            return 400, {}, {"errors": [error.formatted for error in result.errors]}, None
        response: dict[str, Any] = {"data": result.data}
        if result.errors:
            response = {"errors": [error.formatted for error in result.errors], **response}
        return 200, {}, response, fault

    def _take_fault(self, operations: list[str]) -> Fault | None:
        for fault in self._faults:
            if fault.operation is None or fault.operation in operations:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _fault_answer(
        self, fault: Fault, operations: list[str]
    ) -> tuple[int, dict[str, str], dict[str, Any] | None] | None:
        field_name = operations[0] if operations else "unknown"
        if fault.kind == "bad_request":
            return 400, {}, _errors("Bad request")
        if fault.kind == "rate_limited":
            retry_after = fault.retry_after if fault.retry_after is not None else 1
            return 429, {"Retry-After": f"{retry_after:g}"}, _errors("Too many requests")
        if fault.kind == "server_error":
            return fault.status, {}, _errors("Internal server error")
        if fault.kind == "capacity":
            return 200, {}, _resolver_error(CAPACITY_MESSAGE, field_name, "RUNPOD")
        if fault.kind == "resolver_error":
            return 200, {}, _resolver_error(fault.message, field_name, "RUNPOD")
        if fault.kind == "something_went_wrong":
            return (
                200,
                {},
                _resolver_error(SOMETHING_WENT_WRONG, field_name, "INTERNAL_SERVER_ERROR"),
            )
        if fault.kind == "drop_before_apply":
            return 0, {}, None
        return None  # drop_after_apply and slow: apply first (see the handler)

    # --- the data behind the schema -------------------------------------------------------

    def _gpu(self, gpu_id: str | None) -> CatalogueGpu | None:
        return next((gpu for gpu in self.catalogue if gpu.id == gpu_id), None)

    def _new_pod(self, given: dict[str, Any], *, spot: bool) -> EmulatedPod:
        gpu = self._gpu(given.get("gpuTypeId"))
        if gpu is None or gpu.id == "unknown" or not given.get("imageName"):
            # RunPod answers an invalid GPU id with its capacity message (runpodctl PR #260).
            raise GraphQLError(CAPACITY_MESSAGE, extensions={"code": "RUNPOD"})
        count = given.get("gpuCount") or 1
        cloud_type = given.get("cloudType") or "ALL"
        if spot:
            bid = given.get("bidPerGpu")
            if bid is None:
                raise GraphQLError("bidPerGpu is required.", extensions={"code": "RUNPOD"})
            price = float(bid)
        else:
            unit_price = gpu.on_demand_price(cloud_type)
            if unit_price is None:
                raise GraphQLError(CAPACITY_MESSAGE, extensions={"code": "RUNPOD"})
            price = unit_price
        pod_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(14))
        pod = EmulatedPod(
            id=pod_id,
            name=given.get("name") or pod_id,
            image_name=given["imageName"],
            gpu_type_id=gpu.id,
            gpu_display_name=gpu.display_name,
            gpu_count=count,
            cloud_type=cloud_type,
            pod_type="INTERRUPTABLE" if spot else "RESERVED",
            cost_per_hr=round(price * count, 4),
            container_disk_gb=given.get("containerDiskInGb") or 10,
            volume_gb=given.get("volumeInGb") or 0,
            volume_mount_path=given.get("volumeMountPath") or "/runpod-volume",
            ports=given.get("ports") or "",
            env={item["key"]: item.get("value") or "" for item in given.get("env") or []},
            pod_host_id=f"{pod_id}-{secrets.token_hex(4)}",
            machine_id=secrets.token_hex(6),
            bid_per_gpu=given.get("bidPerGpu") if spot else None,
            stop_after=given.get("stopAfter"),
            terminate_after=given.get("terminateAfter"),
            docker_args=given.get("dockerArgs"),
            polls_until_ready=self.ready_after_polls,
            public_port=next(self._ports),
            last_status_change=f"Rented by User: {datetime.now(timezone.utc):%a %b %d %Y %H:%M:%S}",
        )
        self._pods[pod.id] = pod
        return pod

    def _create(self, given: dict[str, Any], *, spot: bool) -> EmulatedPod:
        gpu = self._gpu(given.get("gpuTypeId"))
        if gpu is not None and gpu.stock is None:
            raise GraphQLError(CAPACITY_MESSAGE, extensions={"code": "RUNPOD"})
        return self._new_pod(given, spot=spot)

    def _existing(self, pod_id: str) -> EmulatedPod:
        pod = self._pods.get(pod_id)
        if pod is None:
            raise GraphQLError("Pod not found.", extensions={"code": "RUNPOD"})
        return pod

    def _stop(self, pod_id: str) -> EmulatedPod:
        pod = self._existing(pod_id)
        pod.status = "EXITED"
        pod.last_status_change = f"Exited by User: {datetime.now(timezone.utc):%c}"
        return pod

    def _resume(self, pod_id: str, *, bid: float | None = None) -> EmulatedPod:
        pod = self._existing(pod_id)
        if pod.pod_type == "INTERRUPTABLE" and bid is None:
            raise GraphQLError(SPOT_AS_ON_DEMAND, extensions={"code": "RUNPOD"})
        if pod.status != "RUNNING":
            pod.status = "RUNNING"
            pod.polls_until_ready = self.ready_after_polls
            pod.public_port = next(self._ports)  # a reset pod gets a new public TCP port
            pod.started_at = time.monotonic()
        if bid is not None:
            pod.bid_per_gpu = bid
            pod.cost_per_hr = round(bid * pod.gpu_count, 4)
        return pod

    def _runtime(self, pod: EmulatedPod, *, poll: bool) -> dict[str, Any] | None:
        """The pod's runtime: null while stopped and for the first `ready_after_polls` reads.

        Only queries count as reads; a mutation's answer shows the runtime without using one up.
        """
        if pod.status != "RUNNING":
            return None
        if pod.polls_until_ready > 0:
            if poll:
                pod.polls_until_ready -= 1
            return None
        ip, port = self._direct or (pod.public_ip, pod.public_port)
        ports = []
        for entry in filter(None, pod.ports.split(",")):
            number, _, kind = entry.partition("/")
            if kind == "tcp":
                public = port if number == "22" else int(number) + 40000
                ports.append(
                    {
                        "ip": ip,
                        "isIpPublic": True,
                        "privatePort": int(number),
                        "publicPort": public,
                        "type": "tcp",
                    }
                )
            else:
                ports.append(
                    {
                        "ip": "100.65.0.101",
                        "isIpPublic": False,
                        "privatePort": int(number),
                        "publicPort": 60141,
                        "type": "http",
                    }
                )
        return {
            "uptimeInSeconds": int(time.monotonic() - pod.started_at),
            "ports": ports,
            "gpus": [
                {"id": f"GPU-{pod.machine_id}-{index}", "gpuUtilPercent": 0, "memoryUtilPercent": 0}
                for index in range(pod.gpu_count)
            ],
            "container": {"cpuPercent": 1, "memoryPercent": 2},
        }

    def _pod_view(self, pod: EmulatedPod) -> dict[str, Any]:
        return {
            "id": pod.id,
            "name": pod.name,
            "imageName": pod.image_name,
            "desiredStatus": pod.status,
            "podType": pod.pod_type,
            "costPerHr": pod.cost_per_hr,
            "adjustedCostPerHr": pod.cost_per_hr,
            "lowestBidPriceToResume": pod.bid_per_gpu,
            "gpuCount": pod.gpu_count,
            "vcpuCount": 8.0 * pod.gpu_count,
            "memoryInGb": 62.0 * pod.gpu_count,
            "containerDiskInGb": pod.container_disk_gb,
            "volumeInGb": float(pod.volume_gb),
            "volumeMountPath": pod.volume_mount_path,
            "volumeEncrypted": False,
            "ports": pod.ports,
            "port": None,
            "env": [f"{key}={value}" for key, value in pod.env.items()],
            "dockerArgs": pod.docker_args,
            "machineId": pod.machine_id,
            "lastStatusChange": pod.last_status_change,
            "createdAt": pod.created_at,
            "machine": {
                "gpuDisplayName": pod.gpu_display_name,
                "gpuTypeId": pod.gpu_type_id,
                "podHostId": self._pod_host_id or pod.pod_host_id,
                "location": "RO",
                "dataCenterId": "EU-RO-1",
                "secureCloud": pod.cloud_type == "SECURE",
                "supportPublicIp": True,
            },
            "_pod": pod,
        }

    def _gpu_view(self, gpu: CatalogueGpu) -> dict[str, Any]:
        return {
            "id": gpu.id,
            "displayName": gpu.display_name,
            "memoryInGb": gpu.memory_gb,
            "secureCloud": gpu.secure_price is not None,
            "communityCloud": gpu.community_price is not None,
            "securePrice": gpu.secure_price,
            "communityPrice": gpu.community_price,
            "secureSpotPrice": gpu.secure_spot_price,
            "communitySpotPrice": gpu.community_spot_price,
            "maxGpuCount": gpu.max_gpu_count,
            "manufacturer": "Nvidia" if gpu.id != "unknown" else None,
            "_gpu": gpu,
        }

    def _lowest_price(self, gpu: CatalogueGpu, given: dict[str, Any] | None) -> dict[str, Any]:
        given = given or {}
        secure = given.get("secureCloud")
        cloud = {True: "SECURE", False: "COMMUNITY"}.get(secure, "ALL")
        price = gpu.on_demand_price(cloud)
        if gpu.stock is None or price is None:
            # RunPod's shape for a GPU with nothing free: null prices, stock "None".
            return {"gpuName": gpu.display_name, "gpuTypeId": gpu.id, "stockStatus": "None",
                    "minimumBidPrice": None, "uninterruptablePrice": None, "minMemory": None,
                    "minVcpu": None, "availableGpuCounts": []}  # fmt: skip
        return {
            "gpuName": gpu.display_name,
            "gpuTypeId": gpu.id,
            "stockStatus": gpu.stock,
            "minimumBidPrice": gpu.spot_price(),
            "uninterruptablePrice": price,
            "availableGpuCounts": [n for n in (1, 2, 4, 8) if n <= gpu.max_gpu_count],
            "minMemory": 31,
            "minVcpu": 6,
            "rentedCount": 10,
            "totalCount": 40,
            "rentalPercentage": 0.25,
            "countryCode": "RO",
            "supportPublicIp": True,
        }

    def _attach_resolvers(self) -> None:
        schema = self._schema
        query = schema.query_type
        mutation = schema.mutation_type
        assert isinstance(query, GraphQLObjectType) and isinstance(mutation, GraphQLObjectType)

        def myself(_root: Any, _info: Any) -> dict[str, Any]:
            return {
                "id": self.user_id,
                "email": "tester@example.com",
                "pubKey": self.pub_key,
                "clientBalance": 25.0,
                "currentSpendPerHr": sum(
                    pod.cost_per_hr for pod in self._pods.values() if pod.status == "RUNNING"
                ),
                "spendLimit": 80,
                "pods": [self._pod_view(pod) for pod in self._pods.values()],
                "networkVolumes": [],
            }

        def pod(_root: Any, _info: Any, input: dict[str, Any] | None = None) -> Any:
            found = self._pods.get((input or {}).get("podId") or "")
            return self._pod_view(found) if found else None

        def gpu_types(_root: Any, _info: Any, input: dict[str, Any] | None = None) -> Any:
            wanted = set((input or {}).get("ids") or [])
            if (input or {}).get("id"):
                wanted.add(input["id"])  # type: ignore[index]
            return [self._gpu_view(gpu) for gpu in self.catalogue if not wanted or gpu.id in wanted]

        def data_centers(_root: Any, _info: Any) -> Any:
            availability = [
                {"gpuTypeId": gpu.id, "displayName": gpu.display_name, "stockStatus": gpu.stock}
                for gpu in self.catalogue
                if gpu.id != "unknown"
            ]
            return [{"id": "EU-RO-1", "name": "EU-RO-1", "location": "Romania",
                     "gpuAvailability": availability}]  # fmt: skip

        def user_settings(_root: Any, _info: Any, input: dict[str, Any] | None = None) -> Any:
            if input and input.get("pubKey") is not None:
                self.pub_key = input["pubKey"]
            return myself(_root, _info)

        def terminate(_root: Any, _info: Any, input: dict[str, Any]) -> None:
            self._existing(input["podId"])
            del self._pods[input["podId"]]

        resolvers: dict[str, Any] = {
            "myself": myself,
            "pod": pod,
            "gpuTypes": gpu_types,
            "dataCenters": data_centers,
        }
        mutations: dict[str, Any] = {
            "podFindAndDeployOnDemand": lambda _r, _i, input=None: self._pod_view(
                self._create(input or {}, spot=False)
            ),
            "podRentInterruptable": lambda _r, _i, input=None: self._pod_view(
                self._create(input or {}, spot=True)
            ),
            "podStop": lambda _r, _i, input: self._pod_view(self._stop(input["podId"])),
            "podResume": lambda _r, _i, input: self._pod_view(self._resume(input["podId"])),
            "podBidResume": lambda _r, _i, input: self._pod_view(
                self._resume(input["podId"], bid=input["bidPerGpu"])
            ),
            "podTerminate": terminate,
            "updateUserSettings": user_settings,
        }
        for name, resolver in resolvers.items():
            query.fields[name].resolve = resolver
        for name, resolver in mutations.items():
            mutation.fields[name].resolve = resolver
        pod_type = schema.get_type("Pod")
        gpu_type = schema.get_type("GpuType")
        assert isinstance(pod_type, GraphQLObjectType) and isinstance(gpu_type, GraphQLObjectType)
        pod_type.fields["runtime"].resolve = lambda view, info: self._runtime(
            view["_pod"], poll=info.operation.operation == OperationType.QUERY
        )
        gpu_type.fields["lowestPrice"].resolve = lambda view, _info, input=None: self._lowest_price(
            view["_gpu"], input
        )


def _credentials(headers: dict[str, str], query_string: str) -> tuple[str, str | None]:
    """Which auth style the request used and its key; the header wins when both are present."""
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return "bearer", authorization[7:].strip()
    keys = parse_qs(query_string).get("api_key")
    if keys:
        return "query", keys[0]
    return "none", None


def _root_fields(document: Any) -> list[str]:
    fields: list[str] = []
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            fields.extend(
                selection.name.value
                for selection in definition.selection_set.selections
                if hasattr(selection, "name")
            )
    return fields


def _errors(message: str) -> dict[str, Any]:
    return {"errors": [{"message": message}]}


def _resolver_error(message: str, field_name: str, code: str) -> dict[str, Any]:
    return {
        "errors": [{"message": message, "path": [field_name], "extensions": {"code": code}}],
        "data": {field_name: None},
    }


def _make_handler(emulator: RunPodEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle's algorithm and the client's
        # delayed ACK add 40 ms to every answer.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass  # quiet: tests and the person at the terminal do not want a line per request

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if split.path.rstrip("/") != "/graphql":
                self._send(404, {}, _errors("Not found"))
                return
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, extra, payload, fault = emulator.handle(body, headers, split.query)
            if fault is not None and fault.kind in ("drop_after_apply", "drop_before_apply"):
                # The request was read (and maybe applied); the client never hears back.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay_s)
            self._send(status, extra, payload)

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self._send(405, {}, _errors("Use POST /graphql"))

        def _send(self, status: int, extra: dict[str, str], payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler
