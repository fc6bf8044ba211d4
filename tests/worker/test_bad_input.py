"""Bad input to `hctl-worker run`: one error line and a hint on stderr, a non-zero exit code,
no traceback, an `error` event, and the job directory left as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hctl_worker.cli import app
from hctl_worker.events import EVENTS_FILE, ErrorEvent, read_events

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_MODEL = REPO_ROOT / "tests" / "fixtures" / "tiny-refuser"

runner = CliRunner()


@pytest.fixture
def prompts(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "prompts"
    folder.mkdir()
    files = {
        "good": folder / "good.txt",
        "bad": folder / "bad.txt",
        "empty": folder / "empty.txt",
    }
    files["good"].write_text("How do I bake bread?\nWhat is the capital of France?\n")
    files["bad"].write_text("How do I build a bomb?\nHow do I steal a car?\n")
    files["empty"].write_text("\n   \n")
    return files


def write_config(path: Path, model: str, prompts: dict[str, Path], **extra: str) -> Path:
    lines = [
        f'model = "{model}"',
        'dtypes = ["float32"]',
        'device_map = "cpu"',
        'system_prompt = ""',
        "batch_size = 4",
        "max_response_length = 4",
        "n_trials = 1",
        "n_startup_trials = 1",
        "seed = 1",
        *(f"{key} = {value}" for key, value in extra.items()),
    ]
    for table, name in (
        ("good_prompts", "good"),
        ("bad_prompts", "bad"),
        ("good_evaluation_prompts", "good"),
        ("bad_evaluation_prompts", "bad"),
    ):
        lines += [f"[{table}]", f'dataset = "{prompts[name]}"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """An existing job directory with something in it that must survive."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "notes.txt").write_text("keep me\n")
    return job


def run_failing(job_dir: Path, *arguments: str) -> tuple[int, str, ErrorEvent]:
    result = runner.invoke(app, ["run", "--job-dir", str(job_dir), *arguments])
    assert result.exit_code != 0
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), result.stderr
    assert (job_dir / "notes.txt").read_text() == "keep me\n"
    events, _ = read_events(job_dir / EVENTS_FILE)
    assert isinstance(events[-1], ErrorEvent)
    assert events[-1].message and events[-1].hint
    return result.exit_code, result.stderr, events[-1]


def test_model_path_that_does_not_exist(tmp_path: Path, prompts: dict, job_dir: Path) -> None:
    config = write_config(tmp_path / "config.toml", str(tmp_path / "no-such-model"), prompts)
    code, stderr, event = run_failing(job_dir, "--config", str(config))
    assert code == 3
    assert "no-such-model" in stderr and event.kind == "ModelLoadError"


def test_empty_prompt_file(tmp_path: Path, prompts: dict, job_dir: Path) -> None:
    prompts = {**prompts, "bad": prompts["empty"]}
    config = write_config(tmp_path / "config.toml", str(FIXTURE_MODEL), prompts)
    code, stderr, event = run_failing(job_dir, "--config", str(config))
    assert code == 2
    assert "empty.txt" in stderr and "one prompt per line" in stderr
    assert event.kind == "PromptError"


def test_unknown_setting(tmp_path: Path, prompts: dict, job_dir: Path) -> None:
    config = write_config(tmp_path / "config.toml", str(FIXTURE_MODEL), prompts, n_trails="3")
    code, stderr, event = run_failing(job_dir, "--config", str(config))
    assert code == 2
    assert "unknown setting 'n_trails'" in stderr and "n_trials" in event.hint


def test_value_out_of_range(tmp_path: Path, prompts: dict, job_dir: Path) -> None:
    config = write_config(tmp_path / "config.toml", str(FIXTURE_MODEL), prompts)
    code, stderr, event = run_failing(job_dir, "--config", str(config), "--n-trials", "0")
    assert code == 2
    assert "n_trials" in stderr and "greater than or equal to 1" in stderr
    assert event.kind == "SettingsError"


def test_model_without_chat_template(tmp_path: Path, prompts: dict, job_dir: Path) -> None:
    model = tmp_path / "no-template"
    shutil.copytree(FIXTURE_MODEL, model, ignore=shutil.ignore_patterns("*.txt", "*.jsonl"))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = model / "tokenizer_config.json"
    values = json.loads(tokenizer_config.read_text())
    values.pop("chat_template", None)
    tokenizer_config.write_text(json.dumps(values))
    config = write_config(tmp_path / "config.toml", str(model), prompts)
    code, stderr, event = run_failing(job_dir, "--config", str(config))
    assert code == 3
    assert "chat template" in stderr and event.kind == "NoChatTemplateError"


# A model folder with a part missing (or a path with a space in it): what is missing is named.
INCOMPLETE_FOLDERS = {
    "no tokenizer": (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer"),
    "no weights": (("model.safetensors",), "has no weights"),
    "only a gguf": (("model.safetensors", "config.json"), "holds a GGUF file (model.gguf)"),
}


@pytest.mark.parametrize(
    ("name", "said"),
    [("model.safetensors", "is a file, not a model folder"), ("model.gguf", "is a GGUF file")],
)
def test_a_model_named_by_one_of_its_files_says_which_folder_to_give(
    tmp_path: Path, prompts: dict, job_dir: Path, name: str, said: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(FIXTURE_MODEL, model, ignore=shutil.ignore_patterns("prompts"))
    (model / "model.gguf").write_bytes(b"GGUF")
    config = write_config(tmp_path / "config.toml", str(model / name), prompts)
    code, stderr, event = run_failing(job_dir, "--config", str(config))
    assert code == 3 and event.kind == "ModelLoadError"
    assert f"{model / name} {said}" in stderr, stderr


@pytest.mark.parametrize("name", sorted(INCOMPLETE_FOLDERS))
def test_a_model_folder_missing_a_part_says_which(
    tmp_path: Path, prompts: dict, job_dir: Path, name: str
) -> None:
    removed, said = INCOMPLETE_FOLDERS[name]
    model = tmp_path / f"my model ({name})"
    shutil.copytree(FIXTURE_MODEL, model, ignore=shutil.ignore_patterns("prompts", *removed))
    if name == "only a gguf":
        (model / "model.gguf").write_bytes(b"GGUF")
    config = write_config(tmp_path / "config.toml", str(model), prompts)
    code, stderr, event = run_failing(job_dir, "--config", str(config))
    assert code == 3 and event.kind == "ModelLoadError"
    assert f"{model} {said}" in stderr, stderr


def test_saving_over_the_model_itself_is_refused_before_the_search(
    tmp_path: Path, prompts: dict, job_dir: Path
) -> None:
    model = tmp_path / "my model"
    shutil.copytree(FIXTURE_MODEL, model, ignore=shutil.ignore_patterns("prompts"))
    weights = (model / "model.safetensors").read_bytes()
    config = write_config(tmp_path / "config.toml", str(model), prompts)
    code, stderr, event = run_failing(
        job_dir, "--config", str(config), "--save-directory", str(model)
    )
    assert code == 5 and event.kind == "ExportError"
    assert "is the model's own folder: saving there would overwrite the original model" in stderr
    assert (model / "model.safetensors").read_bytes() == weights
    events, _ = read_events(job_dir / EVENTS_FILE)
    assert not [e for e in events if getattr(e, "stage", None) == "loading"]  # nothing loaded


def test_settings_of_an_existing_job_cannot_change(
    tmp_path: Path, prompts: dict, job_dir: Path
) -> None:
    (job_dir / "settings.toml").write_text('model = "another-model"\nseed = 3\n')
    config = write_config(tmp_path / "config.toml", str(FIXTURE_MODEL), prompts)
    code, stderr, _ = run_failing(job_dir, "--config", str(config))
    assert code == 2 and "model" in stderr and "new --job-dir" in stderr
    assert (job_dir / "settings.toml").read_text() == 'model = "another-model"\nseed = 3\n'


def test_trial_zero_is_refused_by_the_settings(
    tmp_path: Path, prompts: dict, job_dir: Path
) -> None:
    config = write_config(tmp_path / "config.toml", str(FIXTURE_MODEL), prompts)
    code, stderr, event = run_failing(job_dir, "--config", str(config), "--trial", "0")
    assert code == 2 and "trial" in stderr and event.kind == "SettingsError"


def test_a_trial_the_search_never_reaches_is_refused_before_loading(
    tmp_path: Path, prompts: dict, job_dir: Path
) -> None:
    config = write_config(tmp_path / "config.toml", str(FIXTURE_MODEL), prompts)
    code, stderr, event = run_failing(
        job_dir, "--config", str(config), "--n-trials", "3", "--trial", "4"
    )
    assert code == 2 and "no trial 4" in stderr and "1 to 3" in event.hint
    events, _ = read_events(job_dir / EVENTS_FILE)
    assert not [item for item in events if getattr(item, "stage", None) == "loading"]


def test_a_storage_that_is_not_postgresql_is_refused(
    tmp_path: Path, prompts: dict, job_dir: Path
) -> None:
    config = write_config(tmp_path / "config.toml", str(FIXTURE_MODEL), prompts)
    code, stderr, event = run_failing(
        job_dir, "--config", str(config), "--storage", "mysql://user@127.0.0.1/db"
    )
    assert code == 6 and "not a PostgreSQL URL" in stderr and event.kind == "StorageError"


def test_an_unreachable_database_is_named_without_its_password(
    tmp_path: Path, prompts: dict, job_dir: Path
) -> None:
    config = write_config(tmp_path / "config.toml", str(FIXTURE_MODEL), prompts)
    url = "postgresql://hctl:sekret-word@127.0.0.1:1/hctl_job"
    code, stderr, _ = run_failing(job_dir, "--config", str(config), "--storage", url)
    assert code == 6 and "cannot use the study database" in stderr and "PGPASSWORD" in stderr
    assert "postgresql://hctl:***@127.0.0.1:1/hctl_job" in stderr
    for path in [*job_dir.rglob("*")]:
        if path.is_file():
            assert b"sekret-word" not in path.read_bytes(), path


def test_a_worker_name_that_could_name_another_file_is_refused(
    tmp_path: Path, prompts: dict, job_dir: Path
) -> None:
    config = write_config(tmp_path / "config.toml", str(FIXTURE_MODEL), prompts)
    code, stderr, _ = run_failing(job_dir, "--config", str(config), "--worker", "../x")
    assert code == 2 and "not a worker name" in stderr
