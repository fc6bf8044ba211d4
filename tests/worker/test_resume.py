"""A job stopped and started again continues its search: no trial redone, none counted twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hctl_worker.events import EVENTS_FILE, JOURNAL_FILE, StartEvent, TrialEvent, read_events
from tests.worker.test_end_to_end import run_events, write_fixture_config


def journal_trials(job_dir: Path, *, queued: bool = False) -> list[optuna.trial.FrozenTrial]:
    """The trials the journal holds; without `queued`, only those that ran (not the planned
    first trials still waiting for their turn)."""
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(job_dir / JOURNAL_FILE))
    )
    trials = optuna.load_study(study_name="hctl", storage=storage).trials
    return [trial for trial in trials if queued or trial.state != TrialState.WAITING]


def trial_events(job_dir: Path) -> list[TrialEvent]:
    events, _ = read_events(job_dir / EVENTS_FILE)
    return [event for event in events if isinstance(event, TrialEvent)]


@pytest.mark.slow
def test_a_larger_n_trials_continues_at_the_next_trial(tmp_path: Path) -> None:
    config = write_fixture_config(tmp_path / "config.toml", n_trials=3, evaluation_split="[:24]")
    job_dir = tmp_path / "job"
    run_events("--config", str(config), "--job-dir", str(job_dir))
    first = [(trial.params, trial.values) for trial in journal_trials(job_dir)]

    events = run_events("--config", str(config), "--job-dir", str(job_dir), "--n-trials", "5")

    start = next(event for event in events if event["type"] == "start")
    assert start["resumed_trials"] == 3
    assert [event["number"] for event in events if event["type"] == "trial"] == [4, 5]
    # The directions were not computed again.
    directions = next(
        e
        for e in events
        if e["type"] == "stage" and e["state"] == "end" and e["stage"] == "directions"
    )
    assert directions["message"].startswith("from cache")

    trials = journal_trials(job_dir)
    assert [(trial.params, trial.values) for trial in trials[:3]] == first
    assert [trial.user_attrs["number"] for trial in trials] == [1, 2, 3, 4, 5]
    assert [event.number for event in trial_events(job_dir)] == [1, 2, 3, 4, 5]
    # The first trials were planned and queued once, not again on resume.
    planned = [trial.user_attrs.get("planned") for trial in journal_trials(job_dir, queued=True)]
    assert planned[0] == "canonical:3" and len(planned) == len(set(planned))
    sequence = [event.seq for event in read_events(job_dir / EVENTS_FILE)[0]]
    assert sequence == list(range(len(sequence)))

    # Once more with a choice: no trial left to run; the chosen one is checked and saved. A
    # trial on the front: its scores were all measured (a trial far off may skip its refusals).
    pick = json.loads((job_dir / "results" / "pareto.json").read_text())[0]["number"]
    saved = tmp_path / "saved"
    again = run_events(
        "--config",
        str(config),
        "--job-dir",
        str(job_dir),
        "--n-trials",
        "5",
        "--trial",
        str(pick),
        "--save-directory",
        str(saved),
    )
    assert not [event for event in again if event["type"] == "trial"]
    front = [event for event in again if event["type"] == "pareto"][-1]["trials"]
    assert front  # a pareto event, though no trial ran
    chosen = json.loads((job_dir / "results" / "chosen.json").read_text())
    assert chosen["number"] == pick and chosen["automatic"] is False  # --trial is a trial number
    harmless = chosen["scores"]["HarmlessRefusals"]  # measured in every trial
    assert harmless["of"] == 24 and 0 <= harmless["value"] <= 24
    assert again[-1]["type"] == "done" and again[-1]["chosen_trial"] == chosen["number"]
    assert again[-1]["model_dir"] == str(saved) and (saved / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_worker_restarts_without_duplicates(tmp_path: Path) -> None:
    config = write_fixture_config(tmp_path / "config.toml", n_trials=50, evaluation_split="[:24]")
    job_dir = tmp_path / "job"
    command = [
        str(Path(sys.executable).parent / "hctl-worker"),
        "run",
        "--config",
        str(config),
        "--job-dir",
        str(job_dir),
        "--events",
    ]
    worker = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ)
    )
    assert worker.stdout is not None
    for line in worker.stdout:
        event = json.loads(line)
        if event["type"] == "trial" and event["number"] == 2:
            break
    worker.send_signal(signal.SIGKILL)  # no chance to clean up: mid-trial 3
    worker.wait(timeout=30)
    assert (job_dir / "workers" / "1.pid").exists()  # left behind by the killed worker

    events = run_events("--config", str(config), "--job-dir", str(job_dir), "--n-trials", "4")

    start = next(event for event in events if isinstance(event, dict) and event["type"] == "start")
    assert start["resumed_trials"] >= 2
    numbers = [event.number for event in trial_events(job_dir)]
    assert numbers == sorted(set(numbers)) == [1, 2, 3, 4]
    trials = journal_trials(job_dir)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)  # pruned: behind the front, finished
    assert sum(trial.state in finished for trial in trials) == 4
    assert not [trial for trial in trials if trial.state == TrialState.RUNNING]
    start_events = [
        event for event in read_events(job_dir / EVENTS_FILE)[0] if isinstance(event, StartEvent)
    ]
    assert len(start_events) == 2
    assert not (job_dir / "workers" / "1.pid").exists()


def test_a_trial_in_the_journal_without_its_event_is_reported_once_on_restart(
    tmp_path: Path,
) -> None:
    # A worker killed between telling the study and writing the event (or a journal copied home
    # a moment after the events) leaves a finished trial that no event reports.
    config = write_fixture_config(tmp_path / "config.toml", n_trials=3, evaluation_split="[:24]")
    job_dir = tmp_path / "job"
    run_events("--config", str(config), "--job-dir", str(job_dir))
    events_file = job_dir / EVENTS_FILE
    lines = events_file.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if b'"type":"trial"' not in line or b'"number":3' not in line]
    assert len(kept) == len(lines) - 1
    events_file.write_bytes(b"".join(kept))

    events = run_events("--config", str(config), "--job-dir", str(job_dir), "--n-trials", "4")

    assert [event["number"] for event in events if event["type"] == "trial"] == [3, 4]
    assert [event.number for event in trial_events(job_dir)] == [1, 2, 3, 4]
