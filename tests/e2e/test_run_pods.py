"""One search on several pods: `hctl run MODEL --pods 2` against the RunPod emulator, whose two
pods are two sshd stand-ins (both on this machine), with real `hctl-worker` processes on the tiny
refuser and a real PostgreSQL that hctl starts "on pod 1" (the study's database)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from hctl.cli import app
from hctl.services import fleet_launch, planning, sync
from hctl.services.database import stop_command
from hctl.services.jobs import JobRecord, JobStore
from hctl.services.request import RunRequest, parse_assignments
from hctl.services.toolkit import default_toolkit
from hctl.settings import load_settings
from hctl_worker.events import TrialEvent, read_events
from hctl_worker.storage import database_storage
from hctl_worker.study import STUDY_NAME, load_trials
from hctl_worker.trials import pareto_front
from tests.controller.test_job_directory import alive
from tests.e2e.conftest import TINY, PodRig
from tests.standins.postgres import free_port, postgres_missing
from tests.standins.sshd import SshdServer, stop_watchdog

FAST = ["--set", "batch_size=64", "--set", "max_response_length=8"]
TRIAL_LINE = re.compile(r"^\[worker (\w+)\] trial (\d+)/(\d+): ", re.MULTILINE)
GPU = ["--gpu", "NVIDIA GeForce RTX 4090"]


@dataclass
class TwoPods:
    rig: PodRig
    pod2_sshd: SshdServer
    database_port: int

    def job_dir(self, record: JobRecord, index: int) -> Path:
        return Path(record.members[index].remote_job_dir)


@pytest.fixture
def two_pods(
    pod_rig: PodRig, sshd_other_host_key: SshdServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TwoPods]:
    """The first pod the emulator creates is the rig's sshd, the second another sshd; TCP ports
    map to themselves on 127.0.0.1, and the private network's address is 127.0.0.1 too."""
    reason = postgres_missing()
    if reason is not None:
        pytest.skip(reason)
    emulator = pod_rig.emulator
    emulator.route_ssh(
        each=[(pod_rig.sshd.host, pod_rig.sshd.port),
              (sshd_other_host_key.host, sshd_other_host_key.port)],
    )  # fmt: skip
    emulator.cloud.port_offset = 0
    emulator.cloud.private_ip = "127.0.0.1"
    port = free_port()
    monkeypatch.setenv("HCTL_DATABASE_PORT", str(port))
    # The volume outside pytest's folders (private to root; pytest runs elsewhere on a shared
    # machine make them so again): the database server runs as another user.
    volume = Path(tempfile.mkdtemp(prefix="hctl-pods-"))
    monkeypatch.setenv("HCTL_VOLUME_PATH", str(volume))
    rig = PodRig(emulator=emulator, sshd=pod_rig.sshd, volume=volume)
    yield TwoPods(rig=rig, pod2_sshd=sshd_other_host_key, database_port=port)
    # The stand-in pods are this machine: a stopped pod does not stop its processes.
    for database in (volume / "hctl" / "databases").glob("*"):
        subprocess.run(["sh", "-c", stop_command(str(database))], timeout=120, check=False)
    stop_watchdog(volume / "hctl")
    shutil.rmtree(volume, ignore_errors=True)


def _run(*options: str) -> Result:
    return CliRunner().invoke(
        app, ["run", TINY, "--pods", "2", *GPU, "--yes", *FAST, *options], catch_exceptions=False
    )


def _study(record: JobRecord, job_dir: Path) -> list:
    """The trials in the job's PostgreSQL study, read with the password file the workers use."""
    url = (job_dir / "storage.url").read_text().strip()
    os.environ["PGPASSFILE"] = str(job_dir / ".pgpass")
    try:
        storage = database_storage(url, STUDY_NAME)
        try:
            return load_trials(storage)
        finally:
            storage.close()
    finally:
        del os.environ["PGPASSFILE"]


class ArgvWatch:
    """Reads every process's command line on this machine (the stand-in pods and the laptop)
    while the job runs, looking for the database password once the password file exists."""

    def __init__(self, volume: Path) -> None:
        self.volume = volume
        self.password: str | None = None
        self.seen_in: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.is_set():
            if self.password is None:
                found = list(self.volume.glob("hctl/jobs/*-pod1/.pgpass"))
                if found:
                    self.password = found[0].read_text().strip().rsplit(":", 1)[-1]
            else:
                for path in Path("/proc").glob("[0-9]*/cmdline"):
                    with contextlib.suppress(OSError):
                        if self.password.encode() in path.read_bytes():
                            self.seen_in.append(path.read_bytes().decode(errors="replace"))
            time.sleep(0.05)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)


@pytest.mark.slow
def test_two_pods_share_one_search_on_postgresql_and_both_end_stopped(two_pods: TwoPods) -> None:
    watch = ArgvWatch(two_pods.rig.volume)
    try:
        result = _run("--trials", "6")
    finally:
        watch.stop()
    output = result.output
    assert result.exit_code == 0, output
    # Decided and said before anything was rented: pods, workers, the database's network.
    assert "2 pods of RTX 4090" in output
    assert "Workers: 2 pods, one worker on each: 2 workers share one search." in output
    assert "private network (globalNetworking)" in output.split("created pod")[0]
    (record,) = JobStore().list()
    assert record.status == "finished" and len(record.members) == 2
    first, second = (member.pod_id for member in record.members)
    assert f"pod {second} reaches the database over the private network" in output
    # One search: trials 1..6 of 6, each shown once, run on both pods; one front.
    lines = TRIAL_LINE.findall(output)
    assert sorted(int(number) for _, number, _ in lines) == list(range(1, 7))
    assert {worker for worker, _, _ in lines} == {"1", "2"}
    assert output.count("\nPareto front\n") == 1
    # The study (PostgreSQL on pod 1): exactly 6 finished trials, unique numbers, both pods'
    # workers; its front is the front the controller showed.
    study = _study(record, two_pods.job_dir(record, 0))
    assert sorted(trial.number for trial in study) == list(range(1, 7))
    assert {trial.run_by for trial in study} == {"1", "2"}
    events = JobStore().events(record.job_id)
    shown = pareto_front([event for event in events if event.type == "trial"])
    assert [trial.number for trial in shown] == [trial.number for trial in pareto_front(study)]
    # Both pods ended stopped, the emulator's table says so, and the user was told, pod by pod.
    assert two_pods.rig.pod_statuses() == {first: "EXITED", second: "EXITED"}
    assert f"stopped pod {first}" in output and f"stopped pod {second}" in output
    assert record.price_per_hour == pytest.approx(
        sum(pod["costPerHr"] for pod in two_pods.rig.emulator.pods)
    )
    # The password: in a 0600 file per pod, never on a command line, in the output, the job's
    # files at home or on the pods (but the password files), or in an event.
    assert watch.password and len(watch.password) >= 32 and watch.seen_in == []
    for index in (0, 1):
        pgpass = two_pods.job_dir(record, index) / ".pgpass"
        assert pgpass.stat().st_mode & 0o777 == 0o600
    assert watch.password not in output
    places = [JobStore().folder(record.job_id), *(two_pods.job_dir(record, i) for i in (0, 1))]
    for place in places:
        for path in place.rglob("*"):
            if path.is_file() and path.name != ".pgpass":
                assert watch.password.encode() not in path.read_bytes(), path
    # results, logs and resume act on the whole job.
    runner = CliRunner()
    results = runner.invoke(app, ["results", record.job_id], catch_exceptions=False)
    assert results.exit_code == 0 and "6/6 trials; search finished" in results.output
    logs = runner.invoke(app, ["logs", record.job_id], catch_exceptions=False)
    assert (
        logs.exit_code == 0 and f"pod {first}:" in logs.stdout and f"pod {second}:" in logs.stdout
    )
    more = runner.invoke(app, ["resume", record.job_id, "--trials", "8", "--yes"],
                         catch_exceptions=False)  # fmt: skip
    assert more.exit_code == 0, more.output
    assert f"started pod {first}" in more.output and f"started pod {second}" in more.output
    again = TRIAL_LINE.findall(more.output)
    assert sorted(int(number) for _, number, _ in again) == [7, 8]
    study = _study(record, two_pods.job_dir(record, 0))
    assert sorted(trial.number for trial in study) == list(range(1, 9))
    assert two_pods.rig.pod_statuses() == {first: "EXITED", second: "EXITED"}


def _kill_pod_two_when_it_ran_a_trial(two_pods: TwoPods, killed: list[str]) -> None:
    """Wait until pod 2's worker has reported a trial, then end pod 2 as RunPod would: the
    emulator terminates it, its processes die (SIGKILL), its SSH connections drop."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        records = JobStore().list()
        if records and len(records[0].members) == 2:
            job_dir = two_pods.job_dir(records[0], 1)
            events = job_dir / "events.jsonl"
            if events.is_file() and b'"type": "trial"' in events.read_bytes().replace(
                b'"type":"trial"', b'"type": "trial"'
            ):
                pod_id = records[0].members[1].pod_id
                with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                    os.killpg(int((job_dir / "launcher.pid").read_text()), signal.SIGKILL)
                for pid_file in (job_dir / "workers").glob("*.pid"):
                    with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                        os.kill(int(pid_file.read_text()), signal.SIGKILL)
                with two_pods.rig.emulator.cloud.lock:
                    two_pods.rig.emulator.cloud.terminate(pod_id)
                two_pods.pod2_sshd.drop_connections()
                killed.append(pod_id)
                return
        time.sleep(0.1)


@pytest.mark.slow
def test_a_pod_lost_mid_search_leaves_the_others_to_finish_it(two_pods: TwoPods) -> None:
    """Pod 2 terminated mid-search (public-port path: no private network in this data centre):
    pod 1's worker runs its trial again and finishes the search; pod 1 ends stopped."""
    two_pods.rig.emulator.cloud.global_networking_offered = False
    killed: list[str] = []
    killer = threading.Thread(target=_kill_pod_two_when_it_ran_a_trial, args=(two_pods, killed))
    killer.start()
    result = _run("--trials", "8", "--set", "heartbeat_seconds=0.5",
                  "--set", "stale_after_seconds=4")  # fmt: skip
    killer.join(timeout=10)
    output = result.output
    assert result.exit_code == 0, output
    assert killed, "pod 2 never ran a trial"
    (record,) = JobStore().list()
    first, second = (member.pod_id for member in record.members)
    assert killed == [second]
    assert f"pod {second} reaches the database at pod 1's public port" in output
    assert record.status == "finished"
    study = _study(record, two_pods.job_dir(record, 0))
    assert sorted(trial.number for trial in study) == list(range(1, 9))
    # Every trial is shown once, also one pod 2 reported as it was killed (its line may not have
    # reached the controller before the pod's connection dropped: it is read from the study).
    shown = [int(number) for _, number, _ in TRIAL_LINE.findall(output)]
    assert sorted(shown) == list(range(1, 9)), output
    # The copy at home holds every trial. A trial may be there twice: a worker killed after its
    # report but before marking it reported leaves the report to another worker (on another
    # pod, another file); readers key trials by number, and both reports are the same trial.
    events, _ = read_events(JobStore().events_path(record.job_id))
    reported: dict[int, list[TrialEvent]] = {}
    for event in events:
        if isinstance(event, TrialEvent):
            reported.setdefault(event.number, []).append(event)
    assert sorted(reported) == list(range(1, 9))
    for copies in reported.values():
        assert all(copy.params == copies[0].params for copy in copies)
        assert all(copy.scores == copies[0].scores for copy in copies)
    # Every pod ended stopped or terminated, and the user was told which.
    assert two_pods.rig.pod_statuses() == {first: "EXITED"}  # pod 2: terminated, gone
    assert f"stopped pod {first}" in output
    # Seen lost while following ("is terminated: the other pods go on"), or at the release when
    # the search ended before the next read of it.
    assert re.search(rf"pod {second} is (already )?gone", output), output


@pytest.mark.slow
def test_cancel_stops_every_pods_workers_and_releases_every_pod(two_pods: TwoPods) -> None:
    """A detached job on two pods: `attach` follows both, `cancel` stops the workers of both
    and stops both pods, saying so pod by pod."""
    toolkit = default_toolkit(load_settings())
    request = RunRequest(model=TINY, n_trials=200, pods=2, gpu="NVIDIA GeForce RTX 4090",
                         worker_overrides=parse_assignments(FAST[1::2]))  # fmt: skip
    plan = planning.plan_run(request, toolkit)
    record = fleet_launch.start_fleet(plan, toolkit, lambda message: None)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # until a worker of each pod has reported a trial
        sync.sync_job(record, toolkit)
        trials = sync.local_progress(record, toolkit).trials.values()
        if {trial.run_by for trial in trials} == {"1", "2"}:
            break
        time.sleep(0.2)
    pids = [int(path.read_text()) for index in (0, 1)
            for path in (two_pods.job_dir(record, index) / "workers").glob("*.pid")]  # fmt: skip
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    assert sync.worker_alive(record, toolkit) is True
    result = CliRunner().invoke(app, ["cancel", record.job_id, "--yes"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not any(alive(pid) for pid in pids)
    assert result.output.count("worker stopped") + result.output.count("worker killed") == 2
    first, second = (member.pod_id for member in record.members)
    assert f"stopped pod {first}" in result.output and f"stopped pod {second}" in result.output
    assert two_pods.rig.pod_statuses() == {first: "EXITED", second: "EXITED"}
    assert JobStore().load(record.job_id).status == "cancelled"
