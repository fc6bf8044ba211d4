"""The pieces a run is assembled from, gathered in one place so tests can swap any of them.

The defaults reach the real provider (RunPod), the real remotes (SSH, local) and the real
worker setup. Orchestration code only ever calls through a `Toolkit`, which keeps it testable
with small fakes and free of module-level state.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hctl.errors import ConfigError, JobError
from hctl.providers.base import Pod, Provider
from hctl.remote.base import Remote
from hctl.services.jobs import JobRecord, JobStore
from hctl.settings import Settings

# Connect to the machine of a job: a pod id, an ssh:// address, or this machine.
Connector = Callable[[JobRecord], Remote]


@dataclass
class WorkerHandle:
    """How to run the worker on a machine: its command and the environment to export."""

    command: str  # e.g. `hctl-worker` or `/workspace/hctl/venv/bin/hctl-worker`
    environment: dict[str, str] = field(default_factory=dict)  # e.g. HF_HOME on the volume


# Make sure the worker of the controller's exact version is installed there.
WorkerInstaller = Callable[[Remote], WorkerHandle]
PodWaiter = Callable[[Provider, str], Pod]
PodResolver = Callable[[Provider, str], Pod]


@dataclass
class Toolkit:
    settings: Settings
    provider_factory: Callable[[], Provider]
    connect: Connector
    ensure_worker: WorkerInstaller
    wait_until_ready: PodWaiter
    resolve_pod: PodResolver
    store: JobStore = field(default_factory=JobStore)
    hub_client: httpx.Client | None = None  # the Hugging Face hub's API (None: a fresh client)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    _provider: Provider | None = None

    def provider(self) -> Provider:
        """The provider, made on first use (so `--on local` never needs an API key)."""
        if self._provider is None:
            self._provider = self.provider_factory()
        return self._provider


def local_worker_command() -> str:
    """The worker installed beside this controller (same environment, same version)."""
    beside = Path(sys.executable).with_name("hctl-worker")
    if beside.is_file():
        return shlex.quote(str(beside))
    found = shutil.which("hctl-worker")
    if found:
        return shlex.quote(found)
    raise JobError(
        "The worker (hctl-worker) is not installed on this machine.",
        "Install it with: pip install 'hctl[worker]'",
    )


# The worker extra's libraries (pyproject.toml's `worker`) that hctl-worker imports to search.
WORKER_LIBRARIES = ("torch", "transformers", "accelerate", "optuna", "safetensors")


def check_local_worker() -> None:
    """Refuse `--on local` before any job exists when the worker beside this controller (same
    Python environment) would stop at once for lack of its libraries: a laptop install."""
    if not Path(sys.executable).with_name("hctl-worker").is_file():
        return  # a worker found on PATH runs in another environment; it reports for itself
    missing = [name for name in WORKER_LIBRARIES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"--on local runs the worker in hctl's own Python environment, which lacks "
            f"{', '.join(missing)} (a laptop install has the controller only).",
            "Install the worker's libraries there (CPU torch first: pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu, then pip install 'hctl[worker]'), "
            "or run on a pod: leave out --on.",
        )


def default_toolkit(settings: Settings, **replacements: Any) -> Toolkit:
    """The real pieces: RunPod, SSH or local remotes, the worker installer."""
    from hctl import pods
    from hctl.providers import make_provider

    def provider_factory() -> Provider:
        return make_provider(settings)

    def connect(record: JobRecord) -> Remote:
        if record.target == "local":
            from hctl.remote.local import LocalRemote

            return LocalRemote()
        from hctl import targets

        return _connect(targets, toolkit, record)

    def ensure_worker(remote: Remote) -> WorkerHandle:
        if getattr(remote, "kind", None) == "local":
            return WorkerHandle(command=local_worker_command())
        from hctl import setup

        info = setup.ensure_worker(remote, settings)
        return WorkerHandle(command=info.command, environment=dict(info.environment))

    def wait_until_ready(provider: Provider, pod_id: str) -> Pod:
        return pods.wait_until_ready(
            provider,
            pod_id,
            timeout_s=settings.ready_timeout_s,
            interval_s=settings.ready_poll_interval_s,
            sleep=toolkit.sleep,
        )

    toolkit = Toolkit(
        settings=settings,
        provider_factory=provider_factory,
        connect=connect,
        ensure_worker=ensure_worker,
        wait_until_ready=wait_until_ready,
        resolve_pod=pods.resolve_pod,
    )
    for name, value in replacements.items():
        setattr(toolkit, name, value)
    return toolkit


def _connect(targets: Any, toolkit: Toolkit, record: JobRecord) -> Remote:
    """A Remote for the job's machine (a pod or an SSH host), through `hctl.targets`."""
    if record.target == "ssh":
        return targets.resolve_target(record.address, toolkit.settings)
    return targets.resolve_target(
        record.pod_id, toolkit.settings, provider=toolkit.provider(), pod_id=True
    )
