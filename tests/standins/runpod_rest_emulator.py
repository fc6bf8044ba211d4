"""A local stand-in for RunPod's REST API v2, answering from RunPod's own OpenAPI document.

Every request is checked against `runpod-rest-v2-openapi.json` (beside this file; a copy of
`shared/reference/`, from RunPod's docs) with `openapi-core` before anything happens: a body or
parameter RunPod would refuse is refused the way RunPod documents it (422 with the violations,
401 without a bearer key), and recorded in `invalid_requests`. Every answer is checked against the
same document before it is sent; one that does not conform is an emulator bug, recorded in
`invalid_responses` (the test fixtures fail a test that leaves any).

Emulated: pods (`GET/POST /v2/pods`, `GET/DELETE /v2/pods/{id}`, `POST /v2/pods/{id}/action`),
the GPU catalogue with availability (`GET /v2/catalog/gpus[/{id}]`), the account's SSH keys
(`GET/PUT /v2/account/ssh-keys`) and pod bills (`GET /v2/billing/pods`). The rest of the
document answers 501. Pods go `PROVISIONING` (the create's answer) → `STARTING` (for
`ready_after_polls` reads, `runtime` null) → `RUNNING`; stop → `EXITED` (cost 0.0); terminate →
gone (404). Errors are RFC 9457 problem documents; capacity is a 400 with RunPod's text. Faults
(`inject_fault`) and the pod table are the `RunPodCloud`'s, shared with the GraphQL emulator.

Run it by hand with `python scripts/runpod_emulator.py` (REST is the default API).
"""

from __future__ import annotations

import copy
import functools
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from openapi_core import Config, OpenAPI
from openapi_core.templating.paths.exceptions import (
    OperationNotFound,
    PathNotFound,
    ServerNotFound,
)
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.request.exceptions import SecurityValidationError

from tests.standins.emulator_http import Answer, EmulatorServer
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
)

SPEC_FILE = Path(__file__).with_name("runpod-rest-v2-openapi.json")
PROBLEM = "application/problem+json"
ORIGIN = "https://api.runpod.io"  # requests are checked as if sent to RunPod's server
OPERATIONS = {
    "listPods": "list",
    "getPod": "get",
    "createPod": "create",
    "deletePod": "terminate",
    "listGpuTypes": "gpus",
    "getGpuType": "gpus",
    "getSshKeys": "keys",
    "updateSshKeys": "set_keys",
    "listPodBilling": "billing",
}
ACTIONS = {
    "PROVISIONING": ["stop", "terminate"],
    "STARTING": ["stop", "terminate"],
    "RUNNING": ["stop", "restart", "terminate"],
    "EXITED": ["start", "terminate"],
}
AVAILABILITY = {"High": "HIGH", "Medium": "MEDIUM", "Low": "LOW", None: "NONE"}
TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
          405: "Method Not Allowed", 409: "Conflict", 422: "Unprocessable Entity",
          429: "Too Many Requests", 500: "Internal Server Error", 501: "Not Implemented"}  # fmt: skip
RATE_LIMIT = {
    "RateLimit": '"minute";r=59;t=60, "hour";r=2999;t=3600, "day";r=49999;t=86400',
    "RateLimit-Policy": '"minute";q=60;w=60, "hour";q=3000;w=3600, "day";q=50000;w=86400',
}


@functools.cache
def openapi() -> OpenAPI:
    """RunPod's document, loaded once (about a second) for every emulator in the process."""
    config = Config(extra_media_type_deserializers={PROBLEM: json.loads})
    return OpenAPI.from_dict(json.loads(SPEC_FILE.read_text(encoding="utf-8")), config=config)


def problem(status: int, detail: str, *, errors: list[str] | None = None, **headers: str) -> Answer:
    document: dict[str, Any] = {"title": TITLES.get(status, "Error"), "status": status,
                                "detail": detail}  # fmt: skip
    if errors:
        document["errors"] = errors
    return Answer(status, json.dumps(document).encode(), PROBLEM, {**RATE_LIMIT, **headers})


def ok(status: int, payload: Any = None) -> Answer:
    body = b"" if payload is None else json.dumps(payload).encode()
    return Answer(status, body, headers=dict(RATE_LIMIT))


class RunPodRestEmulator(EmulatorServer):
    """RunPod's REST API v2 over a `RunPodCloud`. Start it with `start()` (or `with`)."""

    api = "rest"

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
        self.invalid_requests: list[str] = []
        self.invalid_responses: list[str] = []

    @property
    def url(self) -> str:
        """The API's base address, e.g. `http://127.0.0.1:8765` (paths start with /v2)."""
        return self.origin

    base_url = url

    def env(self) -> dict[str, str]:
        """The environment that points hctl at this emulator and turns real waiting off."""
        return {
            "HCTL_PROVIDER": "runpod",
            "HCTL_RUNPOD_REST_URL": self.url,
            "RUNPOD_API_KEY": self.api_key,
            "HCTL_READY_POLL_INTERVAL_S": "0",
            "HCTL_API_BACKOFF_S": "0",
            "HCTL_CREATE_GRACE_S": "0",
        }

    # --- one request -------------------------------------------------------------------------

    def answer(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> Answer:
        args = {name: values[-1] for name, values in parse_qs(query).items()}
        request = MockRequest(
            ORIGIN, method.lower(), path, args=args, headers=headers, data=body or None,
            content_type=headers.get("content-type", "application/json").split(";")[0],
        )  # fmt: skip
        answer = self._answer(request, method, path, args, headers, body)
        self._check_response(request, answer)
        return answer

    def _answer(
        self,
        request: MockRequest,
        method: str,
        path: str,
        args: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> Answer:
        result = openapi().unmarshal_request(request)
        operation_id, path_known = _operation_id(path, method)
        if operation_id is None:
            if path_known:
                return problem(405, "The requested method is not allowed for this path.")
            return problem(404, "resource not found")
        pod_id = (result.parameters.path or {}).get("id") if result.parameters else None
        try:
            parsed_body = json.loads(body) if body else None
        except ValueError:
            parsed_body = body.decode("utf-8", "replace")
        record = RecordedRequest(
            OPERATIONS.get(operation_id, operation_id), [operation_id], copy.deepcopy(parsed_body),
            "none", f"{method} {path}" + (f"?{request.args}" if args else ""),
        )  # fmt: skip
        if operation_id == "podAction" and isinstance(parsed_body, dict):
            record.operation = {"start": "start", "stop": "stop", "terminate": "terminate"}.get(
                parsed_body.get("action"), "action"
            )
        authorization = headers.get("authorization", "")
        key = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        with self.cloud.lock:
            self.cloud.requests.append(record)
            scope = self.cloud.key_scope(key)
            fault = self.cloud.take_fault(record) if scope else None
        if key is not None:
            record.auth = "bearer" if scope == "*" else "pod"
        answer = self._refuse(result.errors, scope, fault, pod_id, operation_id)
        if answer is None:
            answer = self.with_fault(
                fault, lambda: self._apply(operation_id, result, parsed_body, pod_id)
            )
        record.status = answer.status
        return answer

    def _refuse(
        self,
        errors: list[Exception],
        scope: str | None,
        fault: Fault | None,
        pod_id: str | None,
        operation_id: str,
    ) -> Answer | None:
        if scope is None or any(isinstance(error, SecurityValidationError) for error in errors):
            return problem(401, "missing bearer token" if scope is None else "invalid token")
        if fault is not None and fault.kind == "unauthorized":
            return problem(401, "invalid token")
        if scope != "*" and (pod_id != scope or operation_id not in ("getPod", "podAction")):
            return problem(403, "a pod's key may act on that pod only")
        if errors:
            violations = [_violation(error) for error in errors]
            self.invalid_requests.extend(violations)
            return problem(422, "Request validation failed.", errors=violations)
        return self._fault_answer(fault)

    def _fault_answer(self, fault: Fault | None) -> Answer | None:
        if fault is None:
            return None
        if fault.kind == "bad_request":
            return problem(400, "request could not be processed")
        if fault.kind == "rate_limited":
            wait = fault.retry_after if fault.retry_after is not None else 1
            return problem(429, "rate limit exceeded for the minute window",
                           **{"Retry-After": str(int(wait))})  # fmt: skip
        if fault.kind == "server_error":
            return problem(fault.status, "upstream failure")
        if fault.kind == "capacity":
            return problem(400, CAPACITY_MESSAGE)
        if fault.kind == "resolver_error":
            return problem(400, fault.message)
        if fault.kind == "something_went_wrong":
            return problem(500, SOMETHING_WENT_WRONG)
        return None  # slow, drop_*: see `with_fault`

    def _check_response(self, request: MockRequest, answer: Answer) -> None:
        if answer.body is None:
            return
        response = MockResponse(
            answer.body, status_code=answer.status, headers=answer.headers,
            content_type=answer.content_type if answer.status != 204 else None,
        )  # fmt: skip
        errors = openapi().unmarshal_response(request, response).errors
        self.invalid_responses.extend(
            f"{request.method.upper()} {request.path} → {answer.status}: {_violation(error)}"
            for error in errors
            if not isinstance(error, PathNotFound | OperationNotFound | ServerNotFound)
        )

    # --- operations --------------------------------------------------------------------------

    def _apply(self, operation_id: str, result: Any, body: Any, pod_id: str | None) -> Answer:
        cloud = self.cloud
        query = dict(result.parameters.query or {}) if result.parameters else {}
        try:
            if operation_id == "listPods":
                return ok(
                    200, {"pods": [self._pod_view(pod, poll=True) for pod in cloud.all_pods()]}
                )
            if operation_id == "getPod":
                return ok(200, self._pod_view(cloud.existing(pod_id or ""), poll=True))
            if operation_id == "createPod":
                return self._create(result.body)
            if operation_id == "deletePod":
                cloud.terminate(pod_id or "")
                return ok(204)
            if operation_id == "podAction":
                return self._action(pod_id or "", body["action"])
            if operation_id in ("listGpuTypes", "getGpuType"):
                return self._catalogue(query, pod_id)
            if operation_id == "getSshKeys":
                return ok(
                    200, {"keys": [line for line in cloud.pub_key.splitlines() if line.strip()]}
                )
            if operation_id == "updateSshKeys":
                cloud.pub_key = "\n".join(body["keys"])
                return ok(200, {"keys": list(body["keys"])})
            if operation_id == "listPodBilling":
                return self._billing(query)
        except CloudError as error:
            status = {"capacity": 400, "not_found": 404, "conflict": 409, "invalid": 400}[
                error.kind
            ]
            return problem(status, error.message)
        return problem(501, f"{operation_id} is not emulated")

    def _create(self, body: dict[str, Any]) -> Answer:
        gpu, cpu = body.get("gpu"), body.get("cpu")
        if (gpu is None) == (cpu is None):
            return problem(400, "exactly one of gpu or cpu must be set")
        if cpu is not None:
            return problem(400, "CPU pods are not offered by this emulator")
        if "templateId" in body:
            return problem(404, "template not found")
        mounts = body.get("mounts") or {}
        if mounts.get("network"):
            return problem(404, "network volume not found")
        if mounts.get("persistent") and mounts.get("network"):
            return problem(400, "persistent and network mounts are mutually exclusive")
        allowed, minimum = gpu.get("allowedCudaVersions"), gpu.get("minCudaVersion")
        if allowed and minimum:
            return problem(400, "allowedCudaVersions and minCudaVersion are mutually exclusive")
        persistent = mounts.get("persistent") or {}
        pod = self.cloud.create(
            {
                "name": body["name"],
                "image": body.get("image"),
                "gpu_type_id": gpu["id"],
                "gpu_count": gpu.get("count", 1),
                "cloud": body.get("cloud", "SECURE"),
                "container_disk_gb": body.get("disk", 50),
                "volume_gb": persistent.get("size", 0),
                "volume_mount_path": persistent.get("path", "/workspace"),
                "ports": body.get("ports") or [],
                "env": body.get("env") or {},
                "allowed_cuda_versions": allowed,
                "min_cuda_version": minimum,
                "global_networking": body.get("globalNetworking", False),
                "docker_args": body.get("args", ""),
            }
        )
        view = self._pod_view(pod, poll=False)
        view.update(status="PROVISIONING", actions=ACTIONS["PROVISIONING"])  # as RunPod answers
        return ok(201, view)

    def _action(self, pod_id: str, action: str) -> Answer:
        cloud = self.cloud
        pod = cloud.existing(pod_id)
        if action not in ACTIONS[self._status(pod, poll=False)]:
            return problem(409, f"cannot {action} a pod that is {self._status(pod, poll=False)}")
        if action == "terminate":
            cloud.terminate(pod_id)
            return ok(204)
        if action == "stop":
            cloud.stop(pod_id)
        elif action == "start":
            cloud.start(pod_id)  # a spot pod cannot: REST has no bid (SPOT_AS_ON_DEMAND)
        else:  # restart: the container again, on the same host
            pod.polls_until_ready = cloud.ready_after_polls
        return ok(200, self._pod_view(pod, poll=False))

    def _status(self, pod: EmulatedPod, *, poll: bool) -> str:
        if pod.status != "RUNNING":
            return pod.status
        return "RUNNING" if self.cloud.runtime_ready(pod, poll=poll) else "STARTING"

    def _pod_view(self, pod: EmulatedPod, *, poll: bool) -> dict[str, Any]:
        cloud = self.cloud
        status = self._status(pod, poll=poll)
        running = status == "RUNNING"
        ip, public_port = cloud.direct_address(pod)
        host_id = cloud.host_id(pod)
        ports = []
        for entry in pod.ports:
            number, _, kind = entry.partition("/")
            if kind == "tcp":
                public = public_port if number == "22" else int(number) + cloud.port_offset
                ports.append({"private": int(number), "public": public, "type": "tcp", "ip": ip})
            else:
                ports.append({"private": int(number), "public": None, "type": "http", "ip": None})
        direct = None
        if running and "22/tcp" in pod.ports:
            direct = {"host": ip, "port": public_port, "username": "root",
                      "command": f"ssh root@{ip} -p {public_port}"}  # fmt: skip
        view: dict[str, Any] = {
            "id": pod.id,
            "name": pod.name,
            "status": status,
            "actions": ACTIONS[status],
            "image": pod.image,
            "args": pod.docker_args,
            "disk": pod.container_disk_gb,
            "mounts": {"persistent": {"size": pod.volume_gb, "path": pod.volume_mount_path}}
            if pod.volume_gb
            else {},
            "ports": list(pod.ports),
            "env": dict(pod.env),
            "registry": None,
            "gpu": {"id": pod.gpu.id, "count": pod.gpu_count},
            "cloud": pod.cloud,
            "dataCenterId": "EU-RO-1",
            "cudaVersion": pod.cuda_version,
            "ssh": {
                "proxy": {
                    "host": "ssh.runpod.io",
                    "port": 22,
                    "username": host_id,
                    "command": f"ssh {host_id}@ssh.runpod.io",
                },  # fmt: skip
                "direct": direct,
            },
            "template": None,
            "cost": pod.cost_per_hr if pod.status == "RUNNING" else 0.0,
            "locked": False,
            "globalNetworking": {"enabled": pod.global_networking},
            "runtime": {
                "uptime": cloud.uptime(pod),
                "gpus": [{"util": 37, "memoryUtil": 12} for _ in range(pod.gpu_count)],
                "cpu": {"util": 3},
                "memory": {"util": 9},
                "ports": ports,
            }
            if running
            else None,
            "createdAt": pod.created_at,
            "startedAt": pod.created_at if pod.status == "RUNNING" else None,
        }
        if pod.global_networking:
            view["globalNetworking"].update(
                {"ip": cloud.private_ip, "internalDns": f"{pod.id}.runpod.internal"}
            )
        return view

    def _catalogue(self, query: dict[str, Any], gpu_id: str | None) -> Answer:
        include = query.get("include") or []
        products = query.get("product") or []
        with_availability = "AVAILABILITY" in include
        if with_availability != bool(products):
            return problem(400, "include=AVAILABILITY and product go together")
        filters = ("count", "cloud", "countryCodes", "cudaVersions", "minCudaVersion")
        if not with_availability and any(name in query for name in filters):
            return problem(400, "availability filters need include=AVAILABILITY")
        if "cudaVersions" in query and "minCudaVersion" in query:
            return problem(400, "cudaVersions and minCudaVersion are mutually exclusive")
        cloud = query.get("cloud", "SECURE")
        gpus = [gpu for gpu in self.cloud.catalogue if gpu.id != "unknown"]
        if gpu_id is not None:
            gpus = [gpu for gpu in gpus if gpu.id == gpu_id]
            if not gpus:
                return problem(404, "GPU type not found")
        views = [self._gpu_view(gpu, cloud if with_availability else None, query) for gpu in gpus]
        return ok(200, views[0] if gpu_id is not None else {"gpus": views})

    def _gpu_view(self, gpu: CatalogueGpu, cloud: str | None, query: dict[str, Any]) -> dict:
        view: dict[str, Any] = {
            "id": gpu.id,
            "name": gpu.display_name,
            "pool": None,
            "manufacturer": "NVIDIA",
            "memory": gpu.memory_gb,
            "secure": gpu.secure_price is not None,
            "community": gpu.community_price is not None,
            "price": {"secure": gpu.secure_price or 0.0, "community": gpu.community_price or 0.0},
            "maxCount": {
                "secure": gpu.max_gpu_count if gpu.secure_price else 0,
                "community": gpu.max_gpu_count if gpu.community_price else 0,
            },
        }
        if cloud is None:
            return view
        stock = gpu.stock_in(cloud)
        if int(query.get("count", 1)) > gpu.max_gpu_count:
            stock = None
        view["availability"] = AVAILABILITY[stock]
        if stock is not None:
            view["dataCenters"] = [
                {"id": "EU-RO-1", "name": "EU Romania 1", "availability": AVAILABILITY[stock]}
            ]
        wanted = query.get("cudaVersions")
        versions = [version for version in gpu.cuda_versions if not wanted or version in wanted]
        view["cudaVersions"] = [
            {"version": version, "available": stock is not None} for version in versions
        ]
        return view

    def _billing(self, query: dict[str, Any]) -> Answer:
        bucket = query.get("bucketSize", "day")
        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        start, end = today, today + timedelta(days=1)
        wanted = query.get("podId")
        pods = [pod_id for pod_id in self.cloud.billed_pods() if wanted in (None, pod_id)]
        records = []
        for pod_id in pods:
            amount = round(self.cloud.billed(pod_id), 6)
            records.append({"startTime": _iso(start), "endTime": _iso(end), "podId": pod_id,
                            "totalAmount": amount, "gpuAmount": amount, "cpuAmount": 0.0,
                            "diskAmount": 0.0})  # fmt: skip
        total = round(sum(record["totalAmount"] for record in records), 6)
        metadata = {
            "query": {
                "startTime": _iso(start),
                "endTime": _iso(end),
                "bucketSize": bucket,
                "podId": wanted,
            },  # fmt: skip
            "recordCount": len(records),
            "uniquePodCount": len(records),
            "totals": {
                "totalAmount": total,
                "gpuAmount": total,
                "cpuAmount": 0.0,
                "diskAmount": 0.0,
            },  # fmt: skip
        }
        return ok(200, {"records": records, "metadata": metadata})


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _violation(error: Exception) -> str:
    """One line for a validation error: openapi-core's own words and its cause's."""
    cause = error.__cause__
    detail = getattr(cause, "schema_errors", None)
    if detail:
        where = str(error).split(":", 1)[0]
        return f"{where}: " + "; ".join(getattr(item, "message", str(item)) for item in detail)
    return f"{error}" + (f": {cause}" if cause else "")


@functools.cache
def _paths() -> list[tuple[list[str], dict[str, Any]]]:
    """RunPod's path templates, split, the most literal first ("/v2/registries/delegations"
    before "/v2/registries/{id}")."""
    document = json.loads(SPEC_FILE.read_text(encoding="utf-8"))
    templates = [(template.strip("/").split("/"), operations)
                 for template, operations in document["paths"].items()]  # fmt: skip
    return sorted(templates, key=lambda item: sum(part.startswith("{") for part in item[0]))


def _operation_id(path: str, method: str) -> tuple[str | None, bool]:
    """The operationId of a path and method in RunPod's document, and whether the path is in it."""
    parts = path.strip("/").split("/")
    for pattern, operations in _paths():
        if len(pattern) == len(parts) and all(
            want == have or want.startswith("{") for want, have in zip(pattern, parts, strict=True)
        ):
            found = operations.get(method.lower())
            return (found["operationId"] if found else None), True
    return None, False
