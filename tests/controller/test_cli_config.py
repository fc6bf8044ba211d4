"""`hctl config show` and `hctl config set`: precedence, masking, validation, the file's permissions."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from hctl.cli import app
from hctl.settings import config_file, load_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECRET = "rpa_SECRETKEY0123456789abcdefWXYZ"


def hctl(*arguments: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(arguments), input=input)


def shown(result: Result) -> dict[str, dict[str, str]]:
    return {view["name"]: view for view in json.loads(result.output)}


def file_values() -> dict:
    return tomllib.loads(config_file().read_text())


def test_api_key_is_asked_for_hidden_and_stored_owner_only() -> None:
    result = hctl("config", "set", "runpod_api_key", input=SECRET + "\n")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output  # neither echoed nor printed
    assert file_values() == {"runpod_api_key": SECRET}
    assert stat.S_IMODE(config_file().stat().st_mode) == 0o600
    assert load_settings().runpod_api_key.get_secret_value() == SECRET
    listing = hctl("config", "show", "--json")
    assert SECRET not in listing.output
    assert shown(listing)["runpod_api_key"] == {
        "name": "runpod_api_key",
        "value": "****WXYZ",
        "source": "config file",
        "description": "RunPod API key (also read from RUNPOD_API_KEY).",
    }


def test_set_validates_names_and_values_and_keeps_other_settings() -> None:
    assert hctl("config", "set", "gpu", "NVIDIA RTX A6000").exit_code == 0
    assert hctl("config", "set", "container-disk-gb", "60").exit_code == 0
    assert file_values() == {"gpu": "NVIDIA RTX A6000", "container_disk_gb": 60}
    for arguments, fragment in [
        (("container_disk_gb", "5"), "'5' is not a valid container_disk_gb"),
        (("cloud_type", "cheap"), "'SECURE', 'COMMUNITY' or 'ALL'"),
        (("ssh_proxy_port", "seventy"), "not a valid ssh_proxy_port"),
        (("volume_gbs", "5"), "Did you mean volume_gb or"),
        (("gpu",), "No value given for gpu"),
    ]:
        result = hctl("config", "set", *arguments)
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and "hint:" in result.output, result.output
        assert fragment in result.output, result.output
    typed = hctl("config", "set", "RUNPOD_API_KEY", SECRET)
    assert typed.exit_code == 0 and "shell history" in typed.output and SECRET not in typed.output
    assert file_values()["runpod_api_key"] == SECRET
    bad_key = hctl("config", "set", "runpod_api_key", input="rpa with spaces\n")
    assert bad_key.exit_code == 2 and "has spaces" in bad_key.output
    assert "rpa with spaces" not in bad_key.output
    assert file_values() == {  # untouched by the refused values
        "gpu": "NVIDIA RTX A6000", "container_disk_gb": 60, "runpod_api_key": SECRET,
    }  # fmt: skip
    assert hctl("config", "set", "gpu", "").exit_code == 0  # "" removes a setting
    assert file_values() == {"container_disk_gb": 60, "runpod_api_key": SECRET}


def test_show_reports_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    hctl("config", "set", "volume_gb", "80")
    hctl("config", "set", "gpu", "NVIDIA L40S")
    monkeypatch.setenv("HCTL_GPU", "NVIDIA RTX A4000")
    monkeypatch.setenv("RUNPOD_API_KEY", SECRET)
    views = shown(hctl("config", "show", "--json"))
    assert (views["gpu"]["value"], views["gpu"]["source"]) == ("NVIDIA RTX A4000", "environment")
    assert (views["volume_gb"]["value"], views["volume_gb"]["source"]) == ("80", "config file")
    assert views["runpod_api_key"]["source"] == "environment"
    assert views["runpod_api_key"]["value"] == "****WXYZ"
    assert views["container_disk_gb"]["source"] == "default"
    table = hctl("config", "show")
    assert (
        table.exit_code == 0 and SECRET not in table.output and str(config_file()) in table.output
    )


def test_a_broken_config_file_is_a_clear_error(tmp_path: Path) -> None:
    config_file().parent.mkdir(parents=True, exist_ok=True)
    config_file().write_text("gpu = [unclosed\n")
    result = hctl("config", "show")
    assert result.exit_code == 2
    assert "Cannot read the config file" in result.output and "Traceback" not in result.output


def test_bare_config_shows_the_settings_like_config_show() -> None:
    bare = hctl("config", "--json")
    assert bare.exit_code == 0 and shown(bare) == shown(hctl("config", "show", "--json"))
    listed = hctl("config")
    assert listed.exit_code == 0 and "runpod_api_url" in listed.output


def test_a_secret_is_read_from_stdin_without_a_terminal_and_without_warnings() -> None:
    result = CliRunner().invoke(app, ["config", "set", "hf_token"], input="hf_0123456789abcdef\n")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output and "hf_0123456789abcdef" not in result.output
    assert file_values() == {"hf_token": "hf_0123456789abcdef"}


def test_an_api_address_must_be_an_http_url() -> None:
    refused = hctl("config", "set", "runpod_api_url", "not a url")
    assert refused.exit_code == 2 and "http:// or https://" in refused.output
    assert not config_file().exists()
    assert hctl("config", "set", "runpod_api_url", "http://127.0.0.1:9/graphql").exit_code == 0


def test_removing_a_secret_gives_no_tip_about_typing_it() -> None:
    typed = hctl("config", "set", "hf_token", "hf_0123456789abcdef")
    assert "Tip: leave the value out" in typed.output
    removed = hctl("config", "set", "hf_token", "")
    assert removed.exit_code == 0 and "hf_token removed" in removed.output
    assert "Tip" not in removed.output and file_values() == {}


def test_a_mistyped_key_in_the_config_file_is_named_and_can_be_removed() -> None:
    config_file().parent.mkdir(parents=True, exist_ok=True)
    config_file().write_text('colour = 1\ngpu = "NVIDIA RTX A6000"\n')
    shown = hctl("config", "show")
    assert shown.exit_code == 2
    assert f"error: The config file {config_file()} sets 'colour', which is not a setting" in (
        shown.output
    )
    assert "Extra inputs" not in shown.output
    assert 'Remove it: `hctl config set colour ""`.' in shown.output
    removed = hctl("config", "set", "colour", "")
    assert removed.exit_code == 0, removed.output
    assert file_values() == {"gpu": "NVIDIA RTX A6000"}
    assert hctl("config", "show").exit_code == 0


def test_an_unreadable_config_file_gets_a_hint_that_works() -> None:
    config_file().parent.mkdir(parents=True, exist_ok=True)
    config_file().write_text("volume_gb = \n")
    result = hctl("config", "set", "volume_gb", "60")
    assert result.exit_code == 2
    assert "Cannot read the config file" in result.output
    assert "config set KEY VALUE` rewrites it" not in result.output  # it cannot: see above
    assert "Fix the line it names, or delete the file" in result.output


def test_a_gpu_is_looked_up_when_set_and_an_unknown_one_is_refused(
    hctl_runpod_env,  # noqa: ANN001 - the emulator, both APIs
) -> None:
    """`config set gpu` asks the provider's catalogue: a short name is stored as the type's id,
    a name of no type is refused with the nearest ones, and the file keeps the last good one."""
    short = hctl("config", "set", "gpu", "4090")
    assert short.exit_code == 0, short.output
    assert file_values() == {"gpu": "NVIDIA GeForce RTX 4090"}
    assert "'4090' is the GPU type 'NVIDIA GeForce RTX 4090'" in short.output
    unknown = hctl("config", "set", "gpu", "RTX 9999")
    assert unknown.exit_code == 2, unknown.output
    assert "There is no GPU type 'RTX 9999'" in unknown.output
    assert "hint: Did you mean" in unknown.output and "hctl gpus" in unknown.output
    assert file_values() == {"gpu": "NVIDIA GeForce RTX 4090"}


def test_a_gpu_set_without_a_key_or_network_is_kept_and_said_to_be_unchecked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    result = hctl("config", "set", "gpu", "RTX 9999")
    assert result.exit_code == 0, result.output
    assert "Not checked against the provider's GPU types (No RunPod API key" in result.output
    assert file_values() == {"gpu": "RTX 9999"}
    # A key but no network: one attempt, no retries, and the value is kept as typed.
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_EMULATOR0TEST0KEY0000000000000000000000")
    monkeypatch.setenv("HCTL_RUNPOD_REST_URL", "http://127.0.0.1:9")
    offline = hctl("config", "set", "gpu", "4090")
    assert offline.exit_code == 0, offline.output
    assert "Cannot reach RunPod's API" in offline.output and "Retrying" not in offline.output
    assert file_values() == {"gpu": "4090"}
