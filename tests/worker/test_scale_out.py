"""One search, several real `hctl-worker` processes: on one journal, and from two job directories
on a real PostgreSQL server. Exactly `n_trials` finish, numbered once each, every worker runs some,
and the front the controller shows from the events is the front of the study; a worker killed
with SIGKILL mid-trial loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hctl.services.progress import JobProgress
from hctl_worker.events import EVENTS_FILE, read_events
from hctl_worker.startup import CANONICAL, KEY_ATTR, PLAN_ATTR
from hctl_worker.storage import journal_storage
from hctl_worker.study import FINISHED, STUDY_NAME, finished_trials, open_study
from hctl_worker.teamwork import OWNER_ATTR
from hctl_worker.trials import pareto_front
from tests.standins.postgres import PostgresServer
from tests.worker.test_end_to_end import write_fixture_config

pytestmark = pytest.mark.slow
WORKER = str(Path(sys.executable).parent / "hctl-worker")
# Short beats, so a dead worker's trial is taken over within seconds.
TEAM = {"heartbeat_seconds": 0.5, "stale_after_seconds": 4.0}


def config(tmp_path: Path, n_trials: int) -> Path:
    return write_fixture_config(
        tmp_path / "config.toml", n_trials=n_trials, evaluation_split="[:24]", **TEAM
    )


def start(
    config_file: Path,
    job_dir: Path,
    *extra: str,
    env: dict | None = None,
    read_events_live: bool = False,
) -> subprocess.Popen:
    """A worker process. Its output goes to files beside the job directory (a pipe nobody
    reads until the end fills up, and a worker blocked writing an event while it holds the
    study's lock stops every other worker); `read_events_live` pipes its events instead, for a
    test that reads them as they come."""
    job_dir.mkdir(parents=True, exist_ok=True)
    command = [WORKER, "run", "--config", str(config_file), "--job-dir", str(job_dir), *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    logs = job_dir.parent / "worker-output"
    logs.mkdir(exist_ok=True)
    number = len(list(logs.glob("*.err")))
    stderr_path = logs / f"{number}.err"
    with stderr_path.open("w") as stderr:
        stdout = subprocess.PIPE if read_events_live else (logs / f"{number}.out").open("w")
        process = subprocess.Popen(
            [*command, "--events"], stdout=stdout, stderr=stderr, text=True, env=environment
        )
    if not read_events_live:
        stdout.close()  # the child has its own copy
    process.stderr_path = stderr_path  # type: ignore[attr-defined]
    return process


def finish(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        worker.wait(timeout=540)
        stderr = worker.stderr_path.read_text(encoding="utf-8")  # type: ignore[attr-defined]
        assert worker.returncode == 0, stderr[-3000:]


def controller_view(*job_dirs: Path) -> JobProgress:
    """What the controller shows: every job directory's events, read by offset, in one view."""
    progress = JobProgress()
    for job_dir in job_dirs:
        for event in read_events(job_dir / EVENTS_FILE)[0]:
            progress.apply(event)
    return progress


def check_search(study: optuna.Study, n_trials: int, workers: set[str], *job_dirs: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    finished = [
        trial for trial in trials if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    assert len(finished) == n_trials
    assert not [trial for trial in trials if trial.state == TrialState.RUNNING]
    numbers = sorted(trial.user_attrs["number"] for trial in finished)
    assert numbers == list(range(1, n_trials + 1))
    ran = {trial.user_attrs["run_by"] for trial in finished}
    assert ran == workers, f"every worker runs trials: {ran} of {workers}"
    view = controller_view(*job_dirs)
    assert sorted(view.trials) == numbers  # every trial shown, none twice
    assert {trial.run_by for trial in view.trials.values()} == workers
    expected = [trial.number for trial in pareto_front(finished_trials(study))]
    assert [trial.number for trial in view.front()] == expected
    # One stream per events file: sequence numbers 0, 1, 2... across its workers.
    for job_dir in job_dirs:
        events = read_events(job_dir / EVENTS_FILE)[0]
        assert [event.seq for event in events] == list(range(len(events)))


def journal_study(job_dir: Path) -> optuna.Study:
    return open_study(journal_storage(job_dir / "study.journal"), seed=0, n_startup_trials=0)


@pytest.mark.parametrize("n_workers", [2, 3])
def test_workers_on_one_journal_share_one_search(tmp_path: Path, n_workers: int) -> None:
    # A tiny-model trial takes ~0.05 s: with 12, a worker that reached its search half a second
    # after the others on a loaded 2-core machine found every trial taken (CI, once).
    n_trials = 30
    config_file = config(tmp_path, n_trials)
    job_dir = tmp_path / "job"
    workers = [start(config_file, job_dir) for _ in range(n_workers)]
    finish(workers)
    names = {str(number) for number in range(1, n_workers + 1)}
    study = journal_study(job_dir)
    check_search(study, n_trials, names, job_dir)
    # The first points were queued once for the study, not once per worker: every planned point
    # ran once, the canonical ones (classic abliteration) among them.
    plan = study.user_attrs[PLAN_ATTR]
    ran = [trial.user_attrs.get(KEY_ATTR) for trial in study.get_trials(states=FINISHED)]
    planned = [key for key in ran if key is not None]
    assert len(planned) == len(set(planned)) and set(planned) <= set(plan)
    canonical = [key for key in plan if key.startswith(CANONICAL)]
    assert canonical and set(canonical) <= set(planned)
    events = read_events(job_dir / EVENTS_FILE)[0]
    assert {event.worker for event in events if event.type == "done"} == names
    # The directions were computed once, by one worker; the others read them.
    ends = [
        event
        for event in read_events(job_dir / EVENTS_FILE)[0]
        if event.type == "stage" and event.stage == "directions" and event.state == "end"
    ]
    assert sum(not event.message.startswith("from cache") for event in ends) == 1


def test_workers_on_two_machines_share_a_study_in_postgresql(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    database = postgres_server.database("scale-test")
    n_trials = 12
    config_file = config(tmp_path, n_trials)
    job_dirs = [tmp_path / "machine-a" / "job", tmp_path / "machine-b" / "job"]
    secret = {"PGPASSWORD": database.password}
    workers = [
        start(config_file, job_dir, "--storage", database.url, "--worker", name, env=secret)
        for job_dir, name in zip(job_dirs, ("a", "b"), strict=True)
    ]
    finish(workers)
    os.environ["PGPASSWORD"] = database.password
    try:
        storage = optuna.storages.RDBStorage(
            database.url.replace("postgresql://", "postgresql+psycopg://")
        )
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        check_search(study, n_trials, {"a", "b"}, *job_dirs)
    finally:
        del os.environ["PGPASSWORD"]
    for job_dir in job_dirs:
        # The password is nowhere on disk in the job directories; the URL is recorded without it.
        assert (job_dir / "storage.url").read_text().strip() == database.url
        for path in job_dir.rglob("*"):
            if path.is_file():
                assert database.password.encode() not in path.read_bytes(), path


def test_a_worker_killed_mid_trial_loses_nothing(tmp_path: Path) -> None:
    # Enough trials that the victim is still searching while the journal is polled for one of
    # its trials in flight (ten fixture trials can all end between two polls on a busy machine).
    n_trials = 30
    config_file = config(tmp_path, n_trials)
    job_dir = tmp_path / "job"
    victim = start(config_file, job_dir, "--worker", "victim", read_events_live=True)
    survivor = start(config_file, job_dir, "--worker", "survivor")
    assert victim.stdout is not None
    for line in victim.stdout:
        event = json.loads(line)
        if event["type"] == "trial" and event["worker"] == "victim":
            break
    # Wait until the victim is inside a trial of its own, then kill it without warning.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = [
            trial
            for trial in journal_study(job_dir).get_trials(states=(TrialState.RUNNING,))
            if str(trial.system_attrs.get(OWNER_ATTR, "")).endswith(":victim") and trial.params
        ]
        if running:
            break
        time.sleep(0.05)
    assert running, "the victim started another trial"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    finish([survivor])

    study = journal_study(job_dir)
    check_search(study, n_trials, {"victim", "survivor"}, job_dir)
    # The victim may have been running several trials at once (`trials_together`): each of them
    # is failed, and its point ran again, to the end, on the survivor (killed while it was still
    # drawing a point, the victim's trial holds part of it: that part is kept, the rest drawn
    # anew; an earlier trial may share such a part by chance, so only trials queued after it
    # count).
    failed = study.get_trials(states=(TrialState.FAIL,))
    # A trial seen running may have ended between the last poll and the kill (fixture trials
    # take a fraction of a second): then it is the victim's finished trial, not a failed one.
    ended = {
        trial.number
        for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
        if trial.user_attrs.get("run_by") == "victim"
    }
    assert {trial.number for trial in running} <= {trial.number for trial in failed} | ended
    for abandoned in [trial for trial in failed if trial.params]:
        again = [
            trial
            for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
            if trial.number > abandoned.number and abandoned.params.items() <= trial.params.items()
        ]
        assert again and again[0].user_attrs["run_by"] == "survivor"
