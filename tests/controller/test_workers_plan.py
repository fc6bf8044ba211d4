"""Several workers for one job, planned before anything starts: `--workers` and `--gpus` are
checked, a pod's GPUs get a worker each when the model fits one (else one worker across all),
the estimate counts every GPU, and the launcher runs the workers with a GPU each."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest

from hctl.errors import ConfigError
from hctl.gpus import resolve_gpu
from hctl.remote.local import LocalRemote
from hctl.services.estimate import estimate_job, required_gpu_memory_gb
from hctl.services.job_protocol import EXIT_FILE, launch_command
from hctl.services.models import ModelInfo
from hctl.services.request import RunRequest, check_request
from hctl.services.team import plan_team
from tests.e2e.fakes import CATALOGUE

SMALL = ModelInfo(reference="m/4B", parameters=4_000_000_000)
RTX_4090 = resolve_gpu(CATALOGUE, "RTX 4090")


@pytest.mark.parametrize(
    ("options", "message", "hint"),
    [
        ({"workers": 0, "on": "local"}, "--workers 0", "from 1 to"),
        ({"gpus": 9}, "--gpus 9", "from 1 to 8"),
        ({"workers": 2}, "--workers applies to --on", "--gpus N"),
        ({"gpus": 2, "on": "local"}, "--gpus only applies to a pod", "leave out --on"),
        ({"gpus": 2, "pod": "abc"}, "--gpus only applies to a new pod", "leave out --pod"),
    ],
)
def test_worker_and_gpu_counts_are_checked_before_anything_starts(
    options: dict, message: str, hint: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        check_request(RunRequest(model="m", **options))
    assert hint in (raised.value.hint or "")


def test_a_model_that_fits_one_gpu_gets_a_worker_per_gpu_and_pays_for_every_gpu() -> None:
    team = plan_team(RunRequest(model="m", gpus=4), SMALL, RTX_4090)
    assert (team.gpu_count, team.workers, team.one_gpu_each) == (4, 4, True)
    one = estimate_job(SMALL, RTX_4090, n_trials=200)
    four = estimate_job(SMALL, RTX_4090, n_trials=200, gpu_count=4, workers=4)
    assert four.price_per_hour == pytest.approx(4 * one.price_per_hour)
    assert four.seconds_of("search") == pytest.approx(one.seconds_of("search") / 4)
    assert four.seconds_of("load") == one.seconds_of("load")  # every worker loads it at once
    assert four.gpu_name == "4x RTX 4090" and four.fits


def test_a_model_too_big_for_one_gpu_runs_as_one_worker_across_all_of_them() -> None:
    big = ModelInfo(reference="big/20B", parameters=20_000_000_000)
    count = math.ceil(required_gpu_memory_gb(big) / RTX_4090.memory_gb)
    assert 1 < count <= 8
    team = plan_team(RunRequest(model="m", gpus=count), big, RTX_4090)
    assert (team.gpu_count, team.workers, team.one_gpu_each) == (count, 1, False)
    assert "one worker holds it across" in team.note
    estimate = estimate_job(big, RTX_4090, n_trials=10, gpu_count=count, workers=1)
    assert estimate.fits, estimate.fit_problem
    too_few = estimate_job(big, RTX_4090, n_trials=10, gpu_count=count - 1, workers=1)
    assert not too_few.fits and f"{count - 1}x RTX 4090" in too_few.fit_problem


def test_more_gpus_than_a_pod_offers_are_refused() -> None:
    limited = RTX_4090.model_copy(update={"max_gpu_count": 2})
    with pytest.raises(ConfigError, match="at most 2") as raised:
        plan_team(RunRequest(model="m", gpus=4), SMALL, limited)
    assert "--gpus 2" in raised.value.hint


FAKE_WORKER = """\
import os, pathlib, sys
job = pathlib.Path(sys.argv[sys.argv.index("--job-dir") + 1])
name = sys.argv[sys.argv.index("--worker") + 1]
(job / f"ran-{name}").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
sys.exit(3 if name == "2" else 0)
"""


def test_the_launcher_runs_each_worker_on_its_own_gpu_and_keeps_the_first_failure(
    tmp_path: Path,
) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    command = launch_command(
        f"{sys.executable} {script}", str(job_dir), workers=3, one_gpu_each=True
    )
    LocalRemote().run(command, timeout=30)
    deadline = time.monotonic() + 30
    while not (job_dir / EXIT_FILE).is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    ran = {path.name: path.read_text() for path in job_dir.glob("ran-*")}
    assert ran == {"ran-1": "0", "ran-2": "1", "ran-3": "2"}
    assert (job_dir / EXIT_FILE).read_text().strip() == "3"  # worker 2's failure is the job's
