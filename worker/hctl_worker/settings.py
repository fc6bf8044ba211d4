"""The worker's settings: command line > `HERETIC_*` environment > config file > defaults.

The names follow heretic's (`model`, `n_trials`, `good_prompts`, `row_normalization`...) so a
heretic `config.toml` carries over. heretic keys that mean the same thing under another name here
(`upload_repo_id`, `keyword_markers`, `[scorer.KeywordRate.prompts]`...) are renamed, heretic's
`scorers` list is read as this worker's; heretic keys
for features this worker does not have (plots, interactive menus) and heretic's
`trial_index` (an index into its Pareto front, where `trial` here is a trial number) are accepted
and ignored with a warning; anything else is an error naming the key.

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
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from hctl_worker.errors import SettingsError
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


class PromptSource(BaseModel):
    """Where a set of prompts comes from: a hub dataset (id, split, column) or a local text file.

    `dataset` is a hub dataset id, a local folder saved by `datasets`, or a plain text file with
    one prompt per line. `split` is a split name with an optional slice (`train[:400]`,
    `test[10:20]`, `train[:10%]`); for a text file only the slice part counts (`[:400]`).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str
    split: str | None = None
    column: str = "text"
    prefix: str = Field(default="", description="Text put before every prompt (with a space).")
    suffix: str = Field(default="", description="Text put after every prompt (with a space).")
    commit: str | None = Field(default=None, description="Dataset revision (hub datasets).")

    @field_validator("split")
    @classmethod
    def _check_split(cls, value: str | None) -> str | None:
        if value is not None and not SPLIT_PATTERN.fullmatch(value.strip()):
            raise ValueError(
                f"'{value}' is not a split: write a name and an optional slice, "
                "e.g. 'train', 'train[:400]', 'test[10:20]', '[:50%]'"
            )
        return value


SPLIT_PATTERN = re.compile(
    r"(?P<name>[\w.-]*)\s*(\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<end>-?\d+%?)?\s*\])?"
)


GOOD_PROMPTS = PromptSource(dataset="mlabonne/harmless_alpaca", split="train[:400]")
BAD_PROMPTS = PromptSource(dataset="mlabonne/harmful_behaviors", split="train[:400]")
GOOD_EVALUATION_PROMPTS = PromptSource(dataset="mlabonne/harmless_alpaca", split="test[:100]")
BAD_EVALUATION_PROMPTS = PromptSource(dataset="mlabonne/harmful_behaviors", split="test[:100]")


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
    kl_skip_threshold: float = Field(default=1.0, ge=0)  # 0 = always count refusals
    prune_trials: bool = True
    prune_margin: float = Field(default=0.05, ge=0, le=1)  # of the harmful prompts
    replay_memory: float = Field(default=0.25, ge=0)  # of the model's size; 0 = no replay
    draft_replies: bool = True

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


# heretic keys that mean the same here under another name.
RENAMED_KEYS = {
    "upload_repo_id": "upload_repo",
    "upload_repo_private": "upload_private",
    "keyword_markers": "refusal_markers",
}

# heretic keys for things this worker does not do; accepted so a heretic config carries over.
IGNORED_HERETIC_KEYS = {
    "evaluate_model": "scoring another model is not supported",
    "reproduce": "reproduction files are not supported",
    "collect_reproducibles": "reproduction files are not supported",
    "offload_outputs_to_cpu": "outputs always go to the CPU",
    "response_prefix": "response prefixes are not supported",
    "chain_of_thought_skips": "response prefixes are not supported",
    "print_debug_information": "there is no debug printing",
    "print_residual_geometry": "there are no residual statistics",
    "plot_residuals": "there are no residual plots",
    "residual_plot_path": "there are no residual plots",
    "residual_plot_title": "there are no residual plots",
    "residual_plot_style": "there are no residual plots",
    "full_normalization_lora_rank": "edits are exact, not LoRA approximations",
    "winsorization_quantile": "winsorization is not supported",
    "study_checkpoint_dir": "the study lives in the job directory",
    "checkpoint_action": "the same job directory always continues its study",
    "n_additional_trials": "raise n_trials instead",
    "model_action": "set save_directory or upload_repo instead",
    "upload_reproducibility_information": "reproduction files are not supported",
    "ignore_mismatches": "reproduction files are not supported",
    "kl_divergence_scale": "objectives are the scorers' raw values",
    "kl_divergence_target": "objectives are the scorers' raw values",
    "print_responses": "responses are not printed",
    "multidirectional_som": "multi-direction (SOM) ablation is not supported",
    "som_x": "multi-direction (SOM) ablation is not supported",
    "som_y": "multi-direction (SOM) ablation is not supported",
    "som_iterations": "multi-direction (SOM) ablation is not supported",
    "som_lr": "multi-direction (SOM) ablation is not supported",
    "som_sigma": "multi-direction (SOM) ablation is not supported",
    "som_k": "multi-direction (SOM) ablation is not supported",
    "trusted_models": "set trust_remote_code instead",
    "trial_index": "it is an index into heretic's Pareto front; set trial to a trial number, as "
    "hctl-worker pareto lists them, or leave it unset to choose the best automatically",
}

# Keys of a heretic prompt table that only matter to heretic's plots.
IGNORED_PROMPT_KEYS = {"residual_plot_label", "residual_plot_color", "system_prompt"}

PROMPT_TABLES = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")


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
    """Map a heretic-style table onto this worker's names; returns the values and warnings."""
    values: dict[str, Any] = {}
    warnings: list[str] = []
    fields = WorkerSettings.model_fields
    for key, value in raw.items():
        if key == "quantization":
            if value not in (None, "none"):
                raise SettingsError(
                    f"{origin}: quantization = '{value}' is not supported",
                    "Remove the quantization setting; the worker loads models unquantized.",
                )
            continue
        if key == "export_strategy":
            if value not in (None, "merge"):
                warnings.append(f"{origin}: export_strategy '{value}' ignored; exports are merged")
            continue
        if key == "scorer" and isinstance(value, Mapping):
            values.update(_translate_scorer_tables(value, origin, warnings))
            continue
        if key in IGNORED_HERETIC_KEYS:
            warnings.append(f"{origin}: '{key}' ignored ({IGNORED_HERETIC_KEYS[key]})")
            continue
        name = RENAMED_KEYS.get(key, key)
        if name not in fields:
            close = _closest(name, fields)
            suggestion = f"Did you mean '{close}'? " if close else ""
            raise SettingsError(
                f"{origin}: unknown setting '{key}'",
                suggestion + "config.default.toml lists every setting.",
            )
        if name in PROMPT_TABLES and isinstance(value, Mapping):
            value = _translate_prompt_table(value, f"{origin} [{key}]", warnings)
        values[name] = value
    return values, warnings


def _translate_prompt_table(
    table: Mapping[str, Any], origin: str, warnings: list[str]
) -> dict[str, Any]:
    kept = {}
    for key, value in table.items():
        if key in IGNORED_PROMPT_KEYS:
            warnings.append(f"{origin}: '{key}' ignored")
        else:
            kept[key] = value
    return kept


def _translate_scorer_tables(
    scorers: Mapping[str, Any], origin: str, warnings: list[str]
) -> dict[str, Any]:
    """heretic HEAD's `[scorer.KeywordRate]` / `[scorer.KLDivergence]` tables."""
    values: dict[str, Any] = {}
    for name, table in scorers.items():
        if not isinstance(table, Mapping):
            continue
        for key, value in table.items():
            where = f"{origin} [scorer.{name}]"
            if key == "prompts" and name == "KeywordRate":
                values["bad_evaluation_prompts"] = _translate_prompt_table(value, where, warnings)
            elif key == "prompts" and name == "KLDivergence":
                values["good_evaluation_prompts"] = _translate_prompt_table(value, where, warnings)
            elif key == "keyword_markers" and name == "KeywordRate":
                values["refusal_markers"] = value
            else:
                warnings.append(f"{where}: '{key}' ignored")
    return values


def _closest(name: str, candidates: Mapping[str, Any]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


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
