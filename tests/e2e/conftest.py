"""The end-to-end rig: the RunPod emulator whose pods are the sshd stand-in, the tiny model."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.standins.runpod_rest_emulator import RunPodRestEmulator
from tests.standins.sshd import SshdServer, stop_watchdog

TINY = str(REPO_ROOT / "tests" / "fixtures" / "tiny-refuser")
# Small worker settings keep a search to seconds on a CPU: no batch-size sweep, short replies.
FAST = ["--set", "batch_size=64", "--set", "max_response_length=12"]


@dataclass
class PodRig:
    emulator: RunPodRestEmulator
    sshd: SshdServer
    volume: Path

    def pod_statuses(self) -> dict[str, str]:
        return {pod["id"]: pod["status"] for pod in self.emulator.pods}


@pytest.fixture
def pod_rig(
    hctl_rest_env: RunPodRestEmulator, sshd_pod: SshdServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PodRig]:
    """Every pod the emulator creates is reached at the sshd stand-in; the volume is a folder."""
    hctl_rest_env.route_ssh(direct=(sshd_pod.host, sshd_pod.port))
    volume = sshd_pod.home / "workspace"
    volume.mkdir(exist_ok=True)
    monkeypatch.setenv("HCTL_SSH_KEY", str(sshd_pod.client_key_path))
    monkeypatch.setenv("HCTL_VOLUME_PATH", str(volume))
    # The stand-in pod is this machine: its worker is the development environment's.
    monkeypatch.setenv("HCTL_WORKER_PYTHON", sys.executable)
    monkeypatch.setenv("HCTL_FOLLOW_INTERVAL_S", "0.2")
    # The stand-in has no pod key (RUNPOD_API_KEY): its self-stop check ends at once, leaving
    # nothing behind.
    monkeypatch.setenv("HCTL_SELF_STOP_GRACE_S", "0")
    yield PodRig(emulator=hctl_rest_env, sshd=sshd_pod, volume=volume)
    # REST pods keep their lease with a watchdog on the pod; a stopped stand-in does not end it.
    stop_watchdog(volume / "hctl")


@pytest.fixture
def proxy_pod_rig(
    pod_rig: PodRig, sshd_proxy: SshdServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PodRig]:
    """Pods reachable only through the PTY-only proxy stand-in: the direct port refuses."""
    with socket.socket() as probe:  # a port nothing listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    pod_rig.emulator.route_ssh(direct=("127.0.0.1", closed_port), pod_host_id=sshd_proxy.user)
    monkeypatch.setenv("HCTL_SSH_PROXY_HOST", sshd_proxy.host)
    monkeypatch.setenv("HCTL_SSH_PROXY_PORT", str(sshd_proxy.port))
    volume = sshd_proxy.home / "workspace"
    volume.mkdir(exist_ok=True)
    monkeypatch.setenv("HCTL_VOLUME_PATH", str(volume))
    yield PodRig(emulator=pod_rig.emulator, sshd=sshd_proxy, volume=volume)
    stop_watchdog(volume / "hctl")
