"""RunPod over its GraphQL API (`provider = "runpod-graphql"`), kept for what only it offers.

RunPod retires this API early 2027. Until then it is the only way to rent spot pods, and the
only one with a deadline RunPod enforces itself (`stopAfter` / `terminateAfter`). RunPod's
answers become `hctl.providers.base` models here.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import httpx

from hctl.errors import ApiError, CapacityError, PodNotFoundError, ProviderError
from hctl.providers.base import (
    Capabilities,
    GpuType,
    GpuUse,
    LeaseAction,
    Pod,
    PodSpec,
    PodStatus,
    PriceOffer,
    SshEndpoint,
)
from hctl.providers.runpod import common, queries
from hctl.providers.runpod.graphql import GraphQLClient
from hctl.providers.runpod.http import ApiHttp, Sleep
from hctl.settings import Settings

# RunPod's PodStatus; RUNNING with no runtime yet is still starting (see `_status`).
STATUS = {
    "CREATED": PodStatus.STARTING,
    "RESTARTING": PodStatus.STARTING,
    "RUNNING": PodStatus.RUNNING,
    "EXITED": PodStatus.STOPPED,
    "PAUSED": PodStatus.STOPPED,
    "DEAD": PodStatus.FAILED,
    "TERMINATED": PodStatus.TERMINATED,
}
STOCK = {"High": "high", "Medium": "medium", "Low": "low"}


def deadline_text(moment: datetime) -> str:
    """RFC 3339 in whole seconds with `Z`, as RunPod's `DateTime` takes it (runpodctl's form)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunPodGraphQLProvider:
    """Pods on RunPod through GraphQL. Every method raises `hctl.errors.ProviderError` only."""

    name = "runpod-graphql"
    capabilities = Capabilities(
        spot=True,
        lease=True,
        spot_note=(
            "Spot pods exist only in RunPod's GraphQL API, which RunPod retires "
            f"{common.RETIREMENT}; this one is rented through it."
        ),
    )

    def __init__(
        self,
        settings: Settings,
        *,
        sleep: Sleep = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self._client = GraphQLClient(
            ApiHttp.for_settings(
                settings,
                settings.runpod_api_url,
                address_setting="HCTL_RUNPOD_API_URL",
                sleep=sleep,
                transport=transport,
            )
        )
        self._sleep = sleep

    def close(self) -> None:
        self._client.close()

    # --- catalogue ---------------------------------------------------------------------------

    def gpu_types(self) -> list[GpuType]:
        variables = {
            "secure": {"gpuCount": 1, "secureCloud": True},
            "community": {"gpuCount": 1, "secureCloud": False},
        }
        data = self._client.execute(queries.GPU_TYPES, variables, retry="always")
        return [
            _gpu_type(entry)
            for entry in data.get("gpuTypes") or []
            # RunPod's catalogue holds a placeholder entry with the id "unknown".
            if entry and entry.get("id") and entry["id"] != "unknown"
        ]

    # --- pods --------------------------------------------------------------------------------

    def list(self) -> list[Pod]:
        data = self._client.execute(queries.LIST_PODS, retry="always")
        pods = (data.get("myself") or {}).get("pods") or []
        return [self._pod(entry) for entry in pods if entry]

    def get(self, pod_id: str) -> Pod:
        try:
            data = self._client.execute(queries.GET_POD, {"podId": pod_id}, retry="always")
        except ApiError as error:
            # RunPod answers an unknown id with null; an error saying so means the same.
            if any(text in error.message.lower() for text in ("not found", "does not exist")):
                raise PodNotFoundError(f"No pod with the id {pod_id!r}.") from None
            raise
        if not data.get("pod"):
            raise PodNotFoundError(f"No pod with the id {pod_id!r}.")
        return self._pod(data["pod"])

    def create(self, spec: PodSpec) -> Pod:
        mutation, field, variables = self._create_request(spec)

        def send() -> Pod:
            try:
                data = self._client.execute(
                    mutation, variables, retry="rate_limit_only", timeout_s=self._create_wait()
                )
            except CapacityError:
                raise common.capacity_error(self._catalogue(), spec) from None
            return self._pod(data[field])

        return common.create_once(
            send,
            self._find_by_name,
            spec,
            retries=self.settings.api_retries,
            grace_s=self.settings.create_grace_s,
            backoff_s=self.settings.api_backoff_s,
            sleep=self._sleep,
        )

    def start(self, pod_id: str) -> Pod:
        pod = self.get(pod_id)
        if pod.active:
            return pod
        try:
            if pod.spot:
                self._client.execute(
                    queries.BID_RESUME_POD, self._resume_bid(pod_id), retry="always"
                )
            else:
                variables = {"podId": pod_id, "gpuCount": pod.gpu_count}
                self._client.execute(queries.RESUME_POD, variables, retry="always")
        except ApiError as error:
            if common.NOT_ENOUGH_GPUS_ON_HOST in error.message.lower():
                raise common.host_has_no_gpu(pod_id) from None
            raise
        # Read it back: a resumed pod has new public ports, never reuse the old endpoints.
        return self.get(pod_id)

    def stop(self, pod_id: str) -> Pod:
        self.get(pod_id)
        self._client.execute(queries.STOP_POD, {"podId": pod_id}, retry="always")
        return self.get(pod_id)

    def terminate(self, pod_id: str) -> None:
        self.get(pod_id)
        try:
            self._client.execute(queries.TERMINATE_POD, {"podId": pod_id}, retry="always")
        except ApiError:
            # An earlier attempt whose answer was lost may have terminated it already.
            try:
                self.get(pod_id)
            except PodNotFoundError:
                return
            raise

    def self_stop_command(self, action: LeaseAction) -> str | None:
        mutation = queries.STOP_POD if action == "stop" else queries.TERMINATE_POD
        body = {"query": " ".join(mutation.split()), "variables": {"podId": "{pod}"}}
        return common.self_stop_command(self.settings.runpod_api_url, "POST", body)

    def billed(self, pod_ids: list[str], since: datetime) -> dict[str, float] | None:
        return None  # GraphQL reports no bill per pod

    # --- account SSH keys --------------------------------------------------------------------

    def account_public_keys(self) -> str:
        """The account's SSH public keys: one string, one key per line (`myself.pubKey`)."""
        data = self._client.execute(queries.MY_PUBLIC_KEYS, retry="always")
        return (data.get("myself") or {}).get("pubKey") or ""

    def set_account_public_keys(self, keys: str) -> None:
        """Replace the account's whole key list (RunPod has no "add one key" call)."""
        self._client.execute(
            queries.UPDATE_PUBLIC_KEYS, {"input": {"pubKey": keys}}, retry="always"
        )

    # --- translation -------------------------------------------------------------------------

    def _create_wait(self) -> float:
        return max(self.settings.api_timeout_s, self.settings.create_timeout_s)

    def _create_request(self, spec: PodSpec) -> tuple[str, str, dict[str, Any]]:
        given: dict[str, Any] = {
            "name": spec.name,
            "imageName": spec.image,
            "gpuTypeId": spec.gpu_type_id,
            "gpuCount": spec.gpu_count,
            "cloudType": spec.cloud_type,
            "containerDiskInGb": spec.container_disk_gb,
            "volumeInGb": spec.volume_gb,
            "volumeMountPath": spec.volume_mount_path,
            "ports": ",".join(port.replace(" ", "") for port in spec.ports),
            "env": [{"key": key, "value": value} for key, value in spec.env.items()],
            "startSsh": spec.start_ssh,
            "supportPublicIp": spec.support_public_ip,
        }
        if spec.allowed_cuda_versions:
            given["allowedCudaVersions"] = list(spec.allowed_cuda_versions)
        if spec.global_networking:
            given["globalNetwork"] = True
        if spec.lease is not None:
            field = "terminateAfter" if spec.lease.action == "terminate" else "stopAfter"
            given[field] = deadline_text(spec.lease.until)
        if spec.spot:
            given.pop("globalNetwork", None)  # the spot input has no such field
            given["bidPerGpu"] = spec.bid_per_gpu
            return queries.CREATE_SPOT_POD, "podRentInterruptable", {"input": given}
        return queries.CREATE_POD, "podFindAndDeployOnDemand", {"input": given}

    def _resume_bid(self, pod_id: str) -> dict[str, Any]:
        data = self._client.execute(queries.SPOT_RESUME_PRICE, {"podId": pod_id}, retry="always")
        pod = data.get("pod") or {}
        bid = pod.get("lowestBidPriceToResume")
        if not bid:
            raise CapacityError(
                f"Spot pod {pod_id} cannot start: RunPod offers no spot capacity on its machine "
                "right now.",
                "Try again later, or terminate it and create a new pod.",
            )
        return {"podId": pod_id, "bidPerGpu": bid, "gpuCount": pod.get("gpuCount") or 1}

    def _catalogue(self) -> list[GpuType] | None:
        try:
            return self.gpu_types()
        except ProviderError:
            return None

    def _find_by_name(self, name: str) -> Pod | None:
        return next((pod for pod in self.list() if pod.name == name), None)

    def _pod(self, data: dict[str, Any]) -> Pod:
        machine = data.get("machine") or {}
        runtime = data.get("runtime")
        env = dict(entry.split("=", 1) for entry in data.get("env") or [] if entry and "=" in entry)
        ssh_port = next(
            (
                port
                for port in (runtime or {}).get("ports") or []
                if port and port.get("privatePort") == 22
            ),
            None,
        )
        endpoints: list[SshEndpoint] = []
        host_id = machine.get("podHostId")
        if host_id:
            endpoints.append(
                SshEndpoint(
                    kind="proxy",
                    user=host_id,
                    host=self.settings.ssh_proxy_host,
                    port=self.settings.ssh_proxy_port,
                )
            )
        if ssh_port and ssh_port.get("isIpPublic") and ssh_port.get("publicPort"):
            endpoints.append(
                SshEndpoint(
                    kind="direct", user="root", host=ssh_port["ip"], port=ssh_port["publicPort"]
                )
            )
        status = STATUS.get(data.get("desiredStatus") or "", PodStatus.FAILED)
        if status == PodStatus.RUNNING and runtime is None:
            status = PodStatus.STARTING  # RunPod says RUNNING long before the container is up
        secure = machine.get("secureCloud")
        return Pod(
            id=data["id"],
            name=data.get("name") or data["id"],
            status=status,
            gpu_type_id=machine.get("gpuTypeId"),
            gpu_display_name=machine.get("gpuDisplayName"),
            gpu_count=data.get("gpuCount") or 1,
            cost_per_hr=data.get("costPerHr") or 0.0,
            cloud={True: "SECURE", False: "COMMUNITY"}.get(secure),
            image=data.get("imageName") or "",
            container_disk_gb=data.get("containerDiskInGb"),
            volume_gb=data.get("volumeInGb"),
            volume_mount_path=data.get("volumeMountPath"),
            env=env,
            uptime_seconds=(runtime or {}).get("uptimeInSeconds"),
            ready=runtime is not None and ssh_port is not None,
            ssh=endpoints,
            gpus=[
                GpuUse(
                    utilisation_percent=gpu.get("gpuUtilPercent"),
                    memory_percent=gpu.get("memoryUtilPercent"),
                )
                for gpu in (runtime or {}).get("gpus") or []
                if gpu
            ],
            spot=data.get("podType") in ("INTERRUPTABLE", "BID"),
            created_at=_created_at(data.get("createdAt")),
        )


def _created_at(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None  # RunPod's free-text dates are not needed for anything essential
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _gpu_type(entry: dict[str, Any]) -> GpuType:
    offers = []
    for cloud, prefix in (("SECURE", "secure"), ("COMMUNITY", "community")):
        stock = STOCK.get(((entry.get(f"{prefix}Stock") or {}).get("stockStatus")) or "")
        for spot, field in ((False, f"{prefix}Price"), (True, f"{prefix}SpotPrice")):
            price = entry.get(field)
            if price:
                offers.append(
                    PriceOffer(cloud=cloud, spot=spot, price_per_gpu_hour=price, stock=stock)  # type: ignore[arg-type]
                )
    return GpuType(
        id=entry["id"],
        display_name=entry.get("displayName") or entry["id"],
        memory_gb=entry.get("memoryInGb") or 0,
        offers=offers,
        max_gpu_count=entry.get("maxGpuCount"),
    )
