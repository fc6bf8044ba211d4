"""A disk that fills up under a job: one error line and a hint, the job directory still whole
lines, and the same command afterwards finishes the search with every trial kept.

A full disk is stood in for by a file size limit (RLIMIT_FSIZE): the system then refuses a write
part way, as a full disk does, and needs no mount (tests do not run as root).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hctl_worker.errors import DiskError, disk_error
from hctl_worker.events import EVENTS_FILE, JOURNAL_FILE
from hctl_worker.line_log import append_lines
from tests.worker.test_end_to_end import write_fixture_config

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs RLIMIT_FSIZE")

LIMITED = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from hctl_worker.cli import main
sys.argv = ["hctl-worker", *sys.argv[2:]]
main()
"""


def limited(limit: int, *arguments: str) -> subprocess.CompletedProcess:
    """hctl-worker in a process whose files may not grow past `limit` bytes (CPython ignores
    SIGXFSZ, so a write past it fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    return subprocess.run(
        [sys.executable, "-c", LIMITED, str(limit), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
    )


def whole_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), data[-80:]
    return [json.loads(line) for line in data.splitlines()]


@posix_only
def test_a_job_whose_disk_fills_stops_with_a_hint_and_resumes_whole(tmp_path: Path) -> None:
    config = write_fixture_config(tmp_path / "config.toml", n_trials=12, n_startup_trials=4,
                                  batch_size=32, max_response_length=4)  # fmt: skip
    job = tmp_path / "job"
    arguments = ("run", "--config", str(config), "--job-dir", str(job), "--events")
    stopped = limited(24_000, *arguments)
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    error, hint = stopped.stderr.strip().splitlines()[-2:]
    assert error.startswith("error: cannot write ") and "largest size" in error
    assert hint.startswith("hint: ") and "run the same command again" in hint
    before = whole_lines(job / JOURNAL_FILE)
    whole_lines(job / EVENTS_FILE)
    finished = limited(1 << 30, *arguments)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert whole_lines(job / JOURNAL_FILE)[: len(before)] == before  # nothing lost
    trials = [e for e in whole_lines(job / EVENTS_FILE) if e["type"] == "trial"]
    assert sorted({event["number"] for event in trials}) == list(range(1, 13))


@posix_only
def test_a_failed_append_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":')  # a fragment an older failed write left
    script = (
        "import resource, sys; sys.path.insert(0, sys.argv[2]);"
        "from hctl_worker.line_log import append_lines; from pathlib import Path;"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20, 20));"
        "append_lines(Path(sys.argv[1]), b'{\"c\":\"' + b'x' * 40 + b'\"}\\n')"
    )
    worker = str(Path(__file__).resolve().parents[2] / "worker")
    failed = subprocess.run([sys.executable, "-c", script, str(path), worker],
                            capture_output=True, text=True)  # fmt: skip
    assert failed.returncode != 0 and "File too large" in failed.stderr
    assert path.read_bytes() == b'{"a":1}\n'  # its fragment and the old one cut
    assert append_lines(path, b'{"d":2}\n') == len(b'{"a":1}\n{"d":2}\n')
    assert path.read_bytes() == b'{"a":1}\n{"d":2}\n'


def test_writes_the_system_refuses_are_named_with_what_to_do() -> None:
    full = disk_error(OSError(errno.ENOSPC, "No space left on device"), "/jobs/a")
    assert isinstance(full, DiskError) and full.exit_code == 2
    assert full.message == "cannot write /jobs/a: no space left on the disk"
    assert "run the same command again" in full.hint
    read_only = disk_error(OSError(errno.EROFS, "Read-only file system", "/jobs/a/worker.log"))
    assert read_only is not None and "/jobs/a/worker.log" in read_only.message
    assert "writable volume" in read_only.hint
    assert disk_error(OSError(errno.ENOENT, "No such file or directory")) is None
