"""A job's pods at its end: stopped, terminated or kept, and the user told which, also when the
provider's API fails then (a pod it would not stop is named, with the command that stops it)."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from typer.testing import CliRunner

from hctl.cli import app
from hctl.errors import ApiError
from hctl.providers.base import Pod, PodSpec
from hctl.services.fleet_follow import release_pods
from hctl.services.jobs import JobRecord, JobStore, PodMember
from hctl.services.provisioning import release_after_failure
from hctl.services.toolkit import Toolkit
from hctl.settings import load_settings
from tests.conftest import REPO_ROOT
from tests.e2e.fakes import FakeProvider
from tests.standins.runpod_rest_emulator import RunPodRestEmulator

GPU = "NVIDIA GeForce RTX 4090"
TINY = str(REPO_ROOT / "tests" / "fixtures" / "tiny-refuser")


def pod_job(pod_id: str, **fields: object) -> JobRecord:
    """A job of 4 trials on pod `pod_id` (its other fields as given), saved."""
    record = JobRecord(job_id="1130-0000-abcd", model="m", worker_model="m", n_trials=4,
                       target="pod", pod_id=pod_id, remote_job_dir="/workspace/hctl/jobs/a",
                       **fields)  # fmt: skip
    return JobStore().save(record)


class StubbornProvider(FakeProvider):
    """A provider whose API fails every stop of the pods named in `refuse`."""

    def __init__(self, refuse: set[str]) -> None:
        super().__init__()
        self.refuse = refuse

    def stop(self, pod_id: str) -> Pod:
        if pod_id in self.refuse:
            raise ApiError("RunPod's API failed (HTTP 503).", retryable=True)
        return super().stop(pod_id)


def _toolkit(provider: FakeProvider) -> Toolkit:
    def refuse(*_: object) -> None:
        raise AssertionError("releasing pods needs no machine")

    return Toolkit(
        settings=load_settings(), provider_factory=lambda: provider, connect=refuse,
        ensure_worker=refuse, wait_until_ready=refuse, resolve_pod=refuse,
    )  # fmt: skip


def test_a_pod_that_will_not_stop_is_named_and_the_other_pods_are_still_stopped() -> None:
    provider = StubbornProvider(refuse=set())
    first, second = (
        provider.create(PodSpec(name=f"hctl-{index}", gpu_type_id=GPU, image="image"))
        for index in (1, 2)
    )
    provider.refuse.add(first.id)
    record = JobRecord(
        job_id="1130-0000-abcd", model="m", worker_model="m", n_trials=4, target="pod",
        pod_id=first.id, remote_job_dir="/workspace/hctl/jobs/a", price_per_hour=0.62,
        members=[PodMember(pod_id=first.id, price_per_hour=0.31),
                 PodMember(pod_id=second.id, price_per_hour=0.31)],
    )  # fmt: skip
    notes: list[str] = []
    released = release_pods(record, _toolkit(provider), notes.append)
    assert released.unreleased_pods == [first.id]
    assert provider.pods[first.id].active and not provider.pods[second.id].active
    (warning,) = [note for note in notes if note.startswith("could not stop")]
    assert f"pod {first.id}" in warning and "billing $0.31/h" in warning
    assert f"`hctl stop-pod {first.id}`" in warning
    assert any(note.startswith(f"stopped pod {second.id}") for note in notes), notes


def test_cancel_says_which_pod_runpod_would_not_stop_and_exits_non_zero(
    hctl_rest_env: RunPodRestEmulator,
) -> None:
    pod = hctl_rest_env.add_pod(name="hctl-1130-0000-abcd")
    with socket.socket() as probe:  # SSH is refused at once: the worker cannot be asked
        probe.bind(("127.0.0.1", 0))
        hctl_rest_env.route_ssh(direct=("127.0.0.1", probe.getsockname()[1]))
    store = JobStore()
    pod_job(pod["id"], status="running", price_per_hour=0.31)
    hctl_rest_env.inject_fault("server_error", operation="stop", times=100, status=503)
    result = CliRunner().invoke(app, ["cancel", "1130-0000-abcd", "--yes"])
    assert result.exit_code == 1, result.output
    assert f"could not stop pod {pod['id']}" in result.output
    assert f"hint: Run `hctl stop-pod {pod['id']}`" in result.output
    assert "Traceback" not in result.output
    assert hctl_rest_env.pod(pod["id"])["status"] == "RUNNING"
    saved = store.load("1130-0000-abcd")
    assert saved.status == "cancelled" and saved.unreleased_pods == [pod["id"]]


class InterruptedProvider(FakeProvider):
    """A provider during whose terminate the user presses Ctrl-C `presses` times."""

    def __init__(self, presses: int) -> None:
        super().__init__()
        self.presses = presses

    def terminate(self, pod_id: str) -> None:
        for _ in range(self.presses):
            os.kill(os.getpid(), signal.SIGINT)  # handled before the next line runs
        super().terminate(pod_id)


def test_one_more_ctrl_c_while_a_pod_is_released_does_not_leave_it_billing() -> None:
    provider = InterruptedProvider(presses=1)
    pod = provider.create(PodSpec(name="hctl-1", gpu_type_id=GPU, image="image"))
    notes: list[str] = []
    try:
        release_after_failure(
            provider, pod.id, created_here=True, started_here=False, notify=notes.append
        )
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C during the release aborted it")
    assert provider.pods == {}
    assert notes[0].startswith(f"still releasing pod {pod.id}")
    assert notes[-1] == f"terminated pod {pod.id}: it is not billing"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_gives_up_the_release_and_says_what_to_type() -> None:
    provider = InterruptedProvider(presses=2)
    pod = provider.create(PodSpec(name="hctl-1", gpu_type_id=GPU, image="image"))
    notes: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        release_after_failure(
            provider, pod.id, created_here=True, started_here=False, notify=notes.append
        )
    assert pod.id in provider.pods
    assert notes[-1].startswith(f"left pod {pod.id} as it was")
    assert f"`hctl terminate-pod {pod.id}`" in notes[-1]


def test_a_job_whose_pod_never_became_reachable_is_recorded_failed_not_preparing(
    hctl_rest_env: RunPodRestEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    hctl_rest_env.ready_after_polls = 10**6
    monkeypatch.setenv("HCTL_READY_TIMEOUT_S", "0.3")
    result = CliRunner().invoke(app, ["run", TINY, "--trials", "2", "--yes"])
    assert result.exit_code == 6, result.output
    (record,) = JobStore().list()
    assert record.status == "failed" and "did not become reachable" in record.message
    assert record.pod_id is not None and hctl_rest_env.pods == []
    shown = CliRunner().invoke(app, ["results", record.job_id])
    assert shown.output.startswith("0/2 trials; search never started.\n"), shown.output
    log = CliRunner().invoke(app, ["logs", record.job_id])
    assert log.output.startswith(f"Job {record.job_id} never started (Pod "), log.output
    assert log.output.endswith("): it has no log.\n")


def test_a_job_interrupted_while_its_pod_comes_up_is_recorded_failed(
    hctl_rest_env: RunPodRestEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hctl import pods

    def interrupted(*_: object, **__: object) -> Pod:
        raise KeyboardInterrupt

    monkeypatch.setattr(pods, "wait_until_ready", interrupted)
    result = CliRunner().invoke(app, ["run", TINY, "--trials", "2", "--yes"])
    assert result.exit_code == 130, result.output
    assert "terminated pod" in result.output
    (record,) = JobStore().list()
    assert record.status == "failed" and "interrupted" in record.message
    assert hctl_rest_env.pods == []


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ("stop", "by itself about 15 min after it ends; `hctl attach 1130-0000-abcd` saves"),
        ("keep", "until you stop it (`hctl stop-pod p1`): it was kept (--keep)."),
    ],
)
def test_a_detached_run_says_until_when_its_pod_bills(
    after: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hctl.services import runs

    record = pod_job("p1", status="running", price_per_hour=0.31, after=after)
    monkeypatch.setattr(runs, "complete", lambda *_, **__: ("detached", record, None))
    result = CliRunner().invoke(app, ["attach", record.job_id])
    assert result.exit_code == 0, result.output
    assert "Pod p1 keeps billing $0.31/h" in result.output
    assert expected in result.output


def test_cancel_of_a_finished_job_keeps_it_finished_and_touches_nothing(
    hctl_rest_env: RunPodRestEmulator,
) -> None:
    pod = hctl_rest_env.add_pod(name="hctl-1130-0000-abcd", status="EXITED")
    store = JobStore()
    pod_job(pod["id"], status="finished", chosen_trial=2)
    result = CliRunner().invoke(app, ["cancel", "1130-0000-abcd", "--yes"])
    assert result.exit_code == 0, result.output
    assert "Job 1130-0000-abcd is finished already: nothing to cancel" in result.output
    assert store.load("1130-0000-abcd").status == "finished"
    assert hctl_rest_env.requests_for("stop") == []
