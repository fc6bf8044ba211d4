"""A local stand-in for RunPod's GraphQL API: a real HTTP server executing RunPod's own schema.

The schema is `runpod-graphql-schema.graphql` beside this file (rebuilt from RunPod's
introspection dump; a copy of `shared/reference/`), executed by graphql-core, so its types and
nullability are RunPod's: `EnvironmentVariableInput.value` is non-null, the deadlines are
`DateTime` (RFC 3339, checked here), the spot input has only the fields RunPod's has, and a
document RunPod would refuse is refused. What the emulator does follows
`shared/reference/runpod-api.md`:

- `POST /graphql` with `{"query": ..., "variables": ...}`; values may come as variables (as hctl and
  runpodctl send them) or as inline literals (as RunPod's Python SDK sends them).
- Authentication by `Authorization: Bearer <key>` or `?api_key=<key>` (the header wins). A wrong or
  missing key answers HTTP 401; a document that does not parse or validate answers 400; a
  resolver failure answers 200 with `errors` and `data.<field>: null`, as RunPod does.
- Pods: a create answers `RUNNING` at once, but `runtime` stays null for `ready_after_polls`
  reads; `podStop` → `EXITED`; `podResume` → `RUNNING` on a new public port; a stopped spot pod
  resumes only with `podBidResume` and shows `lowestBidPriceToResume`; `podTerminate` → gone.
- The pods, catalogue, bills and faults are a `RunPodCloud` (`runpod_cloud.py`), shared with
  the REST v2 emulator; operations have the same neutral names in both ("create", "list", ...).

Run it by hand with `python scripts/runpod_emulator.py --api graphql`; tests use the fixtures in
`tests/standins/runpod.py`.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from graphql import (
    FieldNode,
    GraphQLError,
    GraphQLObjectType,
    GraphQLScalarType,
    OperationDefinitionNode,
    OperationType,
    StringValueNode,
    build_schema,
    execute,
    parse,
    validate,
)

from tests.standins.emulator_http import Answer, EmulatorServer, json_answer
from tests.standins.runpod_cloud import (
    CAPACITY_MESSAGE,
    DEFAULT_API_KEY,
    SOMETHING_WENT_WRONG,
    CatalogueGpu,
    CloudError,
    EmulatedPod,
    Fault,
    RecordedRequest,
    RunPodCloud,
    default_catalogue,
)

SCHEMA_FILE = Path(__file__).with_name("runpod-graphql-schema.graphql")
OPERATIONS = {
    "pod": "get",
    "gpuTypes": "gpus",
    "podFindAndDeployOnDemand": "create",
    "podRentInterruptable": "create",
    "podStop": "stop",
    "podResume": "start",
    "podBidResume": "start",
    "podTerminate": "terminate",
    "updateUserSettings": "set_keys",
}
STOCK = {"High": "High", "Medium": "Medium", "Low": "Low"}

__all__ = ["CAPACITY_MESSAGE", "CatalogueGpu", "RunPodEmulator", "default_catalogue"]


def _rfc3339(value: Any) -> str:
    """RunPod's `DateTime`: an RFC 3339 string with a time zone."""
    if not isinstance(value, str):
        raise GraphQLError(f"DateTime cannot represent {value!r}")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise GraphQLError(f"DateTime cannot represent {value!r}") from None
    if moment.tzinfo is None:
        raise GraphQLError(f"DateTime needs a time zone: {value!r}")
    return value


def _build_schema() -> Any:
    schema = build_schema(SCHEMA_FILE.read_text(encoding="utf-8"))
    date_time = schema.get_type("DateTime")
    assert isinstance(date_time, GraphQLScalarType)
    # graphql-core 3.2 calls parse_value / parse_literal; 3.3 the coerce_input_* names.
    date_time.parse_value = date_time.coerce_input_value = _rfc3339  # type: ignore[method-assign]
    date_time.parse_literal = lambda node, _variables=None: _rfc3339(  # type: ignore[method-assign]
        node.value if isinstance(node, StringValueNode) else None
    )
    if hasattr(date_time, "coerce_input_literal"):
        date_time.coerce_input_literal = date_time.parse_literal
    return schema


class RunPodEmulator(EmulatorServer):
    """RunPod's GraphQL API over a `RunPodCloud`. Start it with `start()` (or `with`)."""

    api = "graphql"

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        ready_after_polls: int = 1,
        catalogue: list[CatalogueGpu] | None = None,
        pub_key: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
        cloud: RunPodCloud | None = None,
    ) -> None:
        cloud = cloud or RunPodCloud(
            api_key=api_key, ready_after_polls=ready_after_polls, catalogue=catalogue,
            pub_key=pub_key,
        )  # fmt: skip
        super().__init__(cloud, host, port)
        self._schema = _build_schema()
        self._attach_resolvers()

    @property
    def url(self) -> str:
        """The GraphQL endpoint, e.g. `http://127.0.0.1:8765/graphql`."""
        return f"{self.origin}/graphql"

    @property
    def base_url(self) -> str:
        """The address without `/graphql`, as RunPod's Python SDK wants it (RUNPOD_API_BASE_URL)."""
        return self.origin

    def env(self) -> dict[str, str]:
        """The environment that points hctl at this emulator and turns real waiting off."""
        return {
            "HCTL_PROVIDER": "runpod-graphql",
            "HCTL_RUNPOD_API_URL": self.url,
            "RUNPOD_API_KEY": self.api_key,
            "HCTL_READY_POLL_INTERVAL_S": "0",
            "HCTL_API_BACKOFF_S": "0",
            "HCTL_CREATE_GRACE_S": "0",
        }

    # --- one request -------------------------------------------------------------------------

    def answer(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> Answer:
        if path.rstrip("/") != "/graphql":
            return json_answer(404, _errors("Not found"))
        if method != "POST":
            return json_answer(405, _errors("Use POST /graphql"))
        auth, key = _credentials(headers, query)
        try:
            payload = json.loads(body or b"{}")
            document_text = payload["query"]
            variables = payload.get("variables") or {}
            if not isinstance(document_text, str) or not isinstance(variables, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return json_answer(400, _errors("Request body must be JSON with a `query` string."))
        try:
            document = parse(document_text)
        except GraphQLError as error:
            return json_answer(400, {"errors": [error.formatted]})
        fields = _root_fields(document)
        record = RecordedRequest(
            _operation(document, fields), fields, copy.deepcopy(variables), auth, document_text
        )
        with self.cloud.lock:
            self.cloud.requests.append(record)
            scope = self.cloud.key_scope(key)
            fault = self.cloud.take_fault(record) if scope else None
        if scope is None or (fault is not None and fault.kind == "unauthorized"):
            record.status = 401
            return json_answer(401, _errors("Unauthorized"))
        if scope != "*":
            record.auth = "pod"
        refusal = self._refusal(fault, fields[0] if fields else "unknown")
        if refusal is not None:
            record.status = refusal.status
            return refusal
        problems = validate(self._schema, document)
        if problems:
            record.status = 400
            return json_answer(400, {"errors": [problem.formatted for problem in problems]})

        def apply() -> Answer:
            result = execute(
                self._schema, document, variable_values=variables, context_value={"scope": scope}
            )
            if result.data is None and result.errors:  # variables that do not coerce
                return json_answer(400, {"errors": [error.formatted for error in result.errors]})
            response: dict[str, Any] = {"data": result.data}
            if result.errors:
                response = {"errors": [error.formatted for error in result.errors], **response}
            return json_answer(200, response)

        answer = self.with_fault(fault, apply)
        record.status = answer.status
        return answer

    def _refusal(self, fault: Fault | None, field_name: str) -> Answer | None:
        if fault is None:
            return None
        if fault.kind == "bad_request":
            return json_answer(400, _errors("Bad request"))
        if fault.kind == "rate_limited":
            retry_after = fault.retry_after if fault.retry_after is not None else 1
            return json_answer(
                429, _errors("Too many requests"), **{"Retry-After": f"{retry_after:g}"}
            )
        if fault.kind == "server_error":
            return json_answer(fault.status, _errors("Internal server error"))
        if fault.kind == "capacity":
            return json_answer(200, _resolver_error(CAPACITY_MESSAGE, field_name, "RUNPOD"))
        if fault.kind == "resolver_error":
            return json_answer(200, _resolver_error(fault.message, field_name, "RUNPOD"))
        if fault.kind == "something_went_wrong":
            return json_answer(
                200, _resolver_error(SOMETHING_WENT_WRONG, field_name, "INTERNAL_SERVER_ERROR")
            )
        return None  # slow, drop_*: see `with_fault`

    # --- the data behind the schema -------------------------------------------------------

    def _pod_view(self, pod: EmulatedPod) -> dict[str, Any]:
        cloud = self.cloud
        return {
            "id": pod.id,
            "name": pod.name,
            "imageName": pod.image,
            "desiredStatus": pod.status,
            "podType": "INTERRUPTABLE" if pod.spot else "RESERVED",
            "costPerHr": pod.cost_per_hr,
            "adjustedCostPerHr": pod.cost_per_hr,
            "lowestBidPriceToResume": cloud.resume_bid(pod) if pod.status != "RUNNING" else None,
            "gpuCount": pod.gpu_count,
            "gpuPowerLimitPercent": 100,
            "gpus": [
                {"id": f"GPU-{pod.machine_id}-{index}", "podId": pod.id}
                for index in range(pod.gpu_count)
            ],  # fmt: skip
            "vcpuCount": 8.0 * pod.gpu_count,
            "memoryInGb": 62.0 * pod.gpu_count,
            "containerDiskInGb": pod.container_disk_gb,
            "volumeInGb": float(pod.volume_gb),
            "volumeMountPath": pod.volume_mount_path,
            "volumeEncrypted": False,
            "ports": ",".join(pod.ports),
            "port": None,
            "env": [f"{key}={value}" for key, value in pod.env.items()],
            "dockerArgs": pod.docker_args,
            "machineId": pod.machine_id,
            "lastStatusChange": "Rented by User" if pod.status == "RUNNING" else "Exited by User",
            "createdAt": pod.created_at,
            "uptimeSeconds": cloud.uptime(pod) if pod.status == "RUNNING" else 0,
            "machine": {
                "gpuDisplayName": pod.gpu.display_name,
                "gpuTypeId": pod.gpu.id,
                "podHostId": cloud.host_id(pod),
                "location": "RO",
                "dataCenterId": "EU-RO-1",
                "secureCloud": pod.cloud == "SECURE",
                "supportPublicIp": True,
            },
            "_pod": pod,
        }

    def _runtime(self, pod: EmulatedPod, *, poll: bool) -> dict[str, Any] | None:
        """Null while stopped and for the first `ready_after_polls` reads (queries only: a
        mutation's answer shows the runtime without using a read up)."""
        if not self.cloud.runtime_ready(pod, poll=poll):
            return None
        ip, port = self.cloud.direct_address(pod)
        ports = []
        for entry in pod.ports:
            number, _, kind = entry.partition("/")
            if kind == "tcp":
                public = port if number == "22" else int(number) + self.cloud.port_offset
                ports.append({"ip": ip, "isIpPublic": True, "privatePort": int(number),
                              "publicPort": public, "type": "tcp"})  # fmt: skip
            else:
                ports.append({"ip": "100.65.0.101", "isIpPublic": False,
                              "privatePort": int(number), "publicPort": 60141, "type": "http"})  # fmt: skip
        return {
            "uptimeInSeconds": self.cloud.uptime(pod),
            "ports": ports,
            "gpus": [
                {
                    "id": f"GPU-{pod.machine_id}-{index}",
                    "gpuUtilPercent": 37,
                    "memoryUtilPercent": 12,
                }
                for index in range(pod.gpu_count)
            ],
            "container": {"cpuPercent": 1, "memoryPercent": 2},
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
        secure = (given or {}).get("secureCloud")
        clouds = {True: ["SECURE"], False: ["COMMUNITY"]}.get(secure, ["SECURE", "COMMUNITY"])
        offers = [
            (gpu.price_in(cloud), gpu.stock_in(cloud))
            for cloud in clouds
            if gpu.price_in(cloud) and gpu.stock_in(cloud)
        ]
        if not offers:
            # RunPod's shape for a GPU with nothing free: null prices, stock "None".
            return {"gpuName": gpu.display_name, "gpuTypeId": gpu.id, "stockStatus": "None",
                    "minimumBidPrice": None, "uninterruptablePrice": None, "minMemory": None,
                    "minVcpu": None, "availableGpuCounts": []}  # fmt: skip
        price, stock = min(offers, key=lambda offer: offer[0] or 0.0)
        spot = [gpu.price_in(cloud, spot=True) for cloud in clouds]
        return {
            "gpuName": gpu.display_name,
            "gpuTypeId": gpu.id,
            "stockStatus": stock,
            "minimumBidPrice": min((value for value in spot if value), default=None),
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

    def _create(self, given: dict[str, Any], *, spot: bool) -> dict[str, Any]:
        neutral = {
            "name": given.get("name"),
            "image": given.get("imageName"),
            "gpu_type_id": given.get("gpuTypeId"),
            "gpu_count": given.get("gpuCount"),
            "cloud": given.get("cloudType") or "ALL",
            "container_disk_gb": given.get("containerDiskInGb"),
            "volume_gb": given.get("volumeInGb"),
            "volume_mount_path": given.get("volumeMountPath") or "/runpod-volume",
            "ports": [entry for entry in (given.get("ports") or "").split(",") if entry],
            "env": {item["key"]: item["value"] for item in given.get("env") or []},
            "spot": spot,
            "bid": given.get("bidPerGpu"),
            "stop_after": given.get("stopAfter"),
            "terminate_after": given.get("terminateAfter"),
            "allowed_cuda_versions": given.get("allowedCudaVersions"),
            "global_networking": given.get("globalNetwork"),
            "docker_args": given.get("dockerArgs"),
        }
        return self._pod_view(self.cloud.create(neutral))

    def _attach_resolvers(self) -> None:
        schema = self._schema
        query = schema.query_type
        mutation = schema.mutation_type
        assert isinstance(query, GraphQLObjectType) and isinstance(mutation, GraphQLObjectType)
        cloud = self.cloud

        def account(info: Any) -> None:
            if info.context["scope"] != "*":
                raise GraphQLError("Unauthorized", extensions={"code": "UNAUTHENTICATED"})

        def own(info: Any, pod_id: str) -> EmulatedPod:
            """The pod, if the request's key may act on it (a pod's key: that pod only)."""
            scope = info.context["scope"]
            if scope not in ("*", pod_id):
                raise GraphQLError("Unauthorized", extensions={"code": "UNAUTHENTICATED"})
            return translated(cloud.existing, pod_id)

        def myself(_root: Any, info: Any) -> dict[str, Any]:
            account(info)
            return {
                "id": cloud.user_id,
                "email": "tester@example.com",
                "pubKey": cloud.pub_key,
                "clientBalance": 25.0,
                "currentSpendPerHr": sum(
                    pod.cost_per_hr for pod in cloud.all_pods() if pod.status == "RUNNING"
                ),
                "spendLimit": 80,
                "pods": [self._pod_view(pod) for pod in cloud.all_pods()],
                "networkVolumes": [],
                "userPreferences": [],
                "dailyCharges": [],
            }

        def pod(_root: Any, info: Any, input: dict[str, Any] | None = None) -> Any:
            pod_id = (input or {}).get("podId") or ""
            if info.context["scope"] not in ("*", pod_id):
                raise GraphQLError("Unauthorized")
            found = cloud.find(pod_id)
            return self._pod_view(found) if found else None

        def gpu_types(_root: Any, info: Any, input: dict[str, Any] | None = None) -> Any:
            account(info)
            wanted = set((input or {}).get("ids") or [])
            if (input or {}).get("id"):
                wanted.add(input["id"])  # type: ignore[index]
            return [
                self._gpu_view(gpu) for gpu in cloud.catalogue if not wanted or gpu.id in wanted
            ]

        def user_settings(_root: Any, info: Any, input: dict[str, Any] | None = None) -> Any:
            account(info)
            if input and input.get("pubKey") is not None:
                cloud.pub_key = input["pubKey"]
            return myself(_root, info)

        def create(spot: bool) -> Any:
            def resolve(_root: Any, info: Any, input: dict[str, Any] | None = None) -> Any:
                account(info)
                return translated(self._create, input or {}, spot=spot)

            return resolve

        def stop(_root: Any, info: Any, input: dict[str, Any]) -> Any:
            return self._pod_view(cloud.stop(own(info, input["podId"]).id))

        def resume(_root: Any, info: Any, input: dict[str, Any]) -> Any:
            pod = own(info, input["podId"])
            return self._pod_view(translated(cloud.start, pod.id, bid=input.get("bidPerGpu")))

        def terminate(_root: Any, info: Any, input: dict[str, Any]) -> None:
            cloud.terminate(own(info, input["podId"]).id)

        resolvers = {"myself": myself, "pod": pod, "gpuTypes": gpu_types}
        mutations = {
            "podFindAndDeployOnDemand": create(spot=False),
            "podRentInterruptable": create(spot=True),
            "podStop": stop,
            "podResume": resume,
            "podBidResume": resume,
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


def translated(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call into the cloud; its refusals become resolver errors, as RunPod words them."""
    try:
        return function(*args, **kwargs)
    except CloudError as error:
        message = "Pod not found." if error.kind == "not_found" else error.message
        raise GraphQLError(message, extensions={"code": "RUNPOD"}) from None


def _operation(document: Any, fields: list[str]) -> str:
    """The neutral name of what a document does ("create", "list", ...)."""
    if not fields:
        return "unknown"
    if fields[0] != "myself":
        return OPERATIONS.get(fields[0], fields[0])
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            for selection in definition.selection_set.selections:
                if isinstance(selection, FieldNode) and selection.selection_set:
                    inner = {
                        getattr(item, "name", None) and item.name.value
                        for item in selection.selection_set.selections
                    }
                    if "pods" in inner:
                        return "list"
    return "keys"


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
