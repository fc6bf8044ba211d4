"""The job directory: settings kept across restarts, one worker per name, stage events."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hctl_worker.errors import JobDirectoryError, SettingsError
from hctl_worker.events import EVENTS_FILE, StageEvent, read_events
from hctl_worker.job_directory import (
    JobPaths,
    open_job_directory,
    read_front,
    reconcile_settings,
    stored_settings,
    worker_slot,
)
from hctl_worker.reporter import Reporter
from hctl_worker.settings import WorkerSettings


def test_a_new_job_draws_and_keeps_its_seed(tmp_path: Path) -> None:
    paths = open_job_directory(tmp_path / "job")
    first = reconcile_settings(paths, WorkerSettings(model="m", n_trials=5))
    assert first.seed is not None
    assert stored_settings(paths).seed == first.seed
    # The restart has no seed given: it continues with the job's own.
    again = reconcile_settings(paths, WorkerSettings(model="m", n_trials=9))
    assert again.seed == first.seed
    assert stored_settings(paths).n_trials == 9  # what may change is updated


def test_changing_what_the_search_measures_is_refused(tmp_path: Path) -> None:
    paths = open_job_directory(tmp_path / "job")
    reconcile_settings(paths, WorkerSettings(model="m", max_response_length=16))
    before = paths.settings.read_text()
    with pytest.raises(SettingsError) as raised:
        reconcile_settings(paths, WorkerSettings(model="m", max_response_length=32))
    assert "max_response_length" in raised.value.message
    assert paths.settings.read_text() == before


def test_a_job_needs_a_model(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no model"):
        reconcile_settings(open_job_directory(tmp_path / "job"), WorkerSettings())


SLEEPER = "import time; print('ready', flush=True); time.sleep(30)"


def started(command: list[str]) -> subprocess.Popen:
    """A process that has really started (its own command line is in place)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def test_workers_on_one_job_get_their_own_names_and_a_taken_name_is_refused(
    tmp_path: Path,
) -> None:
    paths = open_job_directory(tmp_path / "job")
    paths.workers.mkdir()
    # A live process that looks like a worker (its command line names hctl_worker) holds "1".
    other = started([sys.executable, "-c", SLEEPER, "hctl_worker"])
    try:
        paths.pid("1").write_text(f"{other.pid}\n")
        with worker_slot(paths) as name:
            assert name == "2" and paths.pid("2").read_text().strip() == str(os.getpid())
        with pytest.raises(JobDirectoryError, match=str(other.pid)), worker_slot(paths, "1"):
            pass
    finally:
        other.kill()
        other.wait()
    # A stale pid (that process is gone) is taken over, and cleaned up afterwards: a worker
    # started again takes its predecessor's name.
    with worker_slot(paths) as name:
        assert name == "1" and paths.pid("1").read_text().strip() == str(os.getpid())
    assert not paths.pid("1").exists()
    with pytest.raises(JobDirectoryError, match="not a worker name"), worker_slot(paths, "../x"):
        pass


def test_a_pid_reused_by_another_program_is_not_a_worker(tmp_path: Path) -> None:
    paths = open_job_directory(tmp_path / "job")
    paths.workers.mkdir()
    other = started([sys.executable, "-c", SLEEPER])
    try:
        paths.pid("1").write_text(f"{other.pid}\n")
        with worker_slot(paths, "1"):
            assert paths.pid("1").read_text().strip() == str(os.getpid())
    finally:
        other.kill()
        other.wait()


def test_stages_emit_start_and_end_with_seconds(tmp_path: Path) -> None:
    paths = open_job_directory(tmp_path / "job")
    seen = []
    reporter = Reporter(paths, [seen.append])
    with reporter.stage("directions", "64 + 64 prompts") as stage:
        stage.progress(1, 2)
        stage.result = "done well"
    reporter.close()
    events, _ = read_events(paths.root / EVENTS_FILE)
    assert [event.model_dump() for event in events] == [event.model_dump() for event in seen]
    assert [(event.state, event.message) for event in events if isinstance(event, StageEvent)] == [
        ("start", "64 + 64 prompts"),
        ("progress", ""),
        ("end", "done well"),
    ]
    assert events[-1].seconds is not None and events[-1].seconds >= 0


def test_reading_the_front_of_a_folder_without_a_search(tmp_path: Path) -> None:
    with pytest.raises(JobDirectoryError, match="no search yet"):
        read_front(JobPaths(tmp_path))


def test_a_file_in_place_of_the_job_directory(tmp_path: Path) -> None:
    (tmp_path / "job").write_text("not a folder")
    with pytest.raises(JobDirectoryError):
        open_job_directory(tmp_path / "job")
    assert (tmp_path / "job").read_text() == "not a folder"
