"""`hctl-worker` commands that need no model: version, pareto, trials, help, errors on a bad job
dir."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from hctl_worker import __version__
from hctl_worker.cli import app
from hctl_worker.errors import SettingsError
from hctl_worker.events import EVENTS_FILE, ErrorEvent, TrialEvent, decode, read_events
from hctl_worker.job_directory import JobPaths, find_trial, finished_trials
from hctl_worker.search_space import SearchSpace
from hctl_worker.study import Outcome, open_study, run_search
from hctl_worker.trials import legacy_scores

runner = CliRunner()


def fake_score(values: dict) -> Outcome:
    weight = max(0.0, float(values["attention.max_weight"]))
    return Outcome(legacy_scores(round(20 * (1.5 - weight)), 20, 0.01 * weight))


@pytest.fixture
def searched_job(tmp_path: Path) -> Path:
    """A job directory whose search ran (with a fake engine)."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "settings.toml").write_text('model = "m"\nseed = 1\n', encoding="utf-8")
    study = open_study(JobPaths(job_dir).journal, seed=1, n_startup_trials=3)
    run_search(study, SearchSpace.heretic(6, ("attention", "mlp")), fake_score, n_trials=6)
    return job_dir


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and result.stdout.strip() == __version__


def test_pareto_table_and_json_list_the_same_front(searched_job: Path) -> None:
    as_json = runner.invoke(app, ["pareto", "--job-dir", str(searched_job), "--json"])
    assert as_json.exit_code == 0, as_json.stderr
    front = json.loads(as_json.stdout)
    assert front, "a search with 6 trials has a front"
    refusals = [trial["refusals"] for trial in front]
    assert refusals == sorted(refusals)
    kls = [trial["kl"] for trial in front]
    assert kls == sorted(kls, reverse=True)

    table = runner.invoke(app, ["pareto", "--job-dir", str(searched_job)])
    assert table.exit_code == 0
    # Each row starts with the trial number, which is what --trial takes.
    rows = [line.strip("│┃ ").split() for line in table.stdout.splitlines() if "/" in line]
    assert [int(row[0]) for row in rows] == [trial["number"] for trial in front]


def test_trials_lists_every_finished_trial_as_the_search_reported_it(searched_job: Path) -> None:
    """`trials --events`: one trial event per finished trial, in number order, as the worker
    that ran it would have reported it (its name, the job's trial count from its settings)."""
    (searched_job / "settings.toml").write_text(
        'model = "m"\nseed = 1\nn_trials = 6\n', encoding="utf-8"
    )
    result = runner.invoke(app, ["trials", "--job-dir", str(searched_job), "--events"])
    assert result.exit_code == 0, result.stderr
    events = [decode(line) for line in result.stdout.splitlines()]
    assert all(isinstance(event, TrialEvent) for event in events)
    study = {trial.number: trial for trial in finished_trials(JobPaths(searched_job))}
    assert [event.number for event in events] == list(range(1, 7)) == sorted(study)
    for event in events:
        assert event.n_trials == 6 and event.worker == study[event.number].run_by
        assert event.scores == study[event.number].scores
        assert event.params == study[event.number].params
    table = runner.invoke(app, ["trials", "--job-dir", str(searched_job)])
    rows = [line.strip("│┃ ").split() for line in table.stdout.splitlines() if "/" in line]
    assert table.exit_code == 0 and [int(row[0]) for row in rows] == list(range(1, 7))


def test_the_controller_reads_a_study_through_a_shell_as_the_worker_lists_it(
    searched_job: Path, tmp_path: Path
) -> None:
    """`fleet_follow.study_trials`: the real `hctl-worker trials` run through a shell (as on the
    first pod of a job); a job directory without a search gives the worker's error."""
    from hctl.errors import RemoteError
    from hctl.remote.local import LocalRemote
    from hctl.services.fleet_follow import study_trials
    from hctl.services.jobs import JobRecord, PodMember
    from hctl.services.toolkit import local_worker_command

    def record(job_dir: Path) -> JobRecord:
        return JobRecord(job_id="1130-0700-ab12", model="m", worker_model="m", n_trials=6,
                         target="pod", remote_job_dir=str(job_dir),
                         worker_command=local_worker_command(),
                         members=[PodMember(pod_id="p1", remote_job_dir=str(job_dir),
                                            first_worker=1)])  # fmt: skip

    toolkit = SimpleNamespace(connect=lambda view: LocalRemote())
    events = study_trials(record(searched_job), toolkit)  # type: ignore[arg-type]
    study = sorted(finished_trials(JobPaths(searched_job)), key=lambda trial: trial.number)
    assert [event.number for event in events] == [trial.number for trial in study]
    assert [event.scores for event in events] == [trial.scores for trial in study]
    with pytest.raises(RemoteError, match="has no search yet"):
        study_trials(record(tmp_path / "empty"), toolkit)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["pareto", "trials"])
def test_pareto_of_a_folder_without_a_search(tmp_path: Path, command: str) -> None:
    result = runner.invoke(app, [command, "--job-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "hint: " in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_export_of_an_unknown_trial_names_the_range(searched_job: Path) -> None:
    result = runner.invoke(
        app,
        ["export", "--job-dir", str(searched_job), "--trial", "99", "--save-directory", "out"],
    )
    assert result.exit_code == 2
    assert "no finished trial 99" in result.stderr and "1-6" in result.stderr
    events, _ = read_events(searched_job / EVENTS_FILE)
    assert isinstance(events[-1], ErrorEvent) and "99" in events[-1].message


@pytest.mark.parametrize("command", ["export", "evaluate"])
def test_a_job_without_a_finished_trial_says_to_run_its_search(
    tmp_path: Path, command: str
) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "settings.toml").write_text('model = "m"\nseed = 1\n', encoding="utf-8")
    open_study(JobPaths(job_dir).journal, seed=1, n_startup_trials=3)
    extra = ["--save-directory", str(tmp_path / "out")] if command == "export" else []
    result = runner.invoke(app, [command, "--job-dir", str(job_dir), "--trial", "1", *extra])
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    error, hint = result.stderr.strip().splitlines()[-2:]
    assert error == "error: job job has no finished trial yet (trial 1 was asked for)"
    assert hint.startswith("hint: Run its search first: hctl-worker run --job-dir DIR")


def test_trial_numbers_with_gaps_are_not_named_as_a_range(searched_job: Path) -> None:
    kept = [trial for trial in finished_trials(JobPaths(searched_job)) if trial.number != 3]
    with pytest.raises(SettingsError) as raised:
        find_trial(kept, 3, "job")
    assert "(it has 5 finished, numbered 1-6)" in raised.value.message


def test_export_needs_a_destination(searched_job: Path) -> None:
    result = runner.invoke(app, ["export", "--job-dir", str(searched_job), "--trial", "1"])
    assert result.exit_code == 2 and "nothing to export to" in result.stderr


def test_run_help_lists_the_contract_options() -> None:
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    for option in ("--config", "--job-dir", "--events", "--n-trials", "--model", "--set"):
        assert option in result.stdout


def test_bad_set_assignment_is_reported_in_the_job(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet"
    refused = runner.invoke(app, ["run", "--job-dir", str(missing), "--set", "oops", "--events"])
    assert refused.exit_code == 2 and not missing.exists()  # no job directory made for a typo
    job_dir = tmp_path / "job"
    job_dir.mkdir()  # as the controller makes it before it starts the worker
    result = runner.invoke(app, ["run", "--job-dir", str(job_dir), "--set", "oops", "--events"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.stderr
    # With --events the error event is on stdout too, exactly as written to the file.
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert printed[-1]["type"] == "error"
    events, _ = read_events(job_dir / EVENTS_FILE)
    assert events[-1].model_dump(mode="json") == printed[-1]


def test_progress_view_prints_one_line_per_stage_and_trial_off_a_terminal() -> None:
    import io

    from rich.console import Console

    from hctl_worker.events import BaselineEvent, ParetoEvent, StageEvent, TrialEvent
    from hctl_worker.progress import ProgressView
    from hctl_worker.trials import Trial

    output = io.StringIO()
    with ProgressView(Console(file=output, width=120)) as view:
        view(StageEvent(stage="baseline", state="start"))
        view(BaselineEvent(refusals=85, total_bad=86, refusals_good=0, total_good=62))
        view(StageEvent(stage="baseline", state="end", seconds=0.5, message="85/86 refusals"))
        view(
            TrialEvent(
                number=1, n_trials=40, params={}, kl=0.0021, refusals=3, total_bad=86, seconds=0.4
            )
        )
        view(ParetoEvent(trials=[Trial(number=1, kl=0.0021, refusals=3, total_bad=86)]))
    lines = output.getvalue().splitlines()
    assert lines == [
        "baseline: started",
        "original model: 85/86 refusals (harmless: 0/62)",
        "baseline: done in 0.5 s 85/86 refusals",
        "trial 1/40: KeywordRate 3/86, KLDivergence 0.0021 (0.4 s)",
    ]
    assert view.front[0].number == 1
