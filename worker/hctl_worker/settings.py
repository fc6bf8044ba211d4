"""The worker's settings: command line > `HERETIC_*` environment > config file > defaults.

The names follow heretic's (`model`, `n_trials`, `good_prompts`, `row_normalization`...) so a
heretic `config.toml` carries over; heretic's other names are translated (`heretic_keys.py`),
heretic's `scorers` list is read as this worker's. Prompt sets are `prompt_source.PromptSource`.

`config.default.toml`, next to this module, documents every setting with its default.
This module is torch-free so a bad setting is reported before anything heavy is imported.
"""

from __future__ import annotations

import contextvars
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from hctl_worker.errors import SettingsError
from hctl_worker.heretic_keys import translate_keys
from hctl_worker.prompt_source import (
    BAD_EVALUATION_PROMPTS,
    BAD_PROMPTS,
    GOOD_EVALUATION_PROMPTS,
    GOOD_PROMPTS,
    PROMPT_TABLES,
    SPLIT_PATTERN,
    PromptSource,
)
from hctl_worker.scorers.choices import (
    DEFAULT_SCORERS,
    ClassifierSettings,
    ScorerChoice,
    check_choices,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the package allows Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG_NAME = "config.toml"
DEFAULT_CONFIG_PATH = Path(__file__).with_name("config.default.toml")
# A device map as one string: accelerate's strategies, or one device (a GPU by its index).
_DEVICE_MAP = re.compile(
    r"auto|balanced|balanced_low_0|sequential|cpu|mps|(cuda|xpu|npu)(:\d+)?|\d+"
)


class WorkerSettings(BaseSettings):
    """Every worker setting with its default; `config.default.toml` explains each one."""

    model_config = SettingsConfigDict(
        env_prefix="HERETIC_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        protected_namespaces=(),
    )

    # The model.
    model: str | None = Field(default=None, description="Hub id or local folder of the model.")
    model_commit: str | None = Field(default=None, description="Model revision on the hub.")
    dtypes: list[str] = Field(
        default_factory=lambda: ["auto", "float16", "bfloat16", "float32"], min_length=1
    )
    device_map: str | dict[str, int | str] = "auto"
    max_memory: dict[str, str] | None = None
    trust_remote_code: bool = False

    # Prompts.
    good_prompts: PromptSource = Field(default_factory=lambda: GOOD_PROMPTS.model_copy())
    bad_prompts: PromptSource = Field(default_factory=lambda: BAD_PROMPTS.model_copy())
    good_evaluation_prompts: PromptSource = Field(
        default_factory=lambda: GOOD_EVALUATION_PROMPTS.model_copy()
    )
    bad_evaluation_prompts: PromptSource = Field(
        default_factory=lambda: BAD_EVALUATION_PROMPTS.model_copy()
    )
    system_prompt: str = "You are a helpful assistant."

    # Evaluation.
    batch_size: int = Field(default=0, ge=0)
    max_batch_size: int = Field(default=128, ge=1)
    max_response_length: int = Field(default=100, ge=1)
    refusal_markers: list[str] | None = None
    extra_refusal_markers: list[str] = Field(default_factory=list)  # added to the markers
    learn_refusal_markers: bool = True  # see baseline_check
    kl_skip_threshold: float = Field(default=1.0, ge=0)  # 0 = always count refusals
    prune_trials: bool = True
    prune_margin: float = Field(default=0.05, ge=0, le=1)  # of the harmful prompts
    replay_memory: float = Field(default=0.25, ge=0)  # of the model's size; 0 = no replay
    draft_replies: bool = True
    decode_graphs: Literal["auto", "off"] = "off"  # "auto": not yet run on a GPU
    trials_together: int = Field(default=2, ge=1, le=16)  # trials sharing decode steps
    cpu_linear: Literal["auto", "torch"] = "auto"  # float32 linear layers on a CPU: oneDNN?

    # Scorers: what a trial is judged by.
    scorers: list[ScorerChoice] = Field(
        default_factory=lambda: [choice.model_copy() for choice in DEFAULT_SCORERS], min_length=1
    )
    refusal_classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    kl_tokens: int = Field(default=16, ge=1, le=4096)  # MultiTokenKL: continuation tokens
    harmless_response_length: int = Field(default=16, ge=1)
    harmless_refusal_margin: float = Field(default=0.05, ge=0, le=1)  # 1 = no limit

    # Checking the chosen model (hctl-worker evaluate, and after export when asked).
    evaluate_after_export: bool = False
    evaluation_text: str | None = None  # a text file; blank lines separate passages
    benchmarks: list[str] = Field(default_factory=list)  # lm-eval task names
    benchmark_limit: int | None = Field(default=None, ge=1)  # examples per task

    # Directions and edits.
    orthogonalize_direction: bool = True
    row_normalization: Literal["none", "pre", "full"] = "none"
    direction_scope: Literal["search", "global", "per_layer"] = "search"
    search_ranges: Literal["measured", "heretic"] = "measured"

    # The search.
    n_trials: int = Field(default=200, ge=1)
    n_startup_trials: int = Field(default=60, ge=0)
    seed: int | None = Field(default=None, ge=0)
    # Several workers on one study: how often a running trial beats, and how long a still beat
    # means its worker died (its trial then runs again elsewhere).
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    stale_after_seconds: float = Field(default=60.0, gt=0)

    # Choosing and exporting a result.
    trial: int | None = Field(default=None, ge=1)  # a trial number, as events and tables count
    save_directory: str | None = None
    upload_repo: str | None = None
    upload_private: bool = True
    max_shard_size: str = "5GB"

    _warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """What was accepted but ignored (heretic keys this worker does not use)."""
        return self._warnings

    @model_validator(mode="after")
    def _check_scorers(self) -> WorkerSettings:
        check_choices(self.scorers, self.refusal_classifier)
        return self

    @field_validator("refusal_markers", "extra_refusal_markers")
    @classmethod
    def _check_markers(cls, values: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if values is not None and not values and info.field_name == "refusal_markers":
            raise ValueError(
                "an empty list would count no reply a refusal; leave refusal_markers unset for "
                "heretic's default markers, or list your own"
            )
        if values is not None and any(not value.strip() for value in values):
            raise ValueError("a blank marker would count every reply a refusal")
        return values

    @field_validator("device_map")
    @classmethod
    def _check_device_map(cls, value: str | dict[str, int | str]) -> str | dict[str, int | str]:
        if isinstance(value, str) and not _DEVICE_MAP.fullmatch(value):
            raise ValueError(
                f'\'{value}\' is not a device map; use "auto", "cpu", "cuda:0" (a GPU\'s '
                'index), "balanced", "sequential", or a table of module = device'
            )
        return value

    @field_validator("dtypes")
    @classmethod
    def _check_dtypes(cls, values: list[str]) -> list[str]:
        allowed = {"auto", "float16", "bfloat16", "float32", "float64"}
        for value in values:
            if value not in allowed:
                raise ValueError(f"'{value}' is not a dtype; use any of {sorted(allowed)}")
        return values

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls, _pending_file_values()))

    def search_fingerprint(self) -> dict[str, Any]:
        """The settings a search's results depend on; a job cannot change them on resume."""
        keys = (
            "model",
            "model_commit",
            "good_prompts",
            "bad_prompts",
            "good_evaluation_prompts",
            "bad_evaluation_prompts",
            "system_prompt",
            "max_response_length",
            "refusal_markers",
            "extra_refusal_markers",
            "learn_refusal_markers",
            "kl_skip_threshold",
            "scorers",
            "refusal_classifier",
            "kl_tokens",
            "harmless_response_length",
            "harmless_refusal_margin",
            "orthogonalize_direction",
            "row_normalization",
            "direction_scope",
            "search_ranges",
        )
        dumped = self.model_dump(mode="json")
        dumped["refusal_classifier"].pop("batch_size")  # speed only
        return {key: dumped[key] for key in keys}

    def to_toml_dict(self) -> dict[str, Any]:
        """The settings as TOML can hold them (TOML has no null: unset values are left out)."""
        return _drop_none(self.model_dump(mode="json"))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_none(item) for item in value]
    return value


class _FileSource(PydanticBaseSettingsSource):
    """The config file's values, already translated from heretic's names."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


# The translated file values for the `WorkerSettings(...)` call being made. pydantic-settings
# builds its sources inside the constructor, so the file's values are handed over here.
_FILE_VALUES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "hctl_worker_file_values", default=None
)


def _pending_file_values() -> dict[str, Any]:
    return _FILE_VALUES.get() or {}


def translate_heretic_keys(raw: Mapping[str, Any], origin: str) -> tuple[dict[str, Any], list[str]]:
    """Map a heretic-style table onto the settings' names; returns the values and warnings."""
    return translate_keys(raw, origin, WorkerSettings.model_fields)


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw TOML table of a config file; a missing or malformed file is a SettingsError."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(
            f"config file {path} does not exist",
            "Check the --config path (config.default.toml shows the format).",
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(
            f"config file {path} is not valid TOML: {error}",
            "Fix the line named; strings need quotes, tables go in [brackets].",
        ) from None
    except OSError as error:
        raise SettingsError(f"cannot read config file {path}: {error.strerror}") from None


def load_settings(
    config_file: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> WorkerSettings:
    """Settings from the command line `overrides`, `HERETIC_*` variables, the file and defaults.

    Without `config_file`, `./config.toml` is read when it exists. Overrides that are None are
    ignored (an option not given on the command line). Every problem is one SettingsError.
    """
    warnings: list[str] = []
    file_values: dict[str, Any] = {}
    if config_file is None and Path(DEFAULT_CONFIG_NAME).is_file():
        config_file = Path(DEFAULT_CONFIG_NAME)
    if config_file is not None:
        file_values, warnings = translate_heretic_keys(
            read_config_file(config_file), str(config_file)
        )
        file_values = _resolve_relative_paths(file_values, config_file.parent)
    given, override_warnings = translate_heretic_keys(
        {key: value for key, value in (overrides or {}).items() if value is not None},
        "command line",
    )
    warnings += override_warnings
    # A table the file leaves out starts from its default, so that one key set in the environment
    # (HERETIC_GOOD_PROMPTS__SPLIT) changes that key only.
    defaults = {
        "good_prompts": GOOD_PROMPTS,
        "bad_prompts": BAD_PROMPTS,
        "good_evaluation_prompts": GOOD_EVALUATION_PROMPTS,
        "bad_evaluation_prompts": BAD_EVALUATION_PROMPTS,
    }
    for table, default in defaults.items():
        file_values.setdefault(table, default.model_dump(exclude_none=True))
    token = _FILE_VALUES.set(file_values)
    try:
        settings = WorkerSettings(**given)
    except ValidationError as error:
        raise SettingsError(_describe(error, config_file)) from None
    finally:
        _FILE_VALUES.reset(token)
    settings._warnings = warnings
    return settings


def _resolve_relative_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative model and prompt-file paths that exist next to the config file point there."""

    def resolved(path: str) -> str:
        candidate = folder / path
        if not Path(path).is_absolute() and not Path(path).exists() and candidate.exists():
            return str(candidate.resolve())
        return path

    values = dict(values)
    if isinstance(values.get("model"), str):
        values["model"] = resolved(values["model"])
    if isinstance(values.get("evaluation_text"), str):
        values["evaluation_text"] = resolved(values["evaluation_text"])
    classifier = values.get("refusal_classifier")
    if isinstance(classifier, Mapping) and isinstance(classifier.get("model"), str):
        values["refusal_classifier"] = {**classifier, "model": resolved(classifier["model"])}
    for table in PROMPT_TABLES:
        if isinstance(values.get(table), Mapping) and isinstance(values[table].get("dataset"), str):
            values[table] = {**values[table], "dataset": resolved(values[table]["dataset"])}
    return values


def _describe(error: ValidationError, config_file: Path | None) -> str:
    problems = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "settings"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown setting"
        shown = problem.get("input")
        if problem["type"] != "extra_forbidden" and not isinstance(shown, dict | list):
            message += f" (got {shown!r})"
        problems.append(f"{location}: {message}")
    source = (
        f" in {config_file}, the HERETIC_* environment or the command line" if config_file else ""
    )
    return f"invalid setting{source}: " + "; ".join(problems)


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from `--set`; the value is read as TOML (`3`, `true`, `[1, 2]`) or a string."""
    key, separator, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not separator or not key:
        raise SettingsError(
            f"'{text}' is not KEY=VALUE", "Write e.g. --set max_response_length=24."
        )
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "PROMPT_TABLES",
    "SPLIT_PATTERN",
    "PromptSource",
    "WorkerSettings",
    "load_settings",
    "parse_assignment",
    "read_config_file",
    "translate_heretic_keys",
]
