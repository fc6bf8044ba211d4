"""Several workers on one search from the command line: `hctl run ... --on local --workers 2`
shows one search (trial k/N over both workers, who ran each trial, one Pareto front), and
`results`, `logs`, `resume` and `cancel` act on the whole job."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from hctl.cli import app
from hctl.services import launch, sync
from hctl.services.jobs import JobStore
from hctl.services.request import RunRequest, parse_assignments
from hctl.services.toolkit import default_toolkit
from hctl.settings import load_settings
from hctl_worker.storage import journal_storage
from hctl_worker.study import load_trials
from hctl_worker.trials import pareto_front
from tests.conftest import REPO_ROOT
from tests.controller.test_job_directory import alive
from tests.e2e.conftest import TINY, PodRig

FAST = ["--set", "batch_size=64", "--set", "max_response_length=8"]
TRIAL_LINE = re.compile(r"^\[worker (\w+)\] trial (\d+)/(\d+): ", re.MULTILINE)


def hctl_run(*options: str) -> Result:
    return CliRunner().invoke(app, ["run", TINY, *options, "--yes", *FAST], catch_exceptions=False)


@pytest.mark.slow
def test_two_local_workers_show_one_search_and_resume_goes_on_with_both(monkeypatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    runner = CliRunner()
    result = hctl_run("--on", "local", "--workers", "2", "--trials", "12")
    output = result.output
    assert result.exit_code == 0, output
    assert "Workers: 2 share one search." in output and "2 workers started" in output
    lines = TRIAL_LINE.findall(output)
    # One search: trials 1..12 of 12, each shown once, run by both workers.
    assert sorted(int(number) for _, number, _ in lines) == list(range(1, 13))
    assert {total for _, _, total in lines} == {"12"}
    assert {worker for worker, _, _ in lines} == {"1", "2"}
    assert output.count("\nPareto front\n") == 1  # one front table, for the whole search
    (record,) = JobStore().list()
    assert record.status == "finished" and record.workers == 2
    # The front shown is the front of the study (the journal copied home).
    shown = sync.local_progress(record, default_toolkit(load_settings())).front()
    study = load_trials(journal_storage(JobStore().journal_path(record.job_id)))
    assert [trial.number for trial in shown] == [trial.number for trial in pareto_front(study)]
    assert len(study) == 12 and {trial.run_by for trial in study} == {"1", "2"}
    results = runner.invoke(app, ["results", record.job_id], catch_exceptions=False)
    assert results.exit_code == 0 and "12/12 trials; search finished" in results.output
    logs = runner.invoke(app, ["logs", record.job_id], catch_exceptions=False)
    assert logs.exit_code == 0 and re.search(r"trial 12/12: ", logs.stdout), logs.output
    # Resume adds trials with the job's two workers; none is run again.
    more = runner.invoke(app, ["resume", record.job_id, "--trials", "16", "--yes"],
                         catch_exceptions=False)  # fmt: skip
    assert more.exit_code == 0, more.output
    again = TRIAL_LINE.findall(more.output)
    assert sorted(int(number) for _, number, _ in again) == [13, 14, 15, 16]
    numbers = [e.number for e in JobStore().events(record.job_id) if e.type == "trial"]
    assert sorted(numbers) == list(range(1, 17))


def _pids(job_dir: Path) -> list[int]:
    return [int(path.read_text()) for path in (job_dir / "workers").glob("*.pid")]


def test_cancel_stops_every_worker_of_the_job(monkeypatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    toolkit = default_toolkit(load_settings())
    plan = launch.plan_run(
        RunRequest(model=TINY, n_trials=200, on="local", workers=2,
                   worker_overrides=parse_assignments(["batch_size=64", "max_response_length=8"])),
        toolkit,
    )  # fmt: skip
    record = launch.start_job(plan, toolkit, lambda message: None)
    job_dir = Path(record.remote_job_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both workers in the search (where SIGTERM is taken)
        sync.sync_job(record, toolkit)
        trials = sync.local_progress(record, toolkit).trials.values()
        if {trial.run_by for trial in trials} == {"1", "2"}:
            break
        time.sleep(0.2)
    pids = _pids(job_dir)
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    result = CliRunner().invoke(app, ["cancel", record.job_id, "--yes"], catch_exceptions=False)
    # Stopped by SIGTERM, or killed after the grace period on a machine too busy to stop in time.
    assert result.exit_code == 0, result.output
    assert "worker stopped" in result.output or "worker killed" in result.output
    assert not any(alive(pid) for pid in pids)
    assert sync.worker_alive(record, toolkit) is False
    assert JobStore().load(record.job_id).status == "cancelled"
    assert os.path.getsize(JobStore().journal_path(record.job_id)) > 0


@pytest.mark.slow
def test_a_pod_with_two_gpus_runs_a_worker_on_each_and_ends_stopped(pod_rig: PodRig) -> None:
    result = hctl_run("--gpus", "2", "--gpu", "NVIDIA GeForce RTX 4090", "--trials", "4")
    output = result.output
    assert result.exit_code == 0, output
    # The estimate and the pod count both GPUs; the tiny model fits one: a worker on each.
    assert "2x RTX 4090" in output and "Workers: 2 workers, one per GPU" in output
    lines = TRIAL_LINE.findall(output)
    assert sorted(int(number) for _, number, _ in lines) == [1, 2, 3, 4]
    (record,) = JobStore().list()
    assert record.status == "finished" and (record.gpu_count, record.workers) == (2, 2)
    (pod,) = pod_rig.emulator.pods
    assert pod["gpuCount"] == 2 and pod["status"] == "EXITED"
    assert record.price_per_hour == pytest.approx(pod["costPerHr"])
    assert f"stopped pod {pod['id']}" in output


@pytest.mark.slow
def test_a_worker_killed_mid_search_loses_no_trial_in_the_view(monkeypatch) -> None:
    """SIGKILL one of two workers (no event from it again): the other takes over its trial and
    ends the search; `hctl attach` shows every trial once and the job finished."""
    monkeypatch.chdir(REPO_ROOT)
    toolkit = default_toolkit(load_settings())
    settings = ["batch_size=64", "max_response_length=8", "heartbeat_seconds=0.5",
                "stale_after_seconds=4"]  # fmt: skip
    plan = launch.plan_run(
        RunRequest(model=TINY, n_trials=12, on="local", workers=2,
                   worker_overrides=parse_assignments(settings)),
        toolkit,
    )  # fmt: skip
    record = launch.start_job(plan, toolkit, lambda message: None)
    victim = Path(record.remote_job_dir) / "workers" / "2.pid"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until worker 2 has reported a trial of its own
        sync.sync_job(record, toolkit)
        trials = sync.local_progress(record, toolkit).trials.values()
        if any(trial.run_by == "2" for trial in trials):
            break
        time.sleep(0.2)
    pid = int(victim.read_text())
    os.kill(pid, signal.SIGKILL)
    result = CliRunner().invoke(app, ["attach", record.job_id, "--yes"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    numbers = sorted(int(number) for _, number, _ in TRIAL_LINE.findall(result.output))
    assert numbers == list(range(1, 13))  # every trial shown once, none missing
    assert JobStore().load(record.job_id).status == "finished"
    study = load_trials(journal_storage(JobStore().journal_path(record.job_id)))
    assert [trial.number for trial in study] == list(range(1, 13))
