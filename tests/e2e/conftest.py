"""The end-to-end rig: the RunPod emulator whose pods are the sshd stand-in, the tiny model."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.standins.runpod_emulator import RunPodEmulator
from tests.standins.sshd import SshdServer

TINY = str(REPO_ROOT / "tests" / "fixtures" / "tiny-refuser")
# Small worker settings keep a search to seconds on a CPU: no batch-size sweep, short replies.
FAST = ["--set", "batch_size=64", "--set", "max_response_length=12"]


@dataclass
class PodRig:
    emulator: RunPodEmulator
    sshd: SshdServer
    volume: Path

    def pod_statuses(self) -> dict[str, str]:
        return {pod["id"]: pod["status"] for pod in self.emulator.pods}


@pytest.fixture
def pod_rig(
    hctl_runpod_env: RunPodEmulator, sshd_pod: SshdServer, monkeypatch: pytest.MonkeyPatch
) -> PodRig:
    """Every pod the emulator creates is reached at the sshd stand-in; the volume is a folder."""
    hctl_runpod_env.route_ssh(direct=(sshd_pod.host, sshd_pod.port))
    volume = sshd_pod.home / "workspace"
    volume.mkdir(exist_ok=True)
    monkeypatch.setenv("HCTL_SSH_KEY", str(sshd_pod.client_key_path))
    monkeypatch.setenv("HCTL_VOLUME_PATH", str(volume))
    # The stand-in pod is this machine: its worker is the development environment's.
    monkeypatch.setenv("HCTL_WORKER_PYTHON", sys.executable)
    monkeypatch.setenv("HCTL_FOLLOW_INTERVAL_S", "0.2")
    return PodRig(emulator=hctl_runpod_env, sshd=sshd_pod, volume=volume)
