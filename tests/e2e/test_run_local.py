"""The README's main command, for real: the tiny refusing model searched on this machine."""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from typer.testing import CliRunner

from hctl.cli import app
from hctl.services import launch, sync
from hctl.services.jobs import JobStore
from hctl.services.request import RunRequest, parse_assignments
from hctl.services.toolkit import default_toolkit
from hctl.settings import load_settings
from tests.conftest import REPO_ROOT

TINY = "tests/fixtures/tiny-refuser"


def test_the_readme_command_runs_to_a_saved_and_downloaded_model(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(REPO_ROOT)
    download = tmp_path / "abliterated"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["run", TINY, "--on", "local", "--trials", "8", "--yes", "--download", str(download)],
        catch_exceptions=False,
    )
    output = result.output
    assert result.exit_code == 0, output
    # The estimate came first, with the price per hour and the total for the job.
    assert output.index("Estimate for 8 trials") < output.index("worker started")
    assert "this machine" in output and "$0.00" in output
    # The live view: every trial exactly once, in order, then the end of the search.
    trial_lines = re.findall(r"^trial (\d+)/8: ", output, flags=re.MULTILINE)
    assert trial_lines == [str(number) for number in range(1, 9)]
    assert re.search(r"^baseline: \d+/\d+ refusals", output, flags=re.MULTILINE)
    assert "chose trial" in output and "under the limit" in output
    # The final table marks the chosen trial; the model was saved and downloaded.
    assert "Pareto front" in output and "← chosen" in output
    (record,) = JobStore().list()
    assert record.status == "finished" and record.chosen_trial is not None
    saved = Path(record.saved_model_dir)
    assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
    assert (download / "model.safetensors").read_bytes() == (
        saved / "model.safetensors"
    ).read_bytes()
    # The picture is a well-formed, self-contained SVG with one dot per scored trial at least.
    picture = JobStore().picture_path(record.job_id)
    root = ElementTree.parse(picture).getroot()
    assert root.tag.endswith("svg")
    assert len(root.findall("{http://www.w3.org/2000/svg}circle")) >= 8
    # The job can be inspected afterwards.
    results = runner.invoke(app, ["results", record.job_id], catch_exceptions=False)
    assert results.exit_code == 0 and "8/8 trials; search finished" in results.output
    jobs = runner.invoke(app, ["jobs"], catch_exceptions=False)
    assert record.job_id in jobs.output and "8/8" in jobs.output
    # The end says what to do next: chat with the downloaded model, upload it.
    next_part = output[output.index("Next:") :]
    assert f"hctl-worker chat {download}" in next_part and "--upload-repo" in next_part
    # The run measured this machine: the next local estimate is those figures, not a guess.
    assert JobStore().calibration_path.is_file()
    again = runner.invoke(app, ["run", TINY, "--on", "local", "--trials", "8", "--dry-run"])
    assert "Durations measured on this machine" in again.output
    measured = float(re.search(r"this machine\s+\S+\s+\S+\s+(\S+)", again.output).group(1))
    assert measured < 10 * max(trial.seconds for trial in JobStore().events(record.job_id)
                               if getattr(trial, "type", "") == "trial")  # fmt: skip


def test_cancel_stops_a_running_job_and_keeps_its_results(monkeypatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    toolkit = default_toolkit(load_settings())
    plan = launch.plan_run(
        RunRequest(
            model=TINY, n_trials=200, on="local",
            worker_overrides=parse_assignments(["batch_size=64", "max_response_length=12"]),
        ),
        toolkit,
    )  # fmt: skip
    record = launch.start_job(plan, toolkit, lambda message: None)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the first trial is reported
        sync.sync_job(record, toolkit)
        if sync.local_progress(record, toolkit).trials_done:
            break
        time.sleep(0.3)
    runner = CliRunner()
    logs = runner.invoke(app, ["logs", record.job_id], catch_exceptions=False)
    assert re.search(r"^\S+ \S+ trial 1/200: ", logs.stdout, flags=re.MULTILINE), logs.output
    assert '"type"' not in logs.stdout  # readable lines, not JSON
    raw = runner.invoke(app, ["logs", record.job_id, "--json"], catch_exceptions=False)
    assert '"type":"trial"' in raw.stdout
    result = runner.invoke(app, ["cancel", record.job_id, "--yes"], catch_exceptions=False)
    assert result.exit_code == 0 and "worker stopped" in result.output
    assert sync.worker_alive(record, toolkit) is False
    assert JobStore().load(record.job_id).status == "cancelled"
    assert JobStore().journal_path(record.job_id).stat().st_size > 0


def test_a_worker_failure_is_one_clear_error_with_where_to_look(monkeypatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    result = CliRunner().invoke(
        app,
        ["run", TINY, "--on", "local", "--trials", "2", "--yes",
         "--set", 'bad_prompts={dataset="no-such-owner/no-such-dataset"}'],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "worker error:" in result.output
    assert "error: Job" in result.output and "failed" in result.output
    assert "hctl logs" in result.output and "Traceback" not in result.output
    (record,) = JobStore().list()
    assert record.status == "failed"


def test_resume_adds_trials_to_a_finished_job_without_redoing_any(monkeypatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    runner = CliRunner()
    fast = ["--set", "batch_size=64", "--set", "max_response_length=12"]
    first = runner.invoke(app, ["run", TINY, "--on", "local", "--trials", "2", "--yes", *fast],
                          catch_exceptions=False)  # fmt: skip
    assert first.exit_code == 0, first.output
    (record,) = JobStore().list()
    finished = runner.invoke(app, ["resume", record.job_id, "--yes"])
    assert finished.exit_code == 1 and "is finished" in finished.output
    assert "--trials N" in finished.output  # the hint: how to run more
    more = runner.invoke(app, ["resume", record.job_id, "--trials", "4", "--yes"],
                         catch_exceptions=False)  # fmt: skip
    assert more.exit_code == 0, more.output
    assert re.findall(r"^trial (\d+)/4: ", more.output, flags=re.MULTILINE) == ["3", "4"]
    events = JobStore().events(record.job_id)
    numbers = [event.number for event in events if getattr(event, "type", "") == "trial"]
    assert numbers == [1, 2, 3, 4]
    resumed = JobStore().load(record.job_id)
    assert resumed.status == "finished" and resumed.n_trials == 4 and resumed.saved_model_dir
