"""Launching the worker: detached, with its secrets kept out of argv, settings and logs."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from hctl.providers.base import PodSpec
from hctl.providers.runpod import RunPodRestProvider
from hctl.services.job_protocol import SECRETS_FILE, launch_command, self_stop_command
from hctl.services.jobs import JobRecord, JobStore
from hctl.services.launch import start_worker
from hctl.services.toolkit import Toolkit, WorkerHandle
from hctl.settings import load_settings
from tests.e2e.fakes import FakeProvider, ShellRemote
from tests.standins.runpod_rest_emulator import RunPodRestEmulator

TOKEN = "hf_SECRETtoken1234567890"

# A stand-in worker: records what it was given, then stays alive a little (detached).
FAKE_WORKER = """#!/bin/sh
printf '%s' "$HF_TOKEN" > "$JOB/token-seen"
printf '%s ' "$@" > "$JOB/argv-seen"
printf '%s' "$HF_HOME" > "$JOB/hf-home-seen"
sleep 0.5
"""


def test_the_token_reaches_the_worker_but_no_command_file_or_argument(tmp_path: Path) -> None:
    job_dir = tmp_path / "machine" / "hctl" / "jobs" / "j1"
    worker = tmp_path / "fake-worker"
    worker.write_text(FAKE_WORKER.replace("$JOB", str(job_dir)))
    worker.chmod(worker.stat().st_mode | stat.S_IEXEC)
    remote = ShellRemote()
    store = JobStore(tmp_path / "home")
    toolkit = Toolkit(
        settings=load_settings(),
        provider_factory=FakeProvider,
        connect=lambda record: remote,
        ensure_worker=lambda remote: WorkerHandle(
            command=str(worker), environment={"HF_HOME": "/volume/.cache/huggingface"}
        ),
        wait_until_ready=lambda provider, pod_id: provider.get(pod_id),
        resolve_pod=lambda provider, ref: provider.get(ref),
        store=store,
    )
    record = store.save(
        JobRecord(job_id="j1", model="m", worker_model="m", n_trials=2, target="ssh",
                  remote_job_dir=str(job_dir))
    )  # fmt: skip
    notes: list[str] = []
    started = start_worker(record, {"model": "org/model", "n_trials": 2}, remote, toolkit,
                           notes.append, token=TOKEN)  # fmt: skip
    assert started.status == "running" and started.worker_command == str(worker)
    deadline = time.monotonic() + 10
    while not (job_dir / "argv-seen").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (job_dir / "token-seen").read_text() == TOKEN
    assert (job_dir / "hf-home-seen").read_text() == "/volume/.cache/huggingface"
    assert "--events" in (job_dir / "argv-seen").read_text()
    assert TOKEN not in (job_dir / "argv-seen").read_text()
    assert not (job_dir / SECRETS_FILE).exists()
    assert all(TOKEN not in command for command in remote.commands)
    assert TOKEN not in (job_dir / "settings.toml").read_text()
    assert TOKEN not in store.settings_path("j1").read_text()
    assert stat.S_IMODE(os.stat(job_dir).st_mode) == 0o700
    assert (job_dir / "launcher.pid").read_text().strip().isdigit()


def test_a_pod_stops_itself_when_its_worker_ends_and_nobody_follows(
    tmp_path: Path, rest_emulator: RunPodRestEmulator
) -> None:
    """The provider's stop command, run on the "pod" with its own id and pod-scoped key."""
    settings = load_settings(
        runpod_rest_url=rest_emulator.url, runpod_api_key=rest_emulator.api_key
    )
    provider = RunPodRestProvider(settings)
    pod = provider.create(
        PodSpec(name="hctl-self", gpu_type_id="NVIDIA GeForce RTX 4090", image="i")
    )
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    environment = {"RUNPOD_POD_ID": pod.id, "RUNPOD_API_KEY": rest_emulator.pod_key(pod.id)}
    command = launch_command(
        "true", str(job_dir), env=environment, self_stop_after_s=0,
        stop_command=provider.self_stop_command("stop"),
    )  # fmt: skip
    assert ShellRemote().run(command).exit_code == 0
    deadline = time.monotonic() + 30
    while rest_emulator.pod(pod.id)["status"] == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rest_emulator.pod(pod.id)["status"] == "EXITED"
    assert rest_emulator.requests_for("stop")[-1].auth == "pod"
    assert "no controller attached" in (job_dir / "worker.log").read_text()


def test_a_kept_pod_or_another_machine_gets_no_self_stop(tmp_path: Path) -> None:
    assert "action" not in launch_command("true", str(tmp_path))
    # A controller's marks hold a pod up: the script checks both before stopping.
    script = self_stop_command(str(tmp_path), 60, "stop-this-pod")
    assert ".attached" in script and ".finishing" in script and "launcher.pid" in script
    assert script.rstrip().endswith(f">>{tmp_path}/worker.log 2>&1") and "stop-this-pod" in script


def test_on_local_on_windows_is_refused_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from hctl.errors import ConfigError
    from hctl.services import planning

    monkeypatch.setattr(planning.os, "name", "nt")
    with pytest.raises(ConfigError) as caught:
        planning.target_kind(planning.RunRequest(model="m", on="local"))
    assert "POSIX" in caught.value.message and "--on ssh://" in caught.value.hint


def test_on_local_without_the_workers_libraries_is_refused_before_a_job_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A laptop install's hctl-worker lacks torch: the run stops before any job is recorded."""
    from typer.testing import CliRunner

    from hctl.cli import app
    from hctl.services import toolkit
    from tests.conftest import REPO_ROOT

    monkeypatch.setattr(toolkit, "WORKER_LIBRARIES", ("json", "hctl_no_such_library"))
    tiny = str(REPO_ROOT / "tests" / "fixtures" / "tiny-refuser")
    result = CliRunner().invoke(app, ["run", tiny, "--on", "local", "--trials", "2", "--yes"])
    assert result.exit_code == 2, result.output
    assert "which lacks hctl_no_such_library (a laptop install" in result.output
    assert "hint: Install the worker's libraries" in result.output
    assert JobStore().list() == []
