"""Export: the model card, the hub upload's error handling (offline), and the saved model's
behaviour against the trial's (on the tiny refuser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hctl_worker.errors import ExportError
from hctl_worker.export import export_trial, model_card, upload_folder
from hctl_worker.search import TrialResult
from hctl_worker.settings import WorkerSettings

SECRET = "hf_secretTOKEN1234567890"

TRIAL = TrialResult(
    number=7,
    params={"direction_scope": "global", "direction_index": 2.25, "attention.max_weight": 1.2},
    kl=0.0123,
    refusals=3,
    total_bad=86,
    seconds=1.0,
)


def test_model_card_has_the_scores_and_parameters() -> None:
    card = model_card("Qwen/Qwen3-0.6B", TRIAL, baseline_refusals=(85, 86))
    assert card.startswith("---\nbase_model: Qwen/Qwen3-0.6B\n")
    assert "abliterated" in card
    assert "| Refusals of this model | 3/86 |" in card
    assert "| Refusals of the original model | 85/86 |" in card
    assert "0.0123" in card
    assert "| `direction_index` | 2.2500 |" in card
    assert "| `direction_scope` | global |" in card
    assert "trial 7" in card


class FailingHub:
    """A hub client that fails the way huggingface_hub does, echoing the request's token."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def create_repo(self, repo_id: str, *, private: bool, exist_ok: bool) -> None:
        self.calls.append(f"create {repo_id} private={private}")

    def upload_folder(self, *, folder_path: str, repo_id: str, commit_message: str) -> None:
        raise RuntimeError(f"401 Unauthorized: invalid token {SECRET} for {repo_id}")


def test_upload_error_is_translated_and_never_shows_the_token(tmp_path: Path) -> None:
    hub = FailingHub()
    with pytest.raises(ExportError) as raised:
        upload_folder(tmp_path, "me/model", token=SECRET, private=True, api=hub)
    assert hub.calls == ["create me/model private=True"]
    shown = raised.value.message + raised.value.hint
    assert "401 Unauthorized" in shown and "me/model" in shown
    assert SECRET not in shown


def test_upload_without_a_token_is_refused_before_anything_is_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    settings = WorkerSettings(model="m", upload_repo="me/model")
    with pytest.raises(ExportError) as raised:
        export_trial(None, None, TRIAL, settings)  # type: ignore[arg-type]
    assert "HF_TOKEN" in raised.value.message + raised.value.hint
