"""The package's shape: versions agree, the controller stays torch-free, events round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import hctl
import hctl_worker
from hctl.cli import app
from hctl_worker import events


def test_both_halves_report_one_version() -> None:
    assert hctl.__version__ == hctl_worker.__version__
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert hctl.__version__ in result.output


def test_controller_cli_does_not_import_torch() -> None:
    code = "import sys, hctl.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_events_round_trip_and_reading_by_offset_sees_each_event_once(tmp_path: Path) -> None:
    path = tmp_path / events.EVENTS_FILE
    with events.EventWriter(path) as writer:
        writer.emit(events.StageEvent(stage="load"))
        writer.emit(
            events.TrialEvent(
                number=1, n_trials=3, params={"a": 1.0}, kl=0.1, refusals=2, total_bad=10, seconds=1
            )
        )
    first, offset = events.read_events(path)
    assert [event.type for event in first] == ["stage", "trial"]
    # A half-written line is not read until it is complete.
    with path.open("ab") as handle:
        handle.write(b'{"type": "log", "seq": 2, "message": "par')
    again, offset2 = events.read_events(path, offset)
    assert again == [] and offset2 == offset
    with path.open("ab") as handle:
        handle.write(b'tial"}\n')
    rest, _ = events.read_events(path, offset)
    assert [event.type for event in rest] == ["log"]
    # A restarted writer continues the sequence numbers.
    with events.EventWriter(path) as writer:
        assert writer.emit(events.StageEvent(stage="search")).seq == 3


def test_unknown_event_types_are_kept_not_dropped() -> None:
    event = events.decode('{"type": "future-thing", "v": 9, "seq": 4, "x": 1}')
    assert isinstance(event, events.UnknownEvent)
    assert event.seq == 4


def test_the_installed_worker_carries_its_data_files() -> None:
    """Package data reaches an install (the laptop CI runs this on `pip install .`): the
    held-out text of the capability check and the prompts bundled for a machine without the
    hub, each file non-empty."""
    from hctl_worker.job_prompts import BUNDLED_DIR, BUNDLED_FILES

    data = Path(hctl_worker.__file__).parent / "data"
    files = [data / "held_out.txt", *(BUNDLED_DIR / name for name in BUNDLED_FILES.values())]
    assert all(path.is_file() and path.stat().st_size > 0 for path in files), files
