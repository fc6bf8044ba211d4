"""The controller's settings: command line > `HCTL_*` environment > config file > defaults.

The config file is `config.toml` in hctl's home folder: `$HCTL_HOME` when set, else the user's
config directory (`~/.config/hctl` on Linux, `%APPDATA%\\hctl` on Windows,
`~/Library/Application Support/hctl` on macOS). hctl also keeps its state there: known host keys
and the local copies of jobs. `RUNPOD_API_KEY` is accepted as well as `HCTL_RUNPOD_API_KEY`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from hctl.errors import ConfigError

DEFAULT_IMAGE = "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"
DEFAULT_GPU = "NVIDIA GeForce RTX 4090"


def hctl_home() -> Path:
    """hctl's own folder: settings, known host keys, local copies of jobs."""
    explicit = os.environ.get("HCTL_HOME")
    if explicit:
        return Path(explicit).expanduser()
    return Path(platformdirs.user_config_dir("hctl", appauthor=False))


def config_file() -> Path:
    return hctl_home() / "config.toml"


class Settings(BaseSettings):
    """Every controller setting, with its default. `docs/configuration.md` lists them all."""

    model_config = SettingsConfigDict(
        env_prefix="HCTL_", extra="forbid", validate_assignment=True, populate_by_name=True
    )

    # RunPod
    runpod_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("runpod_api_key", "HCTL_RUNPOD_API_KEY", "RUNPOD_API_KEY"),
        description="RunPod API key (also read from RUNPOD_API_KEY).",
    )
    runpod_api_url: str = Field(
        default="https://api.runpod.io/graphql", description="RunPod's GraphQL endpoint."
    )
    api_timeout_s: float = Field(
        default=30, gt=0, description="Timeout of one request to the provider's API."
    )
    api_retries: int = Field(
        default=4, ge=0, le=20, description="Retries of a failed request that is safe to repeat."
    )
    api_backoff_s: float = Field(
        default=1.0, ge=0, description="First wait before a retry; doubles each time."
    )
    provider: Literal["runpod"] = Field(default="runpod", description="Where pods come from.")

    # Pods
    gpu: str = Field(default=DEFAULT_GPU, description="GPU type for new pods.")
    image: str = Field(default=DEFAULT_IMAGE, description="Container image for new pods.")
    container_disk_gb: int = Field(default=40, ge=10, description="Container disk, GB.")
    volume_gb: int = Field(default=50, ge=0, description="Pod volume, GB.")
    volume_path: str = Field(default="/workspace", description="Where the volume is mounted.")
    cloud_type: Literal["SECURE", "COMMUNITY", "ALL"] = Field(
        default="ALL", description="Secure cloud, community cloud, or either."
    )
    ready_timeout_s: float = Field(
        default=600, gt=0, description="How long to wait for a pod to become reachable."
    )

    ready_poll_interval_s: float = Field(
        default=5, ge=0, description="Seconds between checks while waiting for a pod."
    )

    # SSH
    ssh_key: Path = Field(
        default=Path("~/.ssh/id_ed25519"), description="Private SSH key used to reach pods."
    )
    ssh_proxy_host: str = Field(default="ssh.runpod.io", description="RunPod's SSH proxy host.")
    ssh_proxy_port: int = Field(default=22, ge=1, le=65535, description="RunPod's SSH proxy port.")
    connect_timeout_s: float = Field(default=15, gt=0, description="SSH connect timeout.")

    # Jobs
    max_cost: float | None = Field(
        default=None, ge=0, description="Budget per job in USD; stop after the trial that hits it."
    )
    after: Literal["stop", "terminate", "keep"] = Field(
        default="stop", description="What happens to the pod when a job ends."
    )
    hf_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("hf_token", "HCTL_HF_TOKEN", "HF_TOKEN"),
        description="Hugging Face token for gated models and uploads (also read from HF_TOKEN).",
    )
    kl_limit: float = Field(
        default=0.5, gt=0, description="Headless trial choice: fewest refusals under this KL."
    )
    follow_interval_s: float = Field(
        default=2.0, gt=0, description="Seconds between reads of a job's events while following."
    )

    @property
    def ssh_key_path(self) -> Path:
        return self.ssh_key.expanduser()

    @property
    def home(self) -> Path:
        return hctl_home()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=config_file()),
        )


def load_settings(**overrides: Any) -> Settings:
    """Settings with command-line `overrides` on top (None values are ignored).

    A bad value anywhere (file, environment, command line) becomes one `ConfigError` naming the
    setting, never a pydantic traceback.
    """
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise ConfigError(
            f"Invalid setting: {problems}",
            f"Check {config_file()} and the HCTL_* environment variables "
            "(`hctl config show` lists the settings).",
        ) from None
    except (OSError, ValueError) as error:  # an unreadable or malformed config file
        raise ConfigError(
            f"Cannot read the config file {config_file()}: {error}",
            "Fix or delete the file; `hctl config set KEY VALUE` rewrites it.",
        ) from None
