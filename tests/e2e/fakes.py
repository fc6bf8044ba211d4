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
from hctl.providers.base import GpuType, Pod, PodSpec
from hctl.remote.base import CommandResult, OutputCallback

CATALOGUE = [
    GpuType(
        id="NVIDIA GeForce RTX 4090",
        display_name="RTX 4090",
        memory_gb=24,
        secure_price=0.69,
        community_price=0.34,
        stock_status="High",
    ),
    GpuType(
        id="NVIDIA GeForce RTX 3090",
        display_name="RTX 3090",
        memory_gb=24,
        secure_price=0.43,
        community_price=0.22,
        stock_status="Medium",
    ),
    GpuType(
        id="NVIDIA RTX A6000",
        display_name="RTX A6000",
        memory_gb=48,
        secure_price=0.76,
        community_price=0.49,
        stock_status="Low",
    ),
    GpuType(
        id="NVIDIA A100 80GB PCIe",
        display_name="A100 PCIe",
        memory_gb=80,
        secure_price=1.64,
        community_price=1.19,
        stock_status="High",
    ),
    GpuType(id="NVIDIA H200", display_name="H200 SXM", memory_gb=141, stock_status=None),
]


class FakeProvider:
    """An in-memory provider; pods become ready when `ready` says so."""

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
            status="RUNNING",
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
        pod = self.get(pod_id).model_copy(update={"status": "RUNNING"})
        self.pods[pod_id] = pod
        return pod

    def stop(self, pod_id: str) -> Pod:
        pod = self.get(pod_id).model_copy(update={"status": "EXITED"})
        self.pods[pod_id] = pod
        return pod

    def terminate(self, pod_id: str) -> None:
        self.get(pod_id)
        del self.pods[pod_id]


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
