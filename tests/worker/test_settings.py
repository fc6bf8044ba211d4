"""Worker settings: precedence, heretic compatibility, clear errors, the documented defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from hctl_worker.errors import SettingsError
from hctl_worker.settings import (
    DEFAULT_CONFIG_PATH,
    WorkerSettings,
    load_settings,
    parse_assignment,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_command_line_beats_environment_beats_file_beats_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "config.toml",
        'model = "from-file"\nn_trials = 11\nn_startup_trials = 3\nseed = 5\n',
    )
    monkeypatch.setenv("HERETIC_N_TRIALS", "22")
    monkeypatch.setenv("HERETIC_SEED", "6")
    monkeypatch.setenv("HERETIC_GOOD_PROMPTS__SPLIT", "train[:8]")
    settings = load_settings(config, {"seed": 7, "model": None})
    assert settings.good_prompts.split == "train[:8]"  # one key of a table from the environment
    assert settings.good_prompts.dataset == "mlabonne/harmless_alpaca"
    assert settings.model == "from-file"  # file (the None override is "not given")
    assert settings.n_startup_trials == 3  # file
    assert settings.n_trials == 22  # environment over file
    assert settings.seed == 7  # command line over environment
    assert settings.max_response_length == 100  # default


def test_config_toml_in_the_working_directory_is_read_without_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "config.toml", 'model = "here"\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings().model == "here"


def test_a_heretic_config_carries_over(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.toml",
        """
model = "m"
trial_index = 2
upload_repo_id = "me/m-heretic"
upload_repo_private = false
quantization = "none"
print_residual_geometry = true
winsorization_quantile = 1.0
checkpoint_action = "restart"
kl_divergence_scale = 1.0
multidirectional_som = false
som_k = 4
refusal_markers = ["sorry", "i cannot"]

[good_prompts]
dataset = "mlabonne/harmless_alpaca"
split = "train[:40]"
column = "text"
residual_plot_label = "harmless"

[scorer.KeywordRate]
keyword_markers = ["sorry", "cannot"]

[scorer.KeywordRate.prompts]
dataset = "bad.txt"
split = "[:10]"

[scorer.KLDivergence.prompts]
dataset = "good.txt"
""",
    )
    settings = load_settings(config)
    # heretic's trial_index counts places on its front; `trial` here is a trial number.
    assert settings.trial is None
    assert settings.upload_repo == "me/m-heretic" and settings.upload_private is False
    assert settings.refusal_markers == ["sorry", "cannot"]
    assert settings.good_prompts.split == "train[:40]"
    assert settings.bad_evaluation_prompts.dataset == "bad.txt"
    assert settings.good_evaluation_prompts.dataset == "good.txt"
    warned = " ".join(settings.warnings)
    for key in (
        "print_residual_geometry",
        "winsorization_quantile",
        "checkpoint_action",
        "kl_divergence_scale",
        "som_k",
        "trial_index",
    ):
        assert key in warned
    assert "residual_plot_label" in warned


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", 'model = "m"\nn_trails = 5\n')
    with pytest.raises(SettingsError) as raised:
        load_settings(config)
    assert "n_trails" in raised.value.message
    assert "n_trials" in raised.value.hint


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("n_trials = 0", "n_trials"),
        ("kl_skip_threshold = -1.0", "kl_skip_threshold"),
        ('kl_skip_threshold = "off"', "kl_skip_threshold"),
        ('row_normalization = "sideways"', "row_normalization"),
        ('dtypes = ["float8"]', "dtypes"),
        ('[good_prompts]\ndataset = "x.txt"\nsplit = "train[:abc]"', "good_prompts.split"),
        ('[good_prompts]\ndataset = "x.txt"\ncolour = "red"', "good_prompts.colour"),
        ("refusal_markers = []", "an empty list would count no reply a refusal"),
        ('extra_refusal_markers = ["i must decline", " "]', "a blank marker"),
        ('device_map = "gpu"', "'gpu' is not a device map"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, text: str, named: str) -> None:
    config = write(tmp_path / "config.toml", text + "\n")
    with pytest.raises(SettingsError) as raised:
        load_settings(config)
    assert named in raised.value.message
    assert raised.value.hint


def test_device_maps_accelerate_takes_are_accepted(tmp_path: Path) -> None:
    for value in ('"auto"', '"cpu"', '"cuda:1"', '"balanced_low_0"', '"mps"', '{ "" = 0 }'):
        config = write(tmp_path / "config.toml", f"device_map = {value}\n")
        assert load_settings(config).device_map


def test_unsupported_quantization_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path / "config.toml", 'quantization = "bnb_4bit"\n')
    with pytest.raises(SettingsError, match="quantization"):
        load_settings(config)


def test_missing_or_malformed_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path / "bad.toml", "model = \n"))


def test_relative_prompt_files_are_found_next_to_the_config(tmp_path: Path) -> None:
    folder = tmp_path / "fixture"
    folder.mkdir()
    write(folder / "good.txt", "hello\n")
    config = write(folder / "config.toml", '[good_prompts]\ndataset = "good.txt"\n')
    settings = load_settings(config)
    assert Path(settings.good_prompts.dataset) == (folder / "good.txt").resolve()


def test_set_assignments_read_toml_values() -> None:
    assert parse_assignment("n_trials=5") == ("n_trials", 5)
    assert parse_assignment("orthogonalize-direction=false") == ("orthogonalize_direction", False)
    assert parse_assignment('dtypes=["float32"]') == ("dtypes", ["float32"])
    assert parse_assignment("model=Qwen/Qwen3-0.6B") == ("model", "Qwen/Qwen3-0.6B")
    with pytest.raises(SettingsError):
        parse_assignment("no-equals-sign")


def test_default_config_documents_every_setting_and_parses_to_the_defaults() -> None:
    text = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    # Every field appears, set or commented out ("# name = ..."), or as a [table].
    for name in WorkerSettings.model_fields:
        assert re.search(rf"^(# )?{name} =|^\[{name}\]", text, re.MULTILINE), name
    parsed = load_settings(DEFAULT_CONFIG_PATH)
    defaults = WorkerSettings.model_validate({})
    assert parsed.model_dump() == defaults.model_dump()
    # Every value the file sets is written out explicitly (nothing relies on a hidden default).
    assert set(tomllib.loads(text)) <= set(WorkerSettings.model_fields)


@pytest.mark.parametrize("value", [0, -3])
def test_trial_is_a_trial_number_from_one(
    value: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config.toml
    with pytest.raises(SettingsError) as raised:
        load_settings(None, {"trial": value})
    assert "trial" in raised.value.message and raised.value.hint
    assert load_settings(None, {"trial": 1}).trial == 1
