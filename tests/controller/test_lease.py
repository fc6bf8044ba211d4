"""The pod's own deadline (`hctl.watchdog`): the rule, then the real thing on the sshd stand-in
pod calling the REST v2 emulator with the pod's own key, with nothing of hctl running on the
laptop side once it is armed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from hctl import watchdog
from hctl.providers.base import PodLease, PodSpec
from hctl.providers.runpod import RunPodRestProvider
from hctl.services import lease
from hctl.settings import load_settings
from hctl.targets import connect_address, parse_target
from tests.standins.runpod_rest_emulator import RunPodRestEmulator
from tests.standins.sshd import SshdServer, make_sshd, stop_watchdog


def test_progress_moves_the_deadline_but_never_earlier(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    rule = {"until": 1000.0, "command": "true", "extend_s": 300, "watch": [str(events)]}
    assert watchdog.deadline(rule, now=500) == (1000.0, None)  # no progress yet
    events.write_text("{}\n")
    os.utime(events, (900, 900))
    assert watchdog.deadline(rule, now=950) == (1200.0, 900)  # progress at 900 → 900 + 300
    os.utime(events, (100, 100))
    assert watchdog.deadline(rule, now=950)[0] == 1000.0  # old progress: the lease stands
    os.utime(events, (10**9, 10**9))
    assert watchdog.deadline(rule, now=950)[0] == 1250.0  # a future date counts as now


def test_the_watchdog_acts_once_at_the_deadline_and_not_for_an_expired_lease(
    tmp_path: Path,
) -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    lease_file = tmp_path / "lease.json"
    marker = tmp_path / "stopped"
    lease_file.write_text(json.dumps({"until": 100, "command": f"echo >> {marker}", "poll_s": 30}))
    assert watchdog.Watchdog(lease_file, clock=lambda: clock[0], sleep=sleep).run() == 0
    assert marker.read_text() == "\n" and clock[0] == pytest.approx(100)
    log = [json.loads(line) for line in (tmp_path / "watchdog.log").read_text().splitlines()]
    assert [entry["event"] for entry in log] == ["start", "deadline", "acting", "done"]
    # Started after its deadline (a pod started again by hand): someone wants it now.
    assert watchdog.Watchdog(lease_file, clock=lambda: 500.0, sleep=sleep).run() == 0
    assert marker.read_text() == "\n"


def test_the_watchdog_source_needs_only_the_standard_library(tmp_path: Path) -> None:
    """It is uploaded as one file and run by whatever python3 a pod image has."""
    script = tmp_path / "watchdog.py"
    script.write_text(Path(watchdog.__file__).read_text())
    lease_file = tmp_path / "lease.json"
    lease_file.write_text(json.dumps({"until": time.time() - 10, "command": "false"}))
    done = subprocess.run([sys.executable, "-I", "-S", str(script), str(lease_file)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr  # -S: no site-packages at all
    assert "expired-before-start" in (tmp_path / "watchdog.log").read_text()


@pytest.fixture
def pod_with_credentials(tmp_path: Path, rest_emulator: RunPodRestEmulator):  # noqa: ANN201
    """A pod created on the REST emulator whose stand-in (its own sshd) carries the pod's own
    RUNPOD_POD_ID and pod-scoped RUNPOD_API_KEY, as RunPod's pods do."""
    server: SshdServer = make_sshd(tmp_path / "sshd")
    settings = load_settings(
        runpod_rest_url=rest_emulator.url, runpod_api_key=rest_emulator.api_key,
        ssh_key=server.client_key_path,
    )  # fmt: skip
    provider = RunPodRestProvider(settings)
    pod = provider.create(
        PodSpec(name="hctl-deadline", gpu_type_id="NVIDIA GeForce RTX 4090", image="img")
    )
    server.environment_file.write_text(
        f"export RUNPOD_POD_ID={pod.id}\nexport RUNPOD_API_KEY={rest_emulator.pod_key(pod.id)}\n"
    )
    volume = server.home / "workspace"
    try:
        yield provider, pod, server, settings, volume
    finally:
        stop_watchdog(volume / "hctl")
        server.stop()


def arm(server: SshdServer, settings, provider, until: datetime, **options) -> None:  # noqa: ANN001, ANN003
    remote = connect_address(
        parse_target(server.address).address,  # type: ignore[arg-type]
        settings,
        environment_file=str(server.environment_file),
    )
    try:
        lease.arm(remote, provider, PodLease(until=until, action="stop"),
                  str(server.home / "workspace" / "hctl"), poll_s=0.2, **options)  # fmt: skip
    finally:
        remote.close()
    provider.close()


def wait_for_status(emulator: RunPodRestEmulator, pod_id: str, status: str) -> None:
    deadline = time.monotonic() + 60
    while emulator.pod(pod_id)["status"] != status and time.monotonic() < deadline:
        time.sleep(0.1)
    assert emulator.pod(pod_id)["status"] == status


def watchdog_log(volume: Path) -> list[dict]:
    """The watchdog's log once it has finished (it writes "done" after RunPod answered)."""
    path = volume / "hctl" / "watchdog.log"
    deadline = time.monotonic() + 30
    while '"done"' not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_pod_stops_itself_at_its_deadline_with_nothing_else_running(
    rest_emulator: RunPodRestEmulator, pod_with_credentials
) -> None:  # noqa: ANN001
    provider, pod, server, settings, volume = pod_with_credentials
    arm(server, settings, provider, datetime.now(timezone.utc) + timedelta(seconds=2))
    # From here on only the pod (the stand-in) and RunPod (the emulator) are at work.
    wait_for_status(rest_emulator, pod.id, "EXITED")
    (stop,) = rest_emulator.requests_for("stop")
    assert stop.auth == "pod" and stop.body == {"action": "stop"}  # the pod's own key
    assert [entry["event"] for entry in watchdog_log(volume)][-2:] == ["acting", "done"]


def test_progress_keeps_the_pod_past_its_lease_then_it_stops(
    rest_emulator: RunPodRestEmulator, pod_with_credentials, tmp_path: Path
) -> None:  # noqa: ANN001
    provider, pod, server, settings, volume = pod_with_credentials
    events = volume / "hctl" / "jobs" / "j" / "events.jsonl"
    events.parent.mkdir(parents=True)
    events.write_text('{"type": "trial"}\n')  # the job made progress just now
    until = datetime.now(timezone.utc) + timedelta(seconds=1)
    arm(server, settings, provider, until, watch=[str(events)], extend_s=3)
    wait_for_status(rest_emulator, pod.id, "EXITED")
    log = watchdog_log(volume)
    (decided,) = [entry for entry in log if entry["event"] == "deadline"]
    (acted,) = [entry for entry in log if entry["event"] == "acting"]
    # The deadline in force was the progress + 3 s, later than the lease, and it acted then.
    assert decided["deadline"] == pytest.approx(decided["progress"] + 3)
    # (the log's timestamps are rounded to the millisecond; the deadline is not)
    assert decided["deadline"] > until.timestamp() and acted["ts"] >= decided["deadline"] - 0.0005
