"""The RunPod emulator, driven by clients that are not hctl.

hctl's own tests would pass against an emulator that merely mirrors hctl's mistakes. So here the
emulator answers (1) raw GraphQL documents copied from the samples in
`shared/reference/runpod-api.md` (inline literals, as RunPod's Python SDK and the docs' curl
examples send them; variables as runpodctl sends them), and (2) RunPod's own Python SDK
(`runpod`, in the `dev` extra only for this: it is an independent client sending RunPod's request
style; the product never imports it). The SDK installs from PyPI in about 12 s without CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.standins.runpod_emulator import CAPACITY_MESSAGE, RunPodEmulator

SPOT_CREATE = (
    'mutation { podRentInterruptable(input: { bidPerGpu: 0.25, name: "hctl-spot", imageName: '
    '"runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404", gpuTypeId: "NVIDIA RTX A6000", '
    'gpuCount: 1, cloudType: SECURE, startSsh: true, supportPublicIp: true, ports: "22/tcp", '
    'volumeMountPath: "/runpod-volume" }) { id desiredStatus imageName env machineId '
    "machine { podHostId } } }"
)
ON_DEMAND_CREATE = (
    "mutation createPod($input: PodFindAndDeployOnDemandInput!) { podFindAndDeployOnDemand("
    "input: $input) { id name desiredStatus costPerHr imageName env machineId machine { podHostId "
    "gpuDisplayName } } }"
)
ON_DEMAND_VARIABLES = {
    "input": {
        "name": "hctl-run-42",
        "imageName": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
        "gpuTypeId": "NVIDIA GeForce RTX 4090",
        "gpuCount": 1,
        "cloudType": "SECURE",
        "containerDiskInGb": 20,
        "volumeInGb": 30,
        "volumeMountPath": "/runpod-volume",
        "ports": "22/tcp,8888/http",
        "env": [{"key": "HCTL_RUN", "value": "42"}],
        "startSsh": True,
        "minVcpuCount": 4,
        "minMemoryInGb": 16,
    }
}
LIST_PODS = (
    "query { myself { pods { id name desiredStatus podType costPerHr gpuCount imageName ports "
    "machine { gpuDisplayName podHostId } runtime { uptimeInSeconds ports { ip isIpPublic "
    "privatePort publicPort type } gpus { id gpuUtilPercent memoryUtilPercent } } } } }"
)
GET_POD = (
    'query pod { pod(input: {podId: "%s"}) { id desiredStatus lastStatusChange runtime { '
    "uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } } machine { podHostId } } }"
)
STOP = "mutation stopPod($podId: String!) { podStop(input: {podId: $podId}) { id desiredStatus } }"
RESUME = (
    'mutation { podResume(input: { podId: "%s", gpuCount: 1 }) { id desiredStatus costPerHr '
    "machine { podHostId } } }"
)
BID_RESUME = (
    "mutation Mutation($podId: String!, $bidPerGpu: Float!, $gpuCount: Int!) { podBidResume("
    "input: {podId: $podId, bidPerGpu: $bidPerGpu, gpuCount: $gpuCount}) { id costPerHr "
    "desiredStatus } }"
)
TERMINATE = 'mutation { podTerminate(input: { podId: "%s" }) }'
GPU_TYPES = (
    "query GpuTypes { gpuTypes { id displayName memoryInGb secureCloud communityCloud securePrice "
    "communityPrice secureSpotPrice communitySpotPrice maxGpuCount } }"
)
LOWEST_PRICE_INLINE = (
    'query { gpuTypes(input: {id: "NVIDIA RTX A4000"}) { id lowestPrice(input: {gpuCount: 1, '
    "secureCloud: true}) { stockStatus minimumBidPrice uninterruptablePrice availableGpuCounts "
    "minMemory minVcpu } } }"
)
LOWEST_PRICE_VARIABLES = (
    "query LowestPrice($input: GpuLowestPriceInput!) { gpuTypes { lowestPrice(input: $input) { "
    "gpuName gpuTypeId minimumBidPrice uninterruptablePrice minMemory minVcpu } } }"
)
DATA_CENTERS = "query { dataCenters { id name location gpuAvailability { gpuTypeId displayName stockStatus } } }"
MYSELF = "query myself { myself { id pubKey networkVolumes { id name size dataCenterId } } }"
UPDATE_KEYS = "mutation Mutation($input: UpdateUserSettingsInput) { updateUserSettings(input: $input) { id } }"


def post(
    emulator: RunPodEmulator,
    query: str,
    variables: Any = None,
    *,
    auth: str = "bearer",
    key: str | None = None,
) -> httpx.Response:
    key = key or emulator.api_key
    body: dict[str, Any] = {"query": query}
    if variables is not None or auth == "bearer":
        body["variables"] = variables  # runpodctl always sends the key, sometimes as null
    if auth == "bearer":
        return httpx.post(emulator.url, json=body, headers={"Authorization": f"Bearer {key}"})
    return httpx.post(f"{emulator.url}?api_key={key}", json=body)


def test_documented_pod_lifecycle_with_inline_literals_and_variables(
    graphql_emulator: RunPodEmulator,
) -> None:
    graphql_emulator.ready_after_polls = 1
    created = post(graphql_emulator, ON_DEMAND_CREATE, ON_DEMAND_VARIABLES).json()["data"]
    pod = created["podFindAndDeployOnDemand"]
    assert pod["desiredStatus"] == "RUNNING" and pod["costPerHr"] == 0.44
    assert pod["env"] == ["HCTL_RUN=42"]
    assert pod["machine"]["podHostId"].startswith(pod["id"] + "-")
    spot = post(graphql_emulator, SPOT_CREATE, auth="query").json()["data"]["podRentInterruptable"]
    assert spot["desiredStatus"] == "RUNNING"

    # runtime stays null for `ready_after_polls` reads, then maps port 22 to a public port.
    first = post(graphql_emulator, GET_POD % pod["id"]).json()["data"]["pod"]
    assert first["runtime"] is None
    second = post(graphql_emulator, GET_POD % pod["id"]).json()["data"]["pod"]
    (ssh,) = [port for port in second["runtime"]["ports"] if port["privatePort"] == 22]
    assert ssh["isIpPublic"] is True
    listed = post(graphql_emulator, LIST_PODS, auth="query").json()["data"]["myself"]["pods"]
    assert {entry["podType"] for entry in listed} == {"RESERVED", "INTERRUPTABLE"}

    stopped = post(graphql_emulator, STOP, {"podId": pod["id"]}).json()["data"]["podStop"]
    assert stopped == {"id": pod["id"], "desiredStatus": "EXITED"}
    assert post(graphql_emulator, GET_POD % pod["id"]).json()["data"]["pod"]["runtime"] is None
    resumed = post(graphql_emulator, RESUME % pod["id"]).json()["data"]["podResume"]
    assert resumed["desiredStatus"] == "RUNNING"
    post(graphql_emulator, GET_POD % pod["id"])  # the one poll that still shows it starting
    again = post(graphql_emulator, GET_POD % pod["id"]).json()["data"]["pod"]
    (new_ssh,) = [port for port in again["runtime"]["ports"] if port["privatePort"] == 22]
    assert new_ssh["publicPort"] != ssh["publicPort"]  # a reset pod gets a new public port

    # A spot pod cannot be resumed on demand, only with a bid.
    post(graphql_emulator, STOP, {"podId": spot["id"]})
    refused = post(graphql_emulator, RESUME % spot["id"]).json()
    assert refused["errors"][0]["message"] == "Cannot resume a spot pod as an on demand pod."
    bid = {"podId": spot["id"], "bidPerGpu": 0.3, "gpuCount": 1}
    assert (
        post(graphql_emulator, BID_RESUME, bid).json()["data"]["podBidResume"]["costPerHr"] == 0.3
    )

    assert post(graphql_emulator, TERMINATE % pod["id"]).json() == {"data": {"podTerminate": None}}
    assert post(graphql_emulator, GET_POD % pod["id"]).json()["data"]["pod"] is None
    assert [row["id"] for row in graphql_emulator.pods] == [spot["id"]]


def test_catalogue_user_and_keys_as_documented(graphql_emulator: RunPodEmulator) -> None:
    catalogue = post(graphql_emulator, GPU_TYPES, auth="query").json()["data"]["gpuTypes"]
    by_id = {entry["id"]: entry for entry in catalogue}
    assert by_id["NVIDIA GeForce RTX 4090"]["securePrice"] == 0.44
    assert by_id["unknown"]["securePrice"] is None  # RunPod's placeholder entry is there
    lowest = post(graphql_emulator, LOWEST_PRICE_INLINE).json()["data"]["gpuTypes"]
    assert lowest == [
        {
            "id": "NVIDIA RTX A4000",
            "lowestPrice": {
                "stockStatus": "High",
                "minimumBidPrice": 0.2,  # the secure cloud's spot price: secureCloud is true
                "uninterruptablePrice": 0.35,
                "availableGpuCounts": [1, 2, 4, 8],
                "minMemory": 31,
                "minVcpu": 6,
            },
        }
    ]
    both = post(
        graphql_emulator, LOWEST_PRICE_VARIABLES, {"input": {"gpuCount": 1, "secureCloud": None}}
    )
    none_free = [
        e["lowestPrice"]
        for e in both.json()["data"]["gpuTypes"]
        if e["lowestPrice"]["gpuTypeId"] == "NVIDIA H100 80GB HBM3"
    ]
    assert none_free[0]["uninterruptablePrice"] is None  # out of stock: prices null
    # RunPod's schema (as rebuilt from its introspection dump) has no root `dataCenters`.
    assert post(graphql_emulator, DATA_CENTERS, {}).status_code == 400

    graphql_emulator.pub_key = "ssh-ed25519 AAAAC3Nz... laptop"
    new_keys = "ssh-ed25519 AAAAC3Nz... laptop\n\nssh-ed25519 AAAAC3Nz... hctl"
    post(graphql_emulator, UPDATE_KEYS, {"input": {"pubKey": new_keys}})
    assert post(graphql_emulator, MYSELF).json()["data"]["myself"]["pubKey"] == new_keys


def test_errors_are_answered_as_runpod_answers_them(graphql_emulator: RunPodEmulator) -> None:
    assert post(graphql_emulator, MYSELF, key="wrong").status_code == 401
    assert httpx.post(graphql_emulator.url, json={"query": MYSELF}).status_code == 401
    assert post(graphql_emulator, "query { nope }").status_code == 400
    assert post(graphql_emulator, "query { myself { id ").status_code == 400
    # A variable of the wrong type is a validation error too (runpodctl#156 saw 400).
    assert post(graphql_emulator, STOP, {"podId": 5}).status_code == 400
    # RunPod's own types: env values are non-null, deadlines are DateTime (RFC 3339 with a zone).
    for field, value in (("env", [{"key": "A", "value": None}]), ("stopAfter", "in two hours"),
                         ("terminateAfter", "2026-11-30T14:00:00")):  # fmt: skip
        wrong = {"input": {**ON_DEMAND_VARIABLES["input"], field: value}}
        assert post(graphql_emulator, ON_DEMAND_CREATE, wrong).status_code == 400, field
    right = {"input": {**ON_DEMAND_VARIABLES["input"], "name": "dated",
                       "terminateAfter": "2026-11-30T14:00:00Z"}}  # fmt: skip
    assert post(graphql_emulator, ON_DEMAND_CREATE, right).status_code == 200
    assert graphql_emulator.pods[-1]["terminateAfter"] == "2026-11-30T14:00:00Z"
    invalid_gpu = {"input": {**ON_DEMAND_VARIABLES["input"], "gpuTypeId": "NVIDIA RTX 4090"}}
    answer = post(graphql_emulator, ON_DEMAND_CREATE, invalid_gpu)
    assert answer.status_code == 200
    assert answer.json() == {
        "errors": [
            {
                "message": CAPACITY_MESSAGE,
                "locations": answer.json()["errors"][0]["locations"],
                "path": ["podFindAndDeployOnDemand"],
                "extensions": {"code": "RUNPOD"},
            }
        ],
        "data": {"podFindAndDeployOnDemand": None},
    }
    graphql_emulator.inject_fault("rate_limited", retry_after=7)
    limited = post(graphql_emulator, MYSELF)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    graphql_emulator.inject_fault("server_error", status=503)
    assert post(graphql_emulator, MYSELF).status_code == 503
    graphql_emulator.inject_fault("something_went_wrong", operation="myself")
    vague = post(graphql_emulator, MYSELF).json()
    assert vague["errors"][0]["extensions"]["code"] == "INTERNAL_SERVER_ERROR"
    graphql_emulator.inject_fault("drop_after_apply", operation="podFindAndDeployOnDemand")
    with pytest.raises(httpx.RemoteProtocolError):
        post(graphql_emulator, ON_DEMAND_CREATE, ON_DEMAND_VARIABLES)
    assert [row["name"] for row in graphql_emulator.pods] == ["dated", "hctl-run-42"]  # applied
    assert post(graphql_emulator, MYSELF).status_code == 200  # and the server carries on


def test_runpod_python_sdk_drives_the_emulator(
    graphql_emulator: RunPodEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The SDK reads ~/.runpod/config.toml at import (HOME is a temporary folder here) and
    # RUNPOD_API_BASE_URL on every call.
    monkeypatch.setenv("RUNPOD_API_BASE_URL", graphql_emulator.base_url)
    runpod = pytest.importorskip("runpod", reason="RunPod's SDK comes with the dev extra")
    monkeypatch.setattr(runpod, "api_key", graphql_emulator.api_key)
    assert runpod.get_gpu("NVIDIA GeForce RTX 4090")["securePrice"] == 0.44
    with pytest.raises(ValueError):  # the SDK checks the id first; the emulator answers []
        runpod.get_gpu("NVIDIA RTX 4090")
    pod = runpod.create_pod(
        "sdk-pod", "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404", "NVIDIA GeForce RTX 4090",
        ports="22/tcp", env={"NOTE": "from the sdk"}, cloud_type="SECURE",
    )  # fmt: skip
    assert runpod.get_pod(pod["id"])["desiredStatus"] == "RUNNING"
    assert runpod.stop_pod(pod["id"])["desiredStatus"] == "EXITED"
    assert runpod.resume_pod(pod["id"], 1)["desiredStatus"] == "RUNNING"
    assert [entry["id"] for entry in runpod.get_pods()] == [pod["id"]]
    runpod.update_user_settings("ssh-ed25519 AAAA sdk")
    assert runpod.get_user()["pubKey"] == "ssh-ed25519 AAAA sdk"
    runpod.terminate_pod(pod["id"])
    assert graphql_emulator.pods == []
    # Every request the SDK sent inlined its values: no variables at all.
    assert all(not request.variables for request in graphql_emulator.requests)


def test_the_emulator_script_takes_faults_from_its_command_line() -> None:
    """`scripts/runpod_emulator.py --fault KIND[:OPERATION[:TIMES[:STATUS]]]`, for trying hctl
    against a misbehaving RunPod by hand; a spec it cannot read is refused with the kinds."""
    from scripts.runpod_emulator import parse_fault

    assert parse_fault("server_error:stop:5:503") == {
        "kind": "server_error", "operation": "stop", "times": 5, "status": 503,
    }  # fmt: skip
    assert parse_fault("capacity") == {
        "kind": "capacity", "operation": None, "times": 1, "status": 500,
    }  # fmt: skip
    assert parse_fault("rate_limited:any:2")["operation"] is None
    for wrong in ("nope", "server_error:stop:many", "capacity:create:1:500:extra"):
        with pytest.raises(ValueError, match="KIND|whole numbers"):
            parse_fault(wrong)
