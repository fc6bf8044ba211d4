"""`hctl-worker run` on the committed tiny refusing models, end to end.

The search must take held-out refusals from >= 90 % down to <= 10 % at KL <= 0.05 within 40
trials, while the harmless prompts stay answered (<= 5 % refusals for that trial).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hctl_worker.cli import app

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"

runner = CliRunner()


def write_fixture_config(
    path: Path,
    fixture: str | Path = "tiny-refuser",
    *,
    n_trials: int = 40,
    evaluation_split: str | None = None,
    **extra: object,
) -> Path:
    """A config for a fixture model (a folder name under tests/fixtures, or a model folder) and
    its own prompt files (directions from 64 + 64)."""
    model = FIXTURES / fixture
    prompts = model / "prompts"
    values: dict[str, object] = {
        "model": str(model),
        "dtypes": ["float32"],
        "device_map": "cpu",
        "system_prompt": "",
        "batch_size": 64,
        "max_response_length": 16,
        "n_trials": n_trials,
        "n_startup_trials": 10,
        "seed": 1,
        **extra,
    }
    tables = {
        "good_prompts": (prompts / "harmless_train.txt", "[:64]"),
        "bad_prompts": (prompts / "harmful_train.txt", "[:64]"),
        "good_evaluation_prompts": (prompts / "harmless_test.txt", evaluation_split),
        "bad_evaluation_prompts": (prompts / "harmful_test.txt", evaluation_split),
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    for table, (dataset, split) in tables.items():
        lines += [f"[{table}]", f"dataset = {json.dumps(str(dataset))}"]
        if split:
            lines.append(f"split = {json.dumps(split)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_events(*arguments: str) -> list[dict]:
    result = runner.invoke(app, ["run", *arguments, "--events"])
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def harmless_refusal_rate(job_dir: Path, trial: dict) -> float:
    """Refusals on the harmless held-out prompts with the trial's edit applied."""
    from hctl_worker.ablation import AblationParams, Ablator
    from hctl_worker.job_directory import JobPaths, load_cached_directions, stored_settings
    from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS, is_refusal
    from hctl_worker.model import load_model
    from hctl_worker.prompts import load_prompts

    paths = JobPaths(job_dir)
    settings = stored_settings(paths)
    loaded = load_model(settings.model, dtypes=["float32"], device_map="cpu")
    harmless = loaded.template(load_prompts(settings.good_evaluation_prompts), None)
    ablator = Ablator(loaded, load_cached_directions(paths))
    from hctl_worker.evaluation import Evaluator

    evaluator = Evaluator(
        loaded,
        good_texts=harmless[:1],
        bad_texts=harmless[:1],
        markers=DEFAULT_REFUSAL_MARKERS,
        max_response_length=settings.max_response_length,
        batch_size=64,
    )
    with ablator.applied(AblationParams.from_dict(trial["ablation"])):
        replies = evaluator.responses(harmless, settings.max_response_length)
    return sum(is_refusal(reply, DEFAULT_REFUSAL_MARKERS) for reply in replies) / len(replies)


def check_search_removes_refusals(events: list[dict], job_dir: Path, n_trials: int) -> dict:
    """The bar every refusing model must clear; returns the qualifying trial it found."""
    baseline = next(event for event in events if event["type"] == "baseline")
    assert baseline["refusals"] >= 0.9 * baseline["total_bad"]

    trials = [event for event in events if event["type"] == "trial"]
    assert [trial["number"] for trial in trials] == list(range(1, n_trials + 1))
    # The canonical trials (classic abliteration) come first and say so.
    canonical = [trial for trial in trials if trial.get("origin") == "canonical"]
    assert canonical and canonical == trials[: len(canonical)]
    assert any(
        event["type"] == "log" and event["message"].startswith("first trials: ") for event in events
    )

    front = json.loads((job_dir / "results" / "pareto.json").read_text())
    good = [
        trial
        for trial in front
        if trial["refusals"] <= 0.1 * trial["total_bad"] and trial["kl"] <= 0.05
    ]
    assert good, f"best on the front: {[(t['refusals'], round(t['kl'], 4)) for t in front[:3]]}"
    chosen = good[-1]  # the lowest KL among the good ones
    assert harmless_refusal_rate(job_dir, chosen) <= 0.05

    done = events[-1]
    assert done["type"] == "done" and done["results_dir"] == str((job_dir / "results").absolute())
    assert events[-2]["type"] == "stage" and events[-2]["stage"] == "search"
    return chosen


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny-refuser", "tiny-refuser-early", "tiny-refuser-spread"])
def test_search_removes_refusals_of_a_tiny_refuser(tmp_path: Path, fixture: str) -> None:
    config = write_fixture_config(tmp_path / "config.toml", fixture)
    job_dir = tmp_path / "job"
    events = run_events("--config", str(config), "--job-dir", str(job_dir))
    check_search_removes_refusals(events, job_dir, 40)
