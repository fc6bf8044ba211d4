"""Export: the model card, the hub upload's error handling (offline), and the saved model's
behaviour against the trial's (on the tiny refuser)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hctl_worker.errors import ExportError
from hctl_worker.events import EvaluationEvent, Measure
from hctl_worker.export import check_save_directory, export_trial, model_card, upload_folder
from hctl_worker.settings import WorkerSettings
from hctl_worker.trials import Trial, legacy_scores

SECRET = "hf_secretTOKEN1234567890"

TRIAL = Trial(
    number=7,
    params={"direction_scope": "global", "direction_index": 2.25, "attention.max_weight": 1.2},
    kl=0.0123,
    refusals=3,
    total_bad=86,
    seconds=1.0,
)


def test_model_card_has_the_scores_and_parameters() -> None:
    baseline = legacy_scores(85, 86, 0.0)
    card = model_card("Qwen/Qwen3-0.6B", TRIAL, baseline)
    assert card.startswith("---\nbase_model: Qwen/Qwen3-0.6B\n")
    assert "abliterated" in card
    assert re.search(r"^\| KeywordRate \| [^|]+ \| 85/86 \| 3/86 \|$", card, re.MULTILINE)
    assert re.search(r"^\| KLDivergence \| [^|]+ \| 0\.0000 \| 0\.0123 \|$", card, re.MULTILINE)
    assert "| `direction_index` | 2.2500 |" in card
    assert "| `direction_scope` | global |" in card
    assert "trial 7" in card
    assert "Capability check" not in card


def test_model_card_carries_the_capability_check() -> None:
    check = EvaluationEvent(
        trial=7,
        measures=[
            Measure(name="perplexity, held-out text", original=12.5, edited=12.75, better="lower"),
            Measure(name="HarmlessRefusals", original=1, edited=2, of=63, better="lower"),
        ],
        notes=["lm-eval tasks not run (piqa): lm_eval is not installed (pip install lm_eval)"],
    )
    card = model_card("Qwen/Qwen3-0.6B", TRIAL, None, check)
    assert "## Capability check" in card
    assert "| perplexity, held-out text | 12.5000 | 12.7500 |" in card
    assert "| HarmlessRefusals | 1/63 | 2/63 |" in card
    assert "- lm-eval tasks not run (piqa)" in card


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


@pytest.mark.slow
def test_exported_model_computes_what_the_trial_computed(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from hctl_worker.ablation import AblationParams, Ablator
    from hctl_worker.cli import app
    from hctl_worker.direction_cache import load_cached_directions
    from hctl_worker.events import EVENTS_FILE, DoneEvent, StageEvent, read_events
    from hctl_worker.job_directory import JobPaths
    from hctl_worker.model import load_model
    from tests.worker.test_end_to_end import FIXTURES, run_events, write_fixture_config

    config = write_fixture_config(tmp_path / "config.toml", n_trials=3, evaluation_split="[:16]")
    job_dir = tmp_path / "job"
    run_events("--config", str(config), "--job-dir", str(job_dir))
    front = json.loads((job_dir / "results" / "pareto.json").read_text())
    trial = front[0]  # the fewest refusals: the strongest edit

    runner = CliRunner()
    saved = tmp_path / "saved"
    result = runner.invoke(
        app,
        [
            "export",
            "--job-dir",
            str(job_dir),
            "--trial",
            str(trial["number"]),
            "--save-directory",
            str(saved),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {
        path.name for path in saved.iterdir()
    }
    events, _ = read_events(job_dir / EVENTS_FILE)
    assert isinstance(events[-1], DoneEvent) and events[-1].model_dir == str(saved)
    assert events[-1].chosen_trial == trial["number"]
    assert any(
        isinstance(e, StageEvent) and e.stage == "export" and e.state == "end" for e in events
    )

    # The trial, as the search evaluated it: hooks on the original model.
    original = load_model(str(FIXTURES / "tiny-refuser"), dtypes=["float32"], device_map="cpu")
    prompts = (
        (FIXTURES / "tiny-refuser" / "prompts" / "harmful_test.txt").read_text().splitlines()[:8]
    )
    texts = original.template(prompts, None)
    ablator = Ablator(original, load_cached_directions(JobPaths(job_dir)))
    inputs = original.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode(), ablator.applied(AblationParams.from_dict(trial["ablation"])):
        during_trial = original.model(**inputs).logits
    with torch.inference_mode():
        unedited = original.model(**inputs).logits

    exported = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    assert (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=False
        )
        == texts[0]
    )
    with torch.inference_mode():
        after_export = exported(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert torch.allclose(after_export[mask], during_trial[mask], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(unedited[mask], during_trial[mask], atol=1e-3)

    # And one can talk to it, headless.
    chat = runner.invoke(
        app, ["chat", str(saved), "--max-new-tokens", "8"], input=prompts[0] + "\n"
    )
    assert chat.exit_code == 0, chat.stderr
    assert chat.stdout.strip()


def test_the_real_hub_client_offline_fails_cleanly(tmp_path: Path) -> None:
    # The tests run with HF_HUB_OFFLINE=1: the real client refuses, and that becomes an ExportError.
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExportError) as raised:
        upload_folder(tmp_path, "me/model", token=SECRET, private=True)
    assert "me/model" in raised.value.message
    assert SECRET not in raised.value.message + raised.value.hint


def test_model_card_says_what_the_scores_counted_and_names_no_local_path(tmp_path) -> None:
    folder = tmp_path / "home" / "someone" / "my-model"
    folder.mkdir(parents=True)
    card = model_card(str(folder), TRIAL, None, None, ["Refusals: replies containing `x`"])
    assert "What the scores counted:\n\n- Refusals: replies containing `x`\n" in card
    assert "# my-model (abliterated)" in card and "This is `my-model` with" in card
    assert "someone" not in card and "base_model" not in card


def test_a_save_directory_holding_what_an_export_did_not_write_is_refused(tmp_path: Path) -> None:
    """Saving would overwrite the original model, the job's files or someone's notes: refused;
    a new or empty folder, or an earlier export (its model card has the hctl tag), is fine."""
    model, job = tmp_path / "model", tmp_path / "job"
    for folder in (model, job):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    refused = {
        str(model): "is the model's own folder",
        str(job): "is the job directory itself",
        str(model / "config.json"): "is a file",
    }
    for directory, said in refused.items():
        with pytest.raises(ExportError, match=said):
            check_save_directory(directory, str(model), job)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"already holds files an export did not write \(todo"):
        check_save_directory(str(notes), str(model), job)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "README.md").write_text(model_card("m", Trial(number=1, scores={})))
    for fine in (earlier, tmp_path / "new", tmp_path / "notes" / "inside"):
        check_save_directory(str(fine), str(model), job)
