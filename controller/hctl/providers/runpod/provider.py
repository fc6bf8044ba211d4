"""RunPod as a `Provider`: pods and GPU types over RunPod's GraphQL API.

Nothing outside this package knows the API is GraphQL (it retires in 2027; REST v2 can replace
this module behind the same protocol). RunPod's answers become `hctl.providers.base` models here.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from hctl.errors import ApiError, CapacityError, PodNotFoundError, ProviderError
from hctl.providers.base import GpuType, Pod, PodSpec, SshEndpoint
from hctl.providers.runpod import queries
from hctl.providers.runpod.client import GraphQLClient, RateLimitedError, Sleep
from hctl.settings import Settings

NOT_ENOUGH_GPUS_ON_HOST = "not enough free gpus on the host machine"


class RunPodProvider:
    """Pods on RunPod. Every method raises `hctl.errors.ProviderError` subclasses only."""

    name = "runpod"

    def __init__(
        self,
        settings: Settings,
        *,
        sleep: Sleep = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        key = settings.runpod_api_key.get_secret_value() if settings.runpod_api_key else None
        self.settings = settings
        self._client = GraphQLClient(
            settings.runpod_api_url,
            key,
            timeout_s=settings.api_timeout_s,
            retries=settings.api_retries,
            backoff_s=settings.api_backoff_s,
            sleep=sleep,
            transport=transport,
        )
        self._sleep = sleep

    def close(self) -> None:
        self._client.close()

    # --- catalogue ---------------------------------------------------------------------------

    def gpu_types(self) -> list[GpuType]:
        data = self._client.execute(queries.GPU_TYPES, {"lowest": {"gpuCount": 1}}, retry="always")
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
        """Create a pod; a lost answer never leads to a second, billing pod.

        Before sending the create again after a failure that may have happened after RunPod
        acted on it (network error, 5xx, "Something went wrong"), look for a pod with the spec's
        name (hctl's names are unique) and return it if it is there.
        """
        mutation, field, variables = self._create_request(spec)
        attempt = 0
        while True:
            try:
                data = self._client.execute(mutation, variables, retry="rate_limit_only")
                return self._pod(data[field])
            except CapacityError:
                raise self._capacity_error(spec) from None
            except ProviderError as error:
                # The client has already waited out 429s as long as it should.
                if not error.retryable or isinstance(error, RateLimitedError):
                    raise
                existing = self._find_by_name(spec.name)
                if existing is not None:
                    return existing
                if attempt >= self.settings.api_retries:
                    raise
                self._sleep(self.settings.api_backoff_s * 2**attempt)
                attempt += 1

    def start(self, pod_id: str) -> Pod:
        pod = self.get(pod_id)
        if pod.status == "RUNNING":
            return pod
        try:
            if pod.spot:
                bid = pod.cost_per_hr / max(pod.gpu_count, 1)
                variables = {"podId": pod_id, "bidPerGpu": bid, "gpuCount": pod.gpu_count}
                self._client.execute(queries.BID_RESUME_POD, variables, retry="always")
            else:
                variables = {"podId": pod_id, "gpuCount": pod.gpu_count}
                self._client.execute(queries.RESUME_POD, variables, retry="always")
        except ApiError as error:
            if NOT_ENOUGH_GPUS_ON_HOST in error.message.lower():
                raise CapacityError(
                    f"Pod {pod_id} cannot start: its machine has no free GPU right now.",
                    "A stopped pod is tied to its machine. Try again later, or terminate it and "
                    "create a new pod (the volume's contents are lost).",
                ) from None
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
        if spec.terminate_after is not None:
            given["terminateAfter"] = spec.terminate_after.isoformat()
        if spec.stop_after is not None:
            given["stopAfter"] = spec.stop_after.isoformat()
        if spec.spot:
            given["bidPerGpu"] = spec.bid_per_gpu
            return queries.CREATE_SPOT_POD, "podRentInterruptable", {"input": given}
        return queries.CREATE_POD, "podFindAndDeployOnDemand", {"input": given}

    def _find_by_name(self, name: str) -> Pod | None:
        try:
            pods = self.list()
        except ProviderError:
            return None
        return next((pod for pod in pods if pod.name == name), None)

    def _capacity_error(self, spec: PodSpec) -> ProviderError:
        """RunPod's capacity message, made useful: what is in stock instead, at what price."""
        from hctl.pods import find_gpu_type  # below the CLI, provider-independent

        try:
            catalogue = self.gpu_types()
        except ProviderError:
            return CapacityError(f"No {spec.gpu_type_id} is free on RunPod right now.")
        # RunPod gives the same message for a GPU id it does not know.
        gpu = find_gpu_type(catalogue, spec.gpu_type_id)
        in_stock = sorted(
            (
                other
                for other in catalogue
                if other.stock_status and other.id != gpu.id and other.price(spec.cloud_type)
            ),
            key=lambda other: other.price(spec.cloud_type) or 0.0,
        )
        where = {"SECURE": " in secure cloud", "COMMUNITY": " in community cloud"}.get(
            spec.cloud_type, ""
        )
        if not in_stock:
            return CapacityError(
                f"No {gpu.display_name} is free on RunPod{where} right now, and no other GPU "
                "type is in stock either.",
                "Try again in a few minutes.",
            )
        offers = ", ".join(
            f"{other.display_name} {other.memory_gb} GB ${other.price(spec.cloud_type):.2f}/h"
            for other in in_stock[:5]
        )
        return CapacityError(
            f"No {gpu.display_name} is free on RunPod{where} right now. In stock: {offers}.",
            f'Create one of those instead, e.g. `hctl create-pod "{in_stock[0].id}"`'
            + ("" if spec.cloud_type == "ALL" else ", or try `--cloud ALL`")
            + ".",
        )

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
        return Pod(
            id=data["id"],
            name=data.get("name") or data["id"],
            status=data.get("desiredStatus") or "UNKNOWN",
            gpu_type_id=machine.get("gpuTypeId"),
            gpu_display_name=machine.get("gpuDisplayName"),
            gpu_count=data.get("gpuCount") or 1,
            cost_per_hr=data.get("costPerHr") or 0.0,
            image=data.get("imageName") or "",
            container_disk_gb=data.get("containerDiskInGb"),
            volume_gb=data.get("volumeInGb"),
            volume_mount_path=data.get("volumeMountPath"),
            env=env,
            pod_host_id=host_id,
            uptime_seconds=(runtime or {}).get("uptimeInSeconds"),
            ready=runtime is not None and ssh_port is not None,
            ssh=endpoints,
            spot=data.get("podType") in ("INTERRUPTABLE", "BID"),
            last_status_change=data.get("lastStatusChange"),
        )


def _gpu_type(entry: dict[str, Any]) -> GpuType:
    lowest = entry.get("lowestPrice") or {}
    stock = lowest.get("stockStatus")
    return GpuType(
        id=entry["id"],
        display_name=entry.get("displayName") or entry["id"],
        memory_gb=entry.get("memoryInGb") or 0,
        secure_price=entry.get("securePrice") or None,
        community_price=entry.get("communityPrice") or None,
        secure_spot_price=entry.get("secureSpotPrice") or None,
        community_spot_price=entry.get("communitySpotPrice") or None,
        stock_status=stock if stock and stock != "None" else None,
        max_gpu_count=entry.get("maxGpuCount"),
    )
