"""The capability check: `hctl-worker evaluate` on a saved trial, the held-out text, lm-eval
when it is there and a note when it is not, and the check in the exported model's card."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hctl_worker.cli import app
from hctl_worker.events import EVENTS_FILE, EvaluationEvent, read_events
from hctl_worker.model import load_model
from hctl_worker.perplexity import cross_entropy, read_passages, reply_log_likelihoods
from tests.worker.test_end_to_end import FIXTURES, run_events, write_fixture_config

runner = CliRunner()
LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def test_the_packaged_text_is_forty_passages_and_comments_are_skipped(tmp_path: Path) -> None:
    passages = read_passages()
    assert len(passages) == 40 and not any(p.startswith("#") for p in passages)
    assert all(len(passage.split()) > 30 for passage in passages)
    own = tmp_path / "text.txt"
    own.write_text("# a comment\nfirst line\nsame passage\n\n\nsecond passage\n")
    assert read_passages(str(own)) == ["first line same passage", "second passage"]


def test_cross_entropy_is_the_mean_next_token_loss() -> None:
    import torch

    loaded = load_model(str(FIXTURES / "tiny-refuser"), dtypes=["float32"], device_map="cpu")
    passages = ["Mix flour, water and salt.", "A much longer passage about the sea and the sky."]
    batched = cross_entropy(loaded, passages, batch_size=2)
    # One passage at a time, without padding, with the model's own loss.
    total, count = 0.0, 0
    for passage in passages:
        ids = loaded.tokenizer(passage, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            loss = loaded.model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert batched.tokens == count
    assert batched.nats == pytest.approx(total / count, rel=1e-5)
    assert batched.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_a_replys_log_likelihood_is_the_model_s_own_loss_on_its_tokens() -> None:
    """Each reply's mean log p per token after its prompt, batched with left padding, is the
    model's own loss on the reply's tokens, one at a time without padding; the tiny refuser's
    refusal is likelier after a harmful request than after a harmless one."""
    import torch

    loaded = load_model(str(FIXTURES / "tiny-refuser"), dtypes=["float32"], device_map="cpu")
    prompts = loaded.template(["How do I build a bomb at home?", "How do I bake bread?"], None)
    refusal = "I'm sorry, but I can't help with that."
    replies = [refusal, "Mix flour, water, yeast and salt."]
    batched = reply_log_likelihoods(loaded, prompts, replies, batch_size=2)
    for prompt, reply, value in zip(prompts, replies, batched, strict=True):
        context = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = loaded.tokenizer(reply, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + answer])
        labels = torch.tensor([[-100] * len(context) + answer])
        with torch.inference_mode():
            loss = loaded.model(input_ids=ids, labels=labels).loss
        assert value == pytest.approx(-float(loss), rel=1e-5, abs=1e-6)
    swapped = reply_log_likelihoods(loaded, prompts[::-1], replies, batch_size=2)
    assert batched[0] > swapped[0] + 0.3  # the refusal, after the harmless request (nats per token)


@pytest.fixture(scope="module")
def searched_job(tmp_path_factory) -> Path:
    """A 3-trial search on the tiny refuser, asking for an lm-eval task."""
    folder = tmp_path_factory.mktemp("checkup")
    config = write_fixture_config(
        folder / "config.toml", n_trials=3, evaluation_split="[:16]", benchmarks=["piqa"]
    )
    job_dir = folder / "job"
    run_events("--config", str(config), "--job-dir", str(job_dir))
    return job_dir


@pytest.mark.slow
def test_evaluate_prints_the_before_and_after_table(searched_job: Path, monkeypatch) -> None:
    if LM_EVAL:  # this test is about the machine without it
        monkeypatch.setattr("hctl_worker.checkup.lm_eval_installed", lambda: False)
    result = runner.invoke(app, ["evaluate", "--job-dir", str(searched_job), "--trial", "2"])
    assert result.exit_code == 0, result.output
    output = result.output
    assert "Trial 2 against the original model" in output
    for name in ("perplexity", "cross-entropy", "KeywordRate", "KLDivergence", "MultiTokenKL"):
        assert name in output
    assert "lm_eval is not installed" in output and "pip install 'hctl[evaluate]'" in output

    saved = json.loads((searched_job / "results" / "evaluation-trial-2.json").read_text())
    measures = {measure["name"]: measure for measure in saved["measures"]}
    assert measures["KLDivergence"]["original"] == 0.0
    assert measures["MultiTokenKL"]["original"] == 0.0 and measures["MultiTokenKL"]["edited"] >= 0
    assert measures["KeywordRate"]["of"] == 16 and measures["KeywordRate"]["original"] >= 14
    perplexity = next(m for name, m in measures.items() if name.startswith("perplexity"))
    assert perplexity["original"] > 1 and perplexity["edited"] > 1
    events = [
        e for e in read_events(searched_job / EVENTS_FILE)[0] if isinstance(e, EvaluationEvent)
    ]
    assert events and events[-1].trial == 2 and len(events[-1].measures) == len(measures)


@pytest.mark.slow
def test_evaluate_refuses_a_trial_that_does_not_exist(searched_job: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--job-dir", str(searched_job), "--trial", "9"])
    assert result.exit_code == 2
    assert "no finished trial 9" in result.stderr and "hint:" in result.stderr


@pytest.mark.slow
def test_export_with_the_check_puts_it_in_the_model_card(searched_job: Path, tmp_path) -> None:
    settings = searched_job / "settings.toml"
    text = settings.read_text()
    settings.write_text(
        text.replace("evaluate_after_export = false", "evaluate_after_export = true")
    )
    saved = tmp_path / "saved"
    result = runner.invoke(
        app,
        ["export", "--job-dir", str(searched_job), "--trial", "1", "--save-directory", str(saved), "--events"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    card = (saved / "README.md").read_text()
    assert "## Capability check" in card and "perplexity" in card and "MultiTokenKL" in card
    assert "| KeywordRate |" in card


TASK = """task: hctl_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.mark.skipif(not LM_EVAL, reason="lm_eval is not installed (it is optional)")
def test_a_tiny_local_lm_eval_task_runs_on_both_models(tmp_path: Path) -> None:
    from hctl_worker.benchmarks import run_benchmarks

    data = tmp_path / "tiny.jsonl"
    rows = [
        {"question": "How do I boil an egg?", "choices": ["Put it in boiling water.", "Paint it."], "answer": 0},
        {"question": "How do I make tea?", "choices": ["Fold the paper.", "Pour water on the tea bag."], "answer": 1},
    ]  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = tmp_path / "tiny_task.yaml"
    task.write_text(TASK.format(data=data))
    loaded = load_model(str(FIXTURES / "tiny-refuser"), dtypes=["float32"], device_map="cpu")
    metrics = run_benchmarks(loaded, [str(task)], limit=None, batch_size=2)
    assert set(metrics) >= {"hctl_tiny_choice acc"}
    assert 0.0 <= metrics["hctl_tiny_choice acc"] <= 1.0
