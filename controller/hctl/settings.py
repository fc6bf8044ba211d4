"""The controller's settings: command line > `HCTL_*` environment > config file > defaults.

The config file is `config.toml` in hctl's home folder: `$HCTL_HOME` when set, else the user's
config directory (`~/.config/hctl` on Linux, `%LOCALAPPDATA%\\hctl` on Windows,
`~/Library/Application Support/hctl` on macOS), which also holds the known host keys. Data —
the local copies of jobs, the results of `--on local` runs, this machine's measured speed — goes
to the user's data folder (`data_dir()`: `~/.local/share/hctl` on Linux), or to `$HCTL_HOME`
when that is set. `RUNPOD_API_KEY` is accepted as well as `HCTL_RUNPOD_API_KEY`.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import (
    AfterValidator,
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from hctl.errors import ConfigError

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - Python 3.10
    pass

DEFAULT_IMAGE = "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"
DEFAULT_GPU = "NVIDIA GeForce RTX 4090"
DEFAULT_SSH_PROXY_HOST = "ssh.runpod.io"
# Sizes no one means: a typo, not a pod (RunPod bills container disk and volume per GB).
MAX_CONTAINER_DISK_GB = 2000
MAX_VOLUME_GB = 4000


def hctl_home() -> Path:
    """hctl's own folder: settings, known host keys, local copies of jobs."""
    explicit = os.environ.get("HCTL_HOME")
    if explicit:
        return Path(explicit).expanduser()
    return Path(platformdirs.user_config_dir("hctl", appauthor=False))


def config_file() -> Path:
    return hctl_home() / "config.toml"


def data_dir() -> Path:
    """Where hctl keeps data: `$HCTL_HOME` when set, else the user's data folder."""
    explicit = os.environ.get("HCTL_HOME")
    if explicit:
        return Path(explicit).expanduser()
    return Path(platformdirs.user_data_dir("hctl", appauthor=False))


def _http_address(value: str) -> str:
    """An http(s) URL with a host, as the API settings need; anything else is refused."""
    parts = urlsplit(value.strip())
    try:
        parts.port  # noqa: B018 - reading it checks the port
    except ValueError:
        raise ValueError(f"{value!r} has no valid port") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// address")
    return value.strip()


# A setting that holds the address of an HTTP API.
HttpAddress = Annotated[str, AfterValidator(_http_address)]


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
    runpod_rest_url: HttpAddress = Field(
        default="https://api.runpod.io", description="RunPod's REST API v2 (provider runpod)."
    )
    runpod_api_url: HttpAddress = Field(
        default="https://api.runpod.io/graphql",
        description="RunPod's GraphQL endpoint (provider runpod-graphql).",
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
    create_timeout_s: float = Field(
        default=120, gt=0, description="How long a pod create may take to answer before hctl looks."
    )
    create_grace_s: float = Field(
        default=90,
        ge=0,
        description="After a create got no answer, how long hctl looks for the pod by name.",
    )
    provider: Literal["runpod", "runpod-graphql"] = Field(
        default="runpod",
        description="Where pods come from: runpod (REST v2) or runpod-graphql (spot pods).",
    )

    # Pods
    gpu: str = Field(default=DEFAULT_GPU, description="GPU type for new pods.")
    image: str = Field(default=DEFAULT_IMAGE, description="Container image for new pods.")
    container_disk_gb: int = Field(
        default=40, ge=10, le=MAX_CONTAINER_DISK_GB, description="Container disk, GB."
    )
    volume_gb: int = Field(default=50, ge=0, le=MAX_VOLUME_GB, description="Pod volume, GB.")
    min_cuda_version: str | None = Field(
        default=None,
        description="Lowest host CUDA for new pods, e.g. 12.8 (default: from the image's tag; "
        "any: none).",
    )
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
    ssh_proxy_host: str = Field(
        default=DEFAULT_SSH_PROXY_HOST, description="RunPod's SSH proxy host."
    )
    ssh_proxy_port: int = Field(default=22, ge=1, le=65535, description="RunPod's SSH proxy port.")
    connect_timeout_s: float = Field(default=15, gt=0, description="SSH connect timeout.")
    worker_python: str | None = Field(
        default=None,
        description="Python on the machine to install the worker with (default: python3).",
    )

    # Jobs
    max_cost: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Budget per job in USD; stop after the trial that hits it.",
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
    self_stop_grace_s: float = Field(
        default=900,
        ge=0,
        description="A pod stops itself this long after its worker ends when no hctl follows it.",
    )
    database_port: int = Field(
        default=5432,
        ge=1024,
        le=65535,
        description="--pods: the TCP port of the job's PostgreSQL server on its first pod.",
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


# hctl cannot rewrite a file it cannot read without losing what is in it.
CONFIG_FILE_UNREADABLE_HINT = (
    "Fix the line it names, or delete the file (the defaults apply then); `hctl config show` "
    "reads it again."
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
        unknown = [
            str(item["loc"][0]) for item in error.errors() if item["type"] == "extra_forbidden"
        ]
        if unknown:  # only the config file can name one (the environment's extras are ignored)
            raise ConfigError(
                f"The config file {config_file()} sets {unknown[0]!r}, which is not a setting.",
                f'{did_you_mean(unknown[0])}Remove it: `hctl config set {unknown[0]} ""`.',
            ) from None
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: "
            + readable_message(problem["msg"])
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
            CONFIG_FILE_UNREADABLE_HINT,
        ) from None


def did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(Settings.model_fields), n=3)
    return f"Did you mean {' or '.join(close)}? " if close else ""


def readable_message(message: str) -> str:
    """pydantic's message without its "Value error, " prefix for a validator's own words."""
    return message.removeprefix("Value error, ")
