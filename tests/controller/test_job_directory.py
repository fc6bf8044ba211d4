"""One worker per job directory, and a cancel that really stops it.

A stand-in worker (a small Python program that ignores SIGTERM, as a worker deep inside one long
computation does) is started the way hctl starts workers (`job_protocol.launch_command`, detached).
`hctl cancel` must end it and say how; a second `hctl run` on its job directory must be refused
before anything starts; and a second writer of a job's events is refused before it writes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hctl.cli import app
from hctl.remote.local import LocalRemote
from hctl.services import job_protocol, runs, stopping
from hctl.services.jobs import JobRecord, JobStore
from hctl.services.toolkit import default_toolkit
from hctl.settings import load_settings
from hctl_worker.events import EventWriter, LogEvent, read_events
from tests.conftest import REPO_ROOT

TINY = str(REPO_ROOT / "tests" / "fixtures" / "tiny-refuser")

STUBBORN_WORKER = """\
import os, pathlib, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
job = pathlib.Path(sys.argv[sys.argv.index("--job-dir") + 1])
(job / "workers").mkdir(exist_ok=True)
(job / "workers" / "1.pid").write_text(str(os.getpid()))
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def stubborn_job(tmp_path: Path):  # noqa: ANN201
    """A job directory whose worker ignores SIGTERM; yields its folder and the worker's pid."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_WORKER)
    worker = f"{sys.executable} {script}"
    LocalRemote().run(job_protocol.launch_command(worker, str(job_dir)), timeout=30)
    pid_file = job_dir / "workers" / "1.pid"
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    yield job_dir, pid
    if alive(pid):
        os.kill(pid, 9)


def test_cancel_kills_a_worker_that_ignores_sigterm_and_says_so(
    stubborn_job, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_dir, pid = stubborn_job
    monkeypatch.setattr(stopping, "STOP_GRACE_S", 1.0)
    store = JobStore()
    record = store.save(
        JobRecord(job_id="1129-0000-abcd", model="m", worker_model="m", n_trials=5,
                  target="local", remote_job_dir=str(job_dir), status="running")
    )  # fmt: skip
    notes: list[str] = []
    runs.cancel_job(record, default_toolkit(load_settings()), notes.append)
    assert not alive(pid)
    assert any(note.startswith("worker killed") for note in notes), notes
    assert store.load(record.job_id).status == "cancelled"


def test_a_second_run_on_a_busy_job_directory_is_refused_before_it_starts(stubborn_job) -> None:
    job_dir, pid = stubborn_job
    result = CliRunner().invoke(
        app, ["run", TINY, "--on", "local", "--output", str(job_dir), "--trials", "2", "--yes"]
    )
    assert result.exit_code != 0
    assert f"A worker is already running in {job_dir}" in result.output
    assert "hint:" in result.output
    assert JobStore().list() == []  # no job was recorded for it
    assert alive(pid)  # the running worker was left alone


def test_workers_sharing_a_job_write_one_stream_of_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first, second = EventWriter(path, "1"), EventWriter(path, "2")
    first.emit(LogEvent(message="one"))
    second.emit(LogEvent(message="two"))
    first.emit(LogEvent(message="three"))
    with EventWriter(path, "1") as successor:  # a worker started again continues the stream
        successor.emit(LogEvent(message="four"))
    events, _ = read_events(path)
    assert [event.seq for event in events] == [0, 1, 2, 3]
    assert [event.worker for event in events] == ["1", "2", "1", "1"]
