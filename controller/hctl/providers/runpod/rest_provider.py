"""RunPod over its REST API v2 (`provider = "runpod"`, the default; GA since 2026-08-18).

REST v2 has no spot pods and no deadline RunPod enforces: a pod's lease is kept by the pod
itself (`hctl.watchdog`, which runs `self_stop_command`). It adds what GraphQL lacks: GPU use
without SSH (`Pod.gpus`) and what each pod was really billed (`billed`). RunPod's answers
become `hctl.providers.base` models here.
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
from hctl.providers.runpod import common
from hctl.providers.runpod.http import ApiHttp, Sleep
from hctl.providers.runpod.rest import RestClient
from hctl.settings import DEFAULT_SSH_PROXY_HOST, Settings

STATUS = {
    "PROVISIONING": PodStatus.STARTING,
    "STARTING": PodStatus.STARTING,
    "RUNNING": PodStatus.RUNNING,
    "EXITED": PodStatus.STOPPED,
    "ERROR": PodStatus.FAILED,
    "TERMINATED": PodStatus.TERMINATED,
}
STOCK = {"HIGH": "high", "MEDIUM": "medium", "LOW": "low"}
CLOUDS = ("SECURE", "COMMUNITY")


class RunPodRestProvider:
    """Pods on RunPod through REST v2. Every method raises `hctl.errors.ProviderError` only."""

    name = "runpod"
    capabilities = Capabilities(
        spot=False,
        lease=False,
        billing=True,
        no_spot_hint=(
            "Spot pods exist only in RunPod's GraphQL API, which RunPod retires "
            f"{common.RETIREMENT}: run it with HCTL_PROVIDER=runpod-graphql (or `hctl config "
            "set provider runpod-graphql`)."
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
        self._client = RestClient(
            ApiHttp.for_settings(
                settings,
                settings.runpod_rest_url,
                address_setting="HCTL_RUNPOD_REST_URL",
                sleep=sleep,
                transport=transport,
            )
        )
        self._sleep = sleep

    def close(self) -> None:
        self._client.close()

    # --- catalogue ---------------------------------------------------------------------------

    def gpu_types(self) -> list[GpuType]:
        """The catalogue with each cloud's price and stock (stock is read once per cloud)."""
        by_cloud = {
            cloud: self._client.call(
                "GET",
                "/v2/catalog/gpus",
                retry="always",
                params={"include": "AVAILABILITY", "product": "POD", "cloud": cloud},
            ).get("gpus")
            or []
            for cloud in CLOUDS
        }
        stock = {
            (cloud, entry.get("id")): STOCK.get(entry.get("availability") or "")
            for cloud, entries in by_cloud.items()
            for entry in entries
        }
        cuda: dict[str, set[str]] = {}
        for entries in by_cloud.values():
            for entry in entries:
                for version in entry.get("cudaVersions") or []:
                    cuda.setdefault(entry["id"], set()).add(version["version"])
        return [
            _gpu_type(entry, stock, sorted(cuda.get(entry["id"], ())))
            for entry in by_cloud["SECURE"]
            if entry.get("id")
        ]

    # --- pods --------------------------------------------------------------------------------

    def list(self) -> list[Pod]:
        data = self._client.call("GET", "/v2/pods", retry="always")
        return [self._pod(entry) for entry in (data or {}).get("pods") or [] if entry]

    def get(self, pod_id: str) -> Pod:
        data = self._client.call("GET", f"/v2/pods/{pod_id}", retry="always", pod_id=pod_id)
        return self._pod(data)

    def create(self, spec: PodSpec) -> Pod:
        if spec.spot:
            raise ApiError("RunPod's REST API has no spot pods.", self.capabilities.no_spot_hint)
        body = self._create_body(spec)

        def send() -> Pod:
            try:
                data = self._client.call(
                    "POST", "/v2/pods", retry="rate_limit_only", json=body,
                    timeout_s=max(self.settings.api_timeout_s, self.settings.create_timeout_s),
                )  # fmt: skip
            except CapacityError:
                raise common.capacity_error(self._catalogue(), spec) from None
            return self._pod(data)

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
            self._action(pod_id, "start")
        except ApiError as error:
            if common.NOT_ENOUGH_GPUS_ON_HOST in error.message.lower():
                raise common.host_has_no_gpu(pod_id) from None
            raise
        # Read it back: a started pod has new public ports, never reuse the old endpoints.
        return self.get(pod_id)

    def stop(self, pod_id: str) -> Pod:
        pod = self.get(pod_id)
        if pod.stopped:
            return pod
        self._action(pod_id, "stop")
        return self.get(pod_id)

    def terminate(self, pod_id: str) -> None:
        self.get(pod_id)
        try:
            self._client.call("DELETE", f"/v2/pods/{pod_id}", retry="always", pod_id=pod_id)
        except (PodNotFoundError, ApiError):
            # An earlier attempt whose answer was lost may have terminated it already.
            try:
                self.get(pod_id)
            except PodNotFoundError:
                return
            raise

    def self_stop_command(self, action: LeaseAction) -> str | None:
        url = f"{self.settings.runpod_rest_url.rstrip('/')}/v2/pods/{{pod}}/action"
        return common.self_stop_command(url, "POST", {"action": action})

    def billed(self, pod_ids: list[str], since: datetime) -> dict[str, float] | None:
        """What RunPod billed each pod since `since`, from `/v2/billing/pods` (day buckets)."""
        params: dict[str, Any] = {
            "bucketSize": "day",
            "startTime": since.astimezone(timezone.utc).strftime("%Y-%m-%dT00:00:00Z"),
        }
        if len(pod_ids) == 1:
            params["podId"] = pod_ids[0]
        data = self._client.call("GET", "/v2/billing/pods", retry="always", params=params)
        totals = dict.fromkeys(pod_ids, 0.0)
        for record in (data or {}).get("records") or []:
            if record.get("podId") in totals:
                totals[record["podId"]] += float(record.get("totalAmount") or 0.0)
        return totals

    # --- account SSH keys --------------------------------------------------------------------

    def account_public_keys(self) -> str:
        """The account's SSH public keys, one per line."""
        data = self._client.call("GET", "/v2/account/ssh-keys", retry="always")
        return "\n".join((data or {}).get("keys") or [])

    def set_account_public_keys(self, keys: str) -> None:
        """Replace the account's whole key list (a complete replacement, as RunPod's is)."""
        lines = [line.strip() for line in keys.splitlines() if line.strip()]
        self._client.call("PUT", "/v2/account/ssh-keys", retry="always", json={"keys": lines})

    # --- translation -------------------------------------------------------------------------

    def _action(self, pod_id: str, action: str) -> None:
        self._client.call(
            "POST", f"/v2/pods/{pod_id}/action", retry="always", json={"action": action},
            pod_id=pod_id,
        )  # fmt: skip

    def _create_body(self, spec: PodSpec) -> dict[str, Any]:
        gpu: dict[str, Any] = {"id": spec.gpu_type_id, "count": spec.gpu_count}
        if spec.allowed_cuda_versions:
            gpu["allowedCudaVersions"] = list(spec.allowed_cuda_versions)
        body: dict[str, Any] = {
            "name": spec.name,
            "image": spec.image,
            "gpu": gpu,
            "disk": spec.container_disk_gb,
            "ports": [port.replace(" ", "") for port in spec.ports],
            "env": dict(spec.env),
            "startSsh": spec.start_ssh,
        }
        if spec.cloud_type != "ALL":  # REST has no "either": RunPod then takes SECURE
            body["cloud"] = spec.cloud_type
        if spec.volume_gb:
            body["mounts"] = {
                "persistent": {"size": spec.volume_gb, "path": spec.volume_mount_path}
            }
        if spec.global_networking:
            body["globalNetworking"] = True
        return body

    def _catalogue(self) -> list[GpuType] | None:
        try:
            return self.gpu_types()
        except ProviderError:
            return None

    def _find_by_name(self, name: str) -> Pod | None:
        return next((pod for pod in self.list() if pod.name == name), None)

    def _proxy(self, endpoint: dict[str, Any]) -> SshEndpoint:
        # A proxy set in hctl's settings (a test stand-in, a relay) wins over RunPod's.
        if self.settings.ssh_proxy_host != DEFAULT_SSH_PROXY_HOST:
            host, port = self.settings.ssh_proxy_host, self.settings.ssh_proxy_port
        else:
            host, port = endpoint.get("host") or DEFAULT_SSH_PROXY_HOST, endpoint.get("port") or 22
        return SshEndpoint(kind="proxy", user=endpoint["username"], host=host, port=port)

    def _pod(self, data: dict[str, Any]) -> Pod:
        runtime = data.get("runtime") or {}
        ssh = data.get("ssh") or {}
        endpoints = []
        if ssh.get("proxy"):
            endpoints.append(self._proxy(ssh["proxy"]))
        direct = ssh.get("direct")
        if direct:
            endpoints.append(
                SshEndpoint(
                    kind="direct", user=direct["username"], host=direct["host"], port=direct["port"]
                )
            )
        status = STATUS.get(data.get("status") or "", PodStatus.FAILED)
        ssh_mapped = any(port.get("private") == 22 for port in runtime.get("ports") or [])
        gpu = data.get("gpu") or {}
        persistent = (data.get("mounts") or {}).get("persistent") or {}
        return Pod(
            id=data["id"],
            name=data.get("name") or data["id"],
            status=status,
            gpu_type_id=gpu.get("id"),
            gpu_count=gpu.get("count") or 1,
            cost_per_hr=data.get("cost") or 0.0,
            cloud=data.get("cloud"),
            image=data.get("image") or "",
            container_disk_gb=data.get("disk"),
            volume_gb=persistent.get("size"),
            volume_mount_path=persistent.get("path"),
            env=dict(data.get("env") or {}),
            uptime_seconds=runtime.get("uptime"),
            ready=status == PodStatus.RUNNING and ssh_mapped,
            ssh=endpoints,
            gpus=[
                GpuUse(utilisation_percent=item.get("util"), memory_percent=item.get("memoryUtil"))
                for item in runtime.get("gpus") or []
            ],
            created_at=_moment(data.get("createdAt")),
        )


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _gpu_type(
    entry: dict[str, Any], stock: dict[tuple[str, str], Any], cuda_versions: list[str]
) -> GpuType:
    price = entry.get("price") or {}
    offers = [
        PriceOffer(
            cloud=cloud,  # type: ignore[arg-type]
            price_per_gpu_hour=price[cloud.lower()],
            stock=stock.get((cloud, entry["id"])),
        )
        for cloud in CLOUDS
        if entry.get(cloud.lower()) and price.get(cloud.lower())
    ]
    max_count = entry.get("maxCount") or {}
    return GpuType(
        id=entry["id"],
        display_name=entry.get("name") or entry["id"],
        memory_gb=entry.get("memory") or 0,
        offers=offers,
        max_gpu_count=max(max_count.values(), default=None) if max_count else None,
        cuda_versions=cuda_versions,
    )
