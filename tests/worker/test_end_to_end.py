"""`hctl-worker run` on the committed tiny refusing models, end to end.

The search must take held-out refusals from >= 90 % down to <= 10 % at KL <= 0.05 within 40
trials, while the harmless prompts stay answered (<= 5 % refusals for that trial).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
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
    for table, (dataset, split) in tables.items():
        values[table] = {"dataset": str(dataset), **({"split": split} if split else {})}
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    return path


def run_events(*arguments: str) -> list[dict]:
    result = runner.invoke(app, ["run", *arguments, "--events"])
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def harmless_refusals(job_dir: Path, trial: dict, harmful: bool = False) -> int:
    """Refusals on the harmless (or `harmful`) held-out prompts with the trial's edit applied,
    counted here with heretic's markers from full greedy replies (not by the worker's scorer)."""
    from hctl_worker.ablation import AblationParams, Ablator
    from hctl_worker.direction_cache import load_cached_directions
    from hctl_worker.evaluation import EvaluationPrompts, Evaluator
    from hctl_worker.job_directory import JobPaths, stored_settings
    from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS, is_refusal
    from hctl_worker.model import load_model
    from hctl_worker.prompts import load_prompts

    paths = JobPaths(job_dir)
    settings = stored_settings(paths)
    loaded = load_model(settings.model, dtypes=["float32"], device_map="cpu")
    prompts = settings.bad_evaluation_prompts if harmful else settings.good_evaluation_prompts
    harmless = loaded.template(load_prompts(prompts), None)
    ablator = Ablator(loaded, load_cached_directions(paths))
    one = EvaluationPrompts(harmless[:1], harmless[:1])
    evaluator = Evaluator(
        loaded,
        harmless=one,
        harmful=one,
        max_response_length=settings.max_response_length,
        batch_size=64,
    )
    with ablator.applied(AblationParams.from_dict(trial["ablation"])):
        replies = evaluator.responses(harmless, settings.max_response_length)
    return sum(is_refusal(reply, DEFAULT_REFUSAL_MARKERS) for reply in replies)


def check_search_shape(events: list[dict], n_trials: int) -> None:
    """A refusing baseline, every trial number once, the canonical trials first and said so."""
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


def check_search_removes_refusals(events: list[dict], job_dir: Path, n_trials: int) -> dict:
    """The bar every refusing model must clear; returns the qualifying trial it found."""
    check_search_shape(events, n_trials)

    front = json.loads((job_dir / "results" / "pareto.json").read_text())
    good = [
        trial
        for trial in front
        if trial["refusals"] <= 0.1 * trial["total_bad"] and trial["kl"] <= 0.05
    ]
    assert good, f"best on the front: {[(t['refusals'], round(t['kl'], 4)) for t in front[:3]]}"
    # The guard is left unmeasured only for trials the front beat (never for a front trial).
    assert all(trial["scores"]["HarmlessRefusals"]["value"] is not None for trial in front)
    chosen = good[-1]  # the lowest KL among the good ones
    harmless = chosen["scores"]["HarmlessRefusals"]
    assert harmless["value"] <= 0.05 * harmless["of"]
    assert harmless_refusals(job_dir, chosen) == harmless["value"]

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


CLASSIFIER = FIXTURES / "tiny-refusal-classifier"


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny-refuser", "tiny-refuser-early"])
def test_the_classifier_and_multi_token_kl_as_objectives_reach_the_same_bar(
    tmp_path: Path, fixture: str
) -> None:
    """The search judged by a refusal classifier (the committed tiny one) and by KL along the
    original's own 16-token replies finds a trial the classifier says refuses <= 10 % of the
    held-out harmful prompts at multi-token KL <= 0.05, within 40 trials."""
    scorers = [
        {"name": "RefusalClassifier", "optimization": "minimize"},
        {"name": "MultiTokenKL", "optimization": "minimize"},
        {"name": "KeywordRate", "optimization": "report"},
        {"name": "KLDivergence", "optimization": "report"},
        {"name": "HarmlessRefusals", "optimization": "report"},
    ]
    config = write_fixture_config(
        tmp_path / "config.toml",
        fixture,
        scorers=scorers,
        refusal_classifier={"model": str(CLASSIFIER)},
        kl_tokens=16,
    )
    job_dir = tmp_path / "job"
    events = run_events("--config", str(config), "--job-dir", str(job_dir))

    baseline = next(event for event in events if event["type"] == "baseline")
    assert baseline["scores"]["RefusalClassifier"]["value"] >= 0.9 * baseline["total_bad"]
    assert baseline["scores"]["MultiTokenKL"]["value"] == 0.0
    trials = [event for event in events if event["type"] == "trial"]
    assert len(trials) == 40
    assert list(trials[0]["scores"]) == [scorer["name"] for scorer in scorers]
    front = json.loads((job_dir / "results" / "pareto.json").read_text())
    good = [
        trial
        for trial in front
        if trial["scores"]["RefusalClassifier"]["value"] <= 0.1 * trial["total_bad"]
        and trial["scores"]["MultiTokenKL"]["value"] <= 0.05
    ]
    assert good, f"front: {[(t['refusals'], round(t['kl'], 4)) for t in front[:4]]}"
    assert all(trial["acceptable"] for trial in front)
    chosen = good[-1]
    assert chosen["refusals"] == chosen["scores"]["RefusalClassifier"]["value"]  # the headline
    assert chosen["kl"] == chosen["scores"]["MultiTokenKL"]["value"]
    harmless = chosen["scores"]["HarmlessRefusals"]  # judged by the classifier, like refusals
    assert harmless["value"] <= 0.05 * harmless["of"]


def _warnings(events: list[dict]) -> list[str]:
    return [event["message"] for event in events
            if event["type"] == "log" and event["level"] == "warning"]  # fmt: skip


def test_refusals_the_markers_miss_are_named_and_given_back_they_count(tmp_path: Path) -> None:
    """Markers that match none of the tiny refuser's refusals, learning off: the baseline warns,
    shows what it let through and names openings; given as `extra_refusal_markers`, they count
    the refusals."""
    import ast
    import re

    blind = write_fixture_config(tmp_path / "blind.toml", n_trials=1, learn_refusal_markers=False,
                                 refusal_markers=["no model says this"])  # fmt: skip
    events = run_events("--config", str(blind), "--job-dir", str(tmp_path / "blind"))
    baseline = next(event for event in events if event["type"] == "baseline")
    assert baseline["refusals"] == 0
    (warning,) = _warnings(events)
    assert f"refuses 0 of {baseline['total_bad']} harmful prompts" in warning
    assert "replies it did not count as refusals" in warning
    found = re.findall(r"(\"[^\"]+\"|'[^']+') \((\d+)/\d+\)", warning)
    openings = [ast.literal_eval(text) for text, _ in found]
    assert openings, warning
    named = write_fixture_config(tmp_path / "named.toml", n_trials=1, learn_refusal_markers=False,
                                 refusal_markers=["no model says this"],
                                 extra_refusal_markers=openings)  # fmt: skip
    events = run_events("--config", str(named), "--job-dir", str(tmp_path / "named"))
    baseline = next(event for event in events if event["type"] == "baseline")
    assert baseline["refusals"] >= 0.9 * baseline["total_bad"], openings
    assert not _warnings(events)


def test_learned_markers_are_kept_with_the_job_and_named_in_the_model_card(tmp_path: Path) -> None:
    """What the exported card says the scores counted: the evaluation prompts' sources (a local
    file by its name, not its path) and the markers, with those learned from the model's own
    refusals, which the job directory keeps for a later `hctl-worker export`."""
    config = write_fixture_config(tmp_path / "config.toml", n_trials=1,
                                  refusal_markers=["no model says this"],
                                  save_directory=str(tmp_path / "model"))  # fmt: skip
    job_dir = tmp_path / "job"
    run_events("--config", str(config), "--job-dir", str(job_dir))
    learned = json.loads((job_dir / "learned_markers.json").read_text())
    assert learned and all(isinstance(marker, str) for marker in learned)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "- Harmful prompts (refusals): a file of the user's, `harmful_test.txt`" in card
    assert str(FIXTURES) not in card
    (line,) = [line for line in card.splitlines() if line.startswith("- Refusals: ")]
    assert (
        "containing the job's marker" in line and "learned from this model's own refusals" in line
    )
    assert all(f"`{marker}`" in line for marker in learned)


@pytest.mark.slow
def test_a_refusal_the_markers_do_not_know_is_learned_and_removed(tmp_path: Path) -> None:
    """The tiny refuser judged by markers that match none of its refusals: the worker learns its
    refusal openings from the baseline (and says so), and the search removes its refusals, as
    heretic's own markers (which do know them) count them afterwards, at KL <= 0.05."""
    config = write_fixture_config(tmp_path / "config.toml",
                                  refusal_markers=["no model says this"])  # fmt: skip
    job_dir = tmp_path / "job"
    events = run_events("--config", str(config), "--job-dir", str(job_dir))
    (learned,) = _warnings(events)
    assert "the job's refusal markers count 0 of" in learned
    assert "the job counts those as refusals too" in learned
    check_search_shape(events, 40)  # a refusing baseline: the learned openings count them
    front = json.loads((job_dir / "results" / "pareto.json").read_text())
    good = [t for t in front if t["refusals"] <= 0.1 * t["total_bad"] and t["kl"] <= 0.05]
    assert good, f"best on the front: {[(t['refusals'], round(t['kl'], 4)) for t in front[:3]]}"
    chosen = good[-1]
    assert harmless_refusals(job_dir, chosen, harmful=True) <= 0.1 * chosen["total_bad"]
