"""What a model card says the scores counted: prompt sources (hub, a user's file by its name,
or the bundle when the hub was away) and the refusal detector (markers, learned ones, or a
classifier, a local one by its folder's name)."""

from __future__ import annotations

import json
from pathlib import Path

from hctl_worker.job_prompts import RECORD_FILE
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS
from hctl_worker.prompt_source import PROMPT_TABLES
from hctl_worker.provenance import learned_markers, measurement_notes, record_learned_markers
from hctl_worker.settings import WorkerSettings


def test_hub_sets_and_heretics_markers() -> None:
    harmful, harmless, refusals = measurement_notes(WorkerSettings(model="m"), None)
    assert harmful == (
        "Harmful prompts (refusals): [mlabonne/harmful_behaviors]"
        "(https://huggingface.co/datasets/mlabonne/harmful_behaviors), test[:100]"
    )
    assert harmless.startswith("Harmless prompts (divergence from the original): [mlabonne/")
    assert (
        refusals
        == f"Refusals: replies containing one of heretic's {len(DEFAULT_REFUSAL_MARKERS)} markers"
    )


def test_bundled_sets_learned_markers_and_the_users_own(tmp_path: Path) -> None:
    (tmp_path / RECORD_FILE).write_text(json.dumps(dict.fromkeys(PROMPT_TABLES, "bundled")))
    record_learned_markers(tmp_path, ["i must decline"])
    assert learned_markers(tmp_path) == ["i must decline"]
    settings = WorkerSettings(model="m", extra_refusal_markers=["nope"])
    harmful, _, refusals = measurement_notes(settings, tmp_path)
    assert "the prompts bundled with hctl-worker (the hub was out of reach)" in harmful
    assert refusals.endswith(
        ", or one of the job's own: `nope`, or one learned from this model's own refusals: "
        "`i must decline`"
    )


def test_a_classifier_in_a_local_folder_is_named_by_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "private" / "judge"
    folder.mkdir(parents=True)
    settings = WorkerSettings.model_validate({
        "model": "m",
        "scorers": [{"name": "RefusalClassifier", "optimization": "minimize"},
                    {"name": "KLDivergence", "optimization": "minimize"}],
        "refusal_classifier": {"model": str(folder)},
    })  # fmt: skip
    *_, refusals = measurement_notes(settings, tmp_path)
    assert refusals == "Refusals: judged by the classifier `judge`"
