"""`hctl run` end to end on a RunPod pod: the emulator rents it, the sshd stand-in is the pod,
the tiny refusing model is searched there."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hctl.cli import app
from hctl.services import launch, runs
from hctl.services.jobs import JobStore
from hctl.services.request import RunRequest, parse_assignments
from hctl.services.toolkit import default_toolkit
from hctl.services.view import LiveView
from hctl.settings import load_settings
from hctl_worker.events import DoneEvent, StartEvent, TrialEvent
from tests.e2e.conftest import FAST, TINY, PodRig


def trial_numbers(output: str, total: int) -> list[int]:
    return [int(number) for number in re.findall(rf"^trial (\d+)/{total}: ", output, re.MULTILINE)]


def test_a_full_run_rents_searches_saves_downloads_and_stops_the_pod(
    pod_rig: PodRig, tmp_path: Path
) -> None:
    download = tmp_path / "model"
    result = CliRunner().invoke(
        app,
        ["run", TINY, "--trials", "4", "--yes", "--download", str(download),
         "--gpu", "NVIDIA GeForce RTX 4090", *FAST],
        catch_exceptions=False,
    )  # fmt: skip
    output = result.output
    assert result.exit_code == 0, output
    assert "$0.31" in output and output.index("Estimate for 4 trials") < output.index("created pod")
    assert trial_numbers(output, 4) == [1, 2, 3, 4]
    assert "Pareto front" in output and "← chosen" in output
    (record,) = JobStore().list()
    assert record.status == "finished" and record.target == "pod"
    assert (download / "model.safetensors").is_file()
    # The pod was named after the job, had a lease, and is stopped (kept on purpose, not billing).
    (pod,) = pod_rig.emulator.pods
    assert pod["name"] == f"hctl-{record.job_id}" and pod["env"]["HCTL_LEASE_UNTIL"]
    # REST v2 keeps no deadline: the pod's own watchdog does, moved on by the job's events.
    assert "the pod keeps its own lease" in output
    lease = json.loads((pod_rig.volume / "hctl" / "lease.json").read_text())
    assert lease["watch"] == [f"{record.remote_job_dir}/events.jsonl"]
    assert lease["until"] == pytest.approx(float(pod["env"]["HCTL_LEASE_UNTIL"]), abs=1)
    assert pod["status"] == "EXITED"
    assert f"stopped pod {pod['id']}" in output
    # The journal and events were copied home; the worker's job directory is on the volume.
    assert JobStore().journal_path(record.job_id).stat().st_size > 0
    assert record.remote_job_dir.startswith(str(pod_rig.volume))


def test_a_run_through_the_pty_only_proxy_works_the_same(
    proxy_pod_rig: PodRig, tmp_path: Path
) -> None:
    """RunPod's proxy needs a PTY and has no SFTP: events, uploads, export and download flow."""
    download = tmp_path / "model"
    result = CliRunner().invoke(
        app,
        ["run", TINY, "--trials", "3", "--yes", "--terminate", "--download", str(download), *FAST],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "proxy" in result.output
    assert trial_numbers(result.output, 3) == [1, 2, 3]
    (record,) = JobStore().list()
    assert record.status == "finished" and record.saved_model_dir
    assert f"terminated pod {record.pod_id}" in result.output
    assert proxy_pod_rig.emulator.pods == []
    saved = Path(record.saved_model_dir, "model.safetensors")
    assert (download / "model.safetensors").read_bytes() == saved.read_bytes()


class HookedView(LiveView):
    """The live view, plus actions run right after chosen trials are shown (a test's hands)."""

    def __init__(self, hooks: dict[int | str, Callable[[], None]]) -> None:
        super().__init__(Console(file=io.StringIO(), width=200), job_id="test", machine="pod")
        self.hooks = hooks  # by trial number, or "done" for the search's end

    def event(self, event: object, progress, money) -> None:  # noqa: ANN001
        super().event(event, progress, money)
        if isinstance(event, TrialEvent) and event.number in self.hooks:
            self.hooks.pop(event.number)()
        if isinstance(event, DoneEvent) and "done" in self.hooks:
            self.hooks.pop("done")()


def start(trials: int, toolkit, **request) -> tuple:  # noqa: ANN001, ANN003
    plan = launch.plan_run(
        RunRequest(
            model=TINY, n_trials=trials, gpu="NVIDIA GeForce RTX 4090",
            worker_overrides=parse_assignments(FAST[1::2]), **request,
        ),
        toolkit,
    )  # fmt: skip
    notes: list[str] = []
    return launch.start_job(plan, toolkit, notes.append), notes


def interrupt() -> None:
    raise KeyboardInterrupt


def test_a_dropped_connection_loses_nothing_and_attach_shows_every_trial_once(
    pod_rig: PodRig,
) -> None:
    toolkit = default_toolkit(load_settings())
    record, _ = start(6, toolkit)
    dropped: list[int] = []
    view = HookedView({2: lambda: dropped.append(pod_rig.sshd.drop_connections()), 3: interrupt})
    outcome, record, _ = runs.complete(
        record, toolkit, view, worker=record.worker_command, token=None
    )
    # The connection was cut after trial 2; hctl reconnected (the remote layer or the follower)
    # and went on; Ctrl-C after trial 3 detached, leaving the job and its pod running.
    assert dropped and dropped[0] >= 1
    shown = [int(line.split()[1].split("/")[0]) for line in view.lines if line.startswith("trial ")]
    assert shown[:3] == [1, 2, 3] and len(shown) == len(set(shown))
    assert outcome == "detached"
    assert pod_rig.pod_statuses() == {record.pod_id: "RUNNING"}
    result = CliRunner().invoke(app, ["attach", record.job_id, "--yes"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert trial_numbers(result.output, 6) == [1, 2, 3, 4, 5, 6]
    assert "← chosen" in result.output
    assert pod_rig.pod_statuses() == {record.pod_id: "EXITED"}


def test_a_killed_controller_leaves_the_job_running_and_results_work_afterwards(
    pod_rig: PodRig,
) -> None:
    hctl = Path(sys.executable).with_name("hctl")
    process = subprocess.Popen(
        [str(hctl), "run", TINY, "--trials", "6", "--yes", "--gpu", "NVIDIA GeForce RTX 4090",
         *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )  # fmt: skip
    job_id = None
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("job "):
            job_id = line.split()[1]
        if line.startswith("trial 2/6"):
            break
    process.kill()
    process.wait()
    assert job_id is not None
    runner = CliRunner()
    deadline = time.monotonic() + 90
    while True:
        result = runner.invoke(app, ["results", job_id], catch_exceptions=False)
        if "search finished" in result.output or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.exit_code == 0, result.output
    assert "6/6 trials; search finished" in result.output and "Pareto front" in result.output
    # Following it again finishes the job (save, stop the pod) without running anything twice.
    attached = runner.invoke(app, ["attach", job_id, "--yes"], catch_exceptions=False)
    assert attached.exit_code == 0, attached.output
    assert trial_numbers(attached.output, 6) == [1, 2, 3, 4, 5, 6]
    assert list(pod_rig.pod_statuses().values()) == ["EXITED"]


def test_a_terminated_pod_is_resumed_on_a_new_pod_without_redoing_trials(
    pod_rig: PodRig,
) -> None:
    toolkit = default_toolkit(load_settings())
    record, _ = start(6, toolkit)
    old_pod = record.pod_id

    def pod_dies() -> None:
        # RunPod terminates the pod: the worker dies, its volume is gone, connections drop.
        toolkit.provider().terminate(old_pod)
        launcher = int(Path(record.remote_job_dir, "launcher.pid").read_text())
        os.killpg(launcher, signal.SIGKILL)  # the launcher leads the worker's own session
        shutil.rmtree(record.remote_job_dir)
        pod_rig.sshd.drop_connections()

    view = HookedView({3: pod_dies})
    outcome, record, _ = runs.complete(
        record, toolkit, view, worker=record.worker_command, token=None
    )
    assert outcome == "interrupted" and record.status == "interrupted"
    assert any("hctl resume" in line for line in view.lines)
    assert pod_rig.emulator.pods == []
    result = CliRunner().invoke(app, ["resume", record.job_id, "--yes"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    resumed = JobStore().load(record.job_id)
    assert resumed.pod_id != old_pod and resumed.status == "finished"
    assert list(pod_rig.pod_statuses()) == [resumed.pod_id]
    events = JobStore().events(record.job_id)
    numbers = [event.number for event in events if isinstance(event, TrialEvent)]
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6], numbers  # none redone, none missing
    starts = [event for event in events if isinstance(event, StartEvent)]
    assert len(starts) == 2 and starts[1].resumed_trials >= 3


def test_a_pod_terminated_after_the_search_before_the_save_is_finished_by_resume(
    pod_rig: PodRig,
) -> None:
    """The pod goes away once the search has ended but before the chosen model is saved: the
    job is interrupted (not failed, no traceback), and `hctl resume` finishes it on a new pod
    without running any trial again."""
    toolkit = default_toolkit(load_settings())
    record, _ = start(3, toolkit)
    old_pod = record.pod_id

    def pod_dies() -> None:
        toolkit.provider().terminate(old_pod)
        shutil.rmtree(record.remote_job_dir)
        pod_rig.sshd.drop_connections()

    view = HookedView({"done": pod_dies})
    outcome, record, _ = runs.complete(
        record, toolkit, view, worker=record.worker_command, token=None
    )
    assert outcome == "interrupted" and record.status == "interrupted", view.lines
    assert any(f"hctl resume {record.job_id}" in line for line in view.lines)
    assert record.saved_model_dir is None
    result = CliRunner().invoke(app, ["resume", record.job_id, "--yes"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    resumed = JobStore().load(record.job_id)
    assert resumed.status == "finished" and resumed.pod_id != old_pod
    assert resumed.saved_model_dir is not None
    numbers = [e.number for e in JobStore().events(record.job_id) if isinstance(e, TrialEvent)]
    assert sorted(numbers) == [1, 2, 3], numbers  # none redone


def test_a_stopped_pod_is_started_again_by_resume_and_the_search_goes_on(
    pod_rig: PodRig,
) -> None:
    toolkit = default_toolkit(load_settings())
    # Trials run several at a time (`trials_together`, up to 4 here): trial 2 shows while 5-8
    # still have to run.
    record, _ = start(9, toolkit)

    def pod_stops() -> None:
        # RunPod stops the pod (a spot preemption, a stop from the console): its processes die,
        # its volume (with the job directory) stays.
        toolkit.provider().stop(record.pod_id)
        launcher = int(Path(record.remote_job_dir, "launcher.pid").read_text())
        os.killpg(launcher, signal.SIGKILL)
        pod_rig.sshd.drop_connections()

    view = HookedView({2: pod_stops})
    outcome, record, _ = runs.complete(
        record, toolkit, view, worker=record.worker_command, token=None
    )
    assert outcome == "interrupted"
    assert pod_rig.pod_statuses() == {record.pod_id: "EXITED"}
    result = CliRunner().invoke(app, ["resume", record.job_id, "--yes"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"pod {record.pod_id} still exists" in result.output
    assert f"started pod {record.pod_id}" in result.output
    numbers = [e.number for e in JobStore().events(record.job_id) if isinstance(e, TrialEvent)]
    assert sorted(numbers) == list(range(1, 10)), numbers
    assert JobStore().load(record.job_id).status == "finished"
    assert pod_rig.pod_statuses() == {record.pod_id: "EXITED"}  # the same pod, stopped again


def test_the_budget_cap_stops_after_the_current_trial_and_keeps_the_results(
    pod_rig: PodRig,
) -> None:
    later = {"hours": 0.0}
    toolkit = default_toolkit(load_settings(), clock=lambda: time.time() + later["hours"] * 3600)
    # Trials run several at a time (`trials_together`, up to 4 here): trial 2 shows while
    # 9-12 still wait.
    record, _ = start(12, toolkit, max_cost=0.5)

    def an_hour_passes() -> None:
        later["hours"] += 2.0  # at $0.31/h the $0.50 cap is now spent

    view = HookedView({2: an_hour_passes})
    outcome, record, progress = runs.complete(
        record, toolkit, view, worker=record.worker_command, token=None
    )
    assert outcome == "budget" and record.status == "budget"
    assert any(line.startswith("budget reached") for line in view.lines)
    assert progress.trials_done < 12
    assert record.chosen_trial is not None and record.saved_model_dir is not None
    assert pod_rig.pod_statuses() == {record.pod_id: "EXITED"}


def test_a_run_on_any_ssh_host(pod_rig: PodRig) -> None:
    """`--on ssh://` needs no provider at all: the job lives under the SSH user's home."""
    result = CliRunner().invoke(
        app, ["run", TINY, "--on", pod_rig.sshd.address, "--trials", "2", "--yes", *FAST],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert trial_numbers(result.output, 2) == [1, 2]
    (record,) = JobStore().list()
    assert record.target == "ssh" and record.status == "finished"
    assert record.remote_job_dir.startswith(f"{pod_rig.sshd.home}/hctl/jobs/")
    assert pod_rig.emulator.pods == [] and pod_rig.emulator.requests == []


def test_a_run_on_a_given_pod_with_keep_leaves_it_running_and_says_so(pod_rig: PodRig) -> None:
    pod = pod_rig.emulator.add_pod(name="hctl-work")
    result = CliRunner().invoke(
        app, ["run", TINY, "--pod", "hctl-work", "--keep", "--trials", "2", "--yes", *FAST],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "created pod" not in result.output
    assert f"pod {pod['id']} kept running on purpose" in result.output
    assert pod_rig.pod_statuses() == {pod["id"]: "RUNNING"}  # the test meant to keep it


def test_ctrl_c_at_the_trial_prompt_stops_the_pod_and_says_how_to_save_a_trial_later(
    pod_rig: PodRig,
) -> None:
    toolkit = default_toolkit(load_settings())
    record, _ = start(2, toolkit)
    view = HookedView({})

    def ctrl_c(front: list, suggested: object) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.complete(record, toolkit, view, worker=record.worker_command, token=None,
                      chooser=ctrl_c)  # fmt: skip
    assert pod_rig.pod_statuses() == {record.pod_id: "EXITED"}
    assert view.lines[-1] == (
        f"the search is done and kept; no trial was saved: `hctl start-pod {record.pod_id}`, "
        f"then `hctl attach {record.job_id}` chooses and saves one"
    )
