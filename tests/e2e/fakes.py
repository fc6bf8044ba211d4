"""Small stand-ins for the provider and remote boundaries, shared by the run tests.

They refuse surprises: an unknown pod id, a call on a closed remote, or an unexpected method
raises at once instead of returning something plausible.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from hctl.errors import ConnectionLostError, PodNotFoundError, RemoteError
from hctl.providers.base import Capabilities, GpuType, Pod, PodSpec, PodStatus, PriceOffer
from hctl.remote.base import CommandResult, OutputCallback


def catalogue_gpu(
    gpu_id: str,
    name: str,
    memory_gb: int,
    secure: float | None = None,
    community: float | None = None,
    stock: str | None = None,
) -> GpuType:
    """A GPU type offered on demand in each cloud that has a price, with `stock` in both."""
    offers = [
        PriceOffer(cloud=cloud, price_per_gpu_hour=price, stock=stock)  # type: ignore[arg-type]
        for cloud, price in (("SECURE", secure), ("COMMUNITY", community))
        if price is not None
    ]
    return GpuType(id=gpu_id, display_name=name, memory_gb=memory_gb, offers=offers)


CATALOGUE = [
    catalogue_gpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, 0.34, "high"),
    catalogue_gpu("NVIDIA GeForce RTX 3090", "RTX 3090", 24, 0.43, 0.22, "medium"),
    catalogue_gpu("NVIDIA RTX A6000", "RTX A6000", 48, 0.76, 0.49, "low"),
    catalogue_gpu("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.64, 1.19, "high"),
    catalogue_gpu("NVIDIA H200", "H200 SXM", 141),
]


class FakeProvider:
    """An in-memory provider; pods become ready when `ready` says so."""

    name = "fake"
    capabilities = Capabilities(lease=True)

    def __init__(self, catalogue: list[GpuType] | None = None) -> None:
        self.catalogue = list(catalogue or CATALOGUE)
        self.pods: dict[str, Pod] = {}
        self.specs: list[PodSpec] = []
        self._next = 0

    def gpu_types(self) -> list[GpuType]:
        return list(self.catalogue)

    def create(self, spec: PodSpec) -> Pod:
        self.specs.append(spec)
        self._next += 1
        gpu = next(gpu for gpu in self.catalogue if gpu.id == spec.gpu_type_id)
        pod = Pod(
            id=f"pod{self._next}",
            name=spec.name,
            status=PodStatus.RUNNING,
            gpu_type_id=spec.gpu_type_id,
            cost_per_hr=gpu.price(spec.cloud_type, spec.spot) or 0.0,
        )
        self.pods[pod.id] = pod
        return pod

    def get(self, pod_id: str) -> Pod:
        if pod_id not in self.pods:
            raise PodNotFoundError(f"No pod {pod_id!r}.")
        return self.pods[pod_id]

    def list(self) -> list[Pod]:
        return list(self.pods.values())

    def start(self, pod_id: str) -> Pod:
        pod = self.get(pod_id).model_copy(update={"status": PodStatus.RUNNING})
        self.pods[pod_id] = pod
        return pod

    def stop(self, pod_id: str) -> Pod:
        pod = self.get(pod_id).model_copy(update={"status": PodStatus.STOPPED})
        self.pods[pod_id] = pod
        return pod

    def terminate(self, pod_id: str) -> None:
        self.get(pod_id)
        del self.pods[pod_id]

    def self_stop_command(self, action: str) -> str | None:
        return None

    def billed(self, pod_ids: list[str], since: object) -> dict[str, float] | None:
        return None


class ShellRemote:
    """Runs commands with bash on this machine; can drop the connection on chosen calls."""

    description = "shell"

    def __init__(self, fail_on: Callable[[str], bool] | None = None) -> None:
        self.fail_on = fail_on
        self.closed = False
        self.commands: list[str] = []

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> CommandResult:
        if self.closed:
            raise RemoteError("run on a closed remote")
        self.commands.append(command)
        if self.fail_on is not None and self.fail_on(command):
            raise ConnectionLostError("the connection dropped")
        completed = subprocess.run(
            ["bash", "-c", command], capture_output=True, timeout=timeout or 60, check=False
        )
        output = completed.stdout.decode("utf-8", "replace")
        if on_output is not None and output:
            on_output(output)
        return CommandResult(
            exit_code=completed.returncode,
            output=output,
            stderr=completed.stderr.decode("utf-8", "replace"),
        )

    def put(self, local_path: Path, remote_path: str) -> None:
        Path(remote_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, remote_path)

    def get(self, remote_path: str, local_path: Path) -> None:
        if not Path(remote_path).is_file():
            raise RemoteError(f"no file {remote_path}")
        shutil.copyfile(remote_path, local_path)

    def close(self) -> None:
        self.closed = True
