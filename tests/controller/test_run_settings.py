"""The worker's settings reach `hctl run` through the same cascade as `hctl-worker`:
command line > `HERETIC_*` environment > the `--config` file > defaults.

`hctl run --dry-run` prints the settings the worker would get, so each layer is checked as a user
would see it, for a number (`n_trials`) and a prompt setting (`system_prompt`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hctl.cli import app
from tests.conftest import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TINY = str(REPO_ROOT / "tests" / "fixtures" / "tiny-refuser")
SETTINGS_MARK = "The worker's settings"


def planned(*arguments: str) -> tuple[dict, str]:
    """The worker settings `hctl run --dry-run` shows, and its whole output."""
    result = CliRunner().invoke(app, ["run", TINY, "--on", "local", "--dry-run", *arguments])
    assert result.exit_code == 0, result.output
    assert "nothing was started" in result.output
    text = result.stdout.split(SETTINGS_MARK, 1)[1].split("\n", 1)[1]
    text = text.rsplit("Dry run:", 1)[0]
    return tomllib.loads(text), result.output


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "search.toml"
    path.write_text('n_trials = 5\nsystem_prompt = "From the file."\n')
    return path


def test_without_any_setting_the_defaults_apply() -> None:
    values, output = planned()
    assert values["n_trials"] == 200 and values["system_prompt"] == "You are a helpful assistant."
    assert "Estimate for 200 trials" in output


def test_the_config_file_beats_the_defaults(config_file: Path) -> None:
    values, output = planned("--config", str(config_file))
    assert values["n_trials"] == 5 and values["system_prompt"] == "From the file."
    assert "Estimate for 5 trials" in output


def test_the_environment_beats_the_config_file(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERETIC_N_TRIALS", "7")
    monkeypatch.setenv("HERETIC_SYSTEM_PROMPT", "From the environment.")
    values, output = planned("--config", str(config_file))
    assert values["n_trials"] == 7 and values["system_prompt"] == "From the environment."
    assert "Estimate for 7 trials" in output


def test_the_command_line_beats_the_environment_and_the_file(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERETIC_N_TRIALS", "7")
    monkeypatch.setenv("HERETIC_SYSTEM_PROMPT", "From the environment.")
    values, output = planned(
        "--config", str(config_file), "--trials", "3", "--set", 'system_prompt="From the CLI."'
    )
    assert values["n_trials"] == 3 and values["system_prompt"] == "From the CLI."
    assert "Estimate for 3 trials" in output
    values, _ = planned("--config", str(config_file), "--set", "n_trials=4")
    assert values["n_trials"] == 4  # --set is the command line too


def test_a_bad_value_in_any_layer_is_refused_not_replaced_by_a_default(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file.write_text('n_trials = "many"\n')
    refused = CliRunner().invoke(app, ["run", TINY, "--on", "local", "--config", str(config_file)])
    assert (
        refused.exit_code == 2
        and "n_trials" in refused.output
        and str(config_file) in refused.output
    )
    monkeypatch.setenv("HERETIC_N_TRIALS", "lots")
    refused = CliRunner().invoke(app, ["run", TINY, "--on", "local", "--dry-run"])
    assert refused.exit_code == 2 and "n_trials" in refused.output
