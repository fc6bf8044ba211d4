"""`hctl run` end to end on a RunPod pod: the emulator rents it, the sshd stand-in is the pod,
the tiny refusing model is searched there."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from hctl.cli import app
from hctl.services.jobs import JobStore
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
    assert pod["name"] == f"hctl-{record.job_id}" and pod["terminateAfter"]
    assert pod["status"] == "EXITED"
    assert f"stopped pod {pod['id']}" in output
    # The journal and events were copied home; the worker's job directory is on the volume.
    assert JobStore().journal_path(record.job_id).stat().st_size > 0
    assert record.remote_job_dir.startswith(str(pod_rig.volume))
