"""Output that other programs and narrow terminals can use: ids and paths are never broken.

Piped (`| cat`, `| grep`) at 80 columns, `hctl list-pods`, `jobs`, `results` and `gpus` keep
every id and path whole on one line and print plain tab-separated rows; `--json` gives the same
data; on an 80-column terminal tables keep their id and path columns whole too. Errors, even
with `[brackets]`, are printed as written.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hctl.cli import app
from hctl.errors import ConfigError
from hctl.output import Column, print_table, render_error
from hctl.services.jobs import JobRecord, JobStore
from hctl_worker.events import DoneEvent, EventWriter, StartEvent, TrialEvent

LONG = "hctl-a-pod-name-long-enough-to-be-wrapped-at-eighty-columns-0123456789"
DEEP = "/home/someone/models/a/very/deep/folder/that/does/not/fit/in/eighty/columns/trial-1"


def whole_on_one_line(text: str, value: str) -> bool:
    return any(value in line for line in text.splitlines())


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


def invoke(*arguments: str):  # noqa: ANN201
    result = CliRunner().invoke(app, list(arguments))
    assert result.exit_code == 0, result.output
    return result


def a_finished_job(store: JobStore) -> JobRecord:
    record = JobRecord(
        job_id="1129-1614-975a", model=DEEP.rsplit("/", 1)[0], worker_model=DEEP, n_trials=2,
        target="local", remote_job_dir=DEEP.rsplit("/", 1)[0] + "/job", status="finished",
        chosen_trial=1, saved_model_dir=DEEP,
    )  # fmt: skip
    store.save(record)
    with EventWriter(store.events_path(record.job_id)) as writer:
        writer.emit(StartEvent(job_id=record.job_id, model=record.model, n_trials=2,
                               worker_version="0"))  # fmt: skip
        for number, refusals, kl in ((1, 0, 0.01), (2, 3, 0.002)):
            writer.emit(TrialEvent(number=number, n_trials=2, params={"scope": "global"}, kl=kl,
                                   refusals=refusals, total_bad=9, seconds=0.1))  # fmt: skip
        writer.emit(DoneEvent(results_dir="r"))
    return record


def test_list_pods_piped_keeps_ids_names_and_endpoints_whole(hctl_runpod_env, narrow) -> None:
    pod = hctl_runpod_env.add_pod(name=LONG)
    result = invoke("list-pods")
    assert whole_on_one_line(result.stdout, LONG) and whole_on_one_line(result.stdout, pod["id"])
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0][:3] == ["name", "id", "status"]
    assert [LONG, pod["id"], "running"] in [row[:3] for row in rows]  # the provider-neutral word
    listed = json.loads(invoke("list-pods", "--json").stdout)
    assert [entry["id"] for entry in listed] == [pod["id"]]


def test_gpus_piped_keeps_every_gpu_id_whole(hctl_runpod_env, narrow) -> None:
    result = invoke("gpus")
    ids = [gpu["id"] for gpu in json.loads(invoke("gpus", "--json").stdout)]
    assert ids and all(whole_on_one_line(result.stdout, gpu_id) for gpu_id in ids)
    assert all(len(line.split("\t")) == 7 for line in result.stdout.splitlines())


def test_jobs_and_results_piped_keep_ids_and_paths_whole(narrow) -> None:
    record = a_finished_job(JobStore())
    jobs = invoke("jobs")
    assert whole_on_one_line(jobs.stdout, record.job_id)
    assert whole_on_one_line(jobs.stdout, record.model)
    results = invoke("results", record.job_id)
    assert whole_on_one_line(results.stdout, DEEP)
    assert whole_on_one_line(results.stdout, f"hctl-worker chat {DEEP}")
    data = json.loads(invoke("results", record.job_id, "--json").stdout)
    assert data["job"]["saved_model_dir"] == DEEP and [t["number"] for t in data["front"]] == [1, 2]
    assert json.loads(invoke("jobs", "--json").stdout)[0]["job_id"] == record.job_id


def test_a_terminal_table_keeps_whole_columns_whole_at_80_columns() -> None:
    columns = [Column("name", whole=True), Column("id", whole=True), Column("what")]
    rows = [[LONG[:30], "k3j4h5g6f7d8s9", "some words that may fold " * 3]]
    buffer = io.StringIO()
    print_table(
        columns, rows, output=Console(file=buffer, width=80, force_terminal=True, color_system=None)
    )
    assert whole_on_one_line(buffer.getvalue(), LONG[:30])
    assert whole_on_one_line(buffer.getvalue(), "k3j4h5g6f7d8s9")
    assert max(len(line) for line in buffer.getvalue().splitlines()) <= 80


def test_a_table_too_wide_for_the_terminal_becomes_aligned_lines() -> None:
    columns = [Column("path", whole=True), Column("id", whole=True)]
    buffer = io.StringIO()
    terminal = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    print_table(columns, [[DEEP, LONG]], output=terminal)
    lines = buffer.getvalue().splitlines()
    assert lines[0].split() == ["path", "id"] and lines[1].split() == [DEEP, LONG]


def test_errors_print_brackets_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    render_error(ConfigError("config file x is not valid TOML", "tables go in [brackets]."))
    assert "hint: tables go in [brackets]." in capsys.readouterr().err


def test_help_shows_no_type_tags_on_flags_and_arguments_in_capitals(narrow) -> None:
    text = invoke("run", "--help").stdout
    assert "<bool>" not in text and "{model}" not in text
    assert "Usage: hctl run [OPTIONS] MODEL" in " ".join(text.split())


def test_local_job_data_lives_in_the_data_folder_not_the_config_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HCTL_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    store = JobStore()
    assert store.root == tmp_path / "data" / "hctl" / "jobs"
    assert store.calibration_path == tmp_path / "data" / "hctl" / "calibration.json"


def test_output_to_a_stream_without_arrows_does_not_fail(tmp_path: Path) -> None:
    """Windows writes a pipe or a file in its ANSI code page (cp1252 here), which has no `↓` or
    `←`: the table is printed with `?` for them, not a UnicodeEncodeError."""
    import os
    import subprocess
    import sys

    record = a_finished_job(JobStore())
    environment = {**os.environ, "PYTHONIOENCODING": "cp1252", "COLUMNS": "80"}
    shown = subprocess.run(
        [sys.executable, "-c", "from hctl.cli import main; main()", "results", record.job_id],
        capture_output=True, env=environment, check=False, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr.decode("cp1252", "replace")
    text = shown.stdout.decode("cp1252")
    assert "? chosen" in text and whole_on_one_line(text, DEEP)
    assert b"Traceback" not in shown.stderr
