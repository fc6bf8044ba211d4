"""The config file as `hctl config show/set` see it: every setting with its value in force and
where that value comes from (secrets masked), and one setting checked and written to
`config.toml` (owner-only, as it may hold the API key) or removed from it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import AliasChoices, BaseModel, SecretStr, TypeAdapter, ValidationError

from hctl.errors import ConfigError
from hctl.settings import (
    CONFIG_FILE_UNREADABLE_HINT,
    Settings,
    config_file,
    did_you_mean,
    readable_message,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class SettingView(BaseModel):
    """One setting as `hctl config show` lists it: secrets masked, with where its value comes from."""

    name: str
    value: str
    source: Literal["command line", "environment", "config file", "default"]
    description: str


def setting_name(given: str) -> str:
    """A setting's name from what a user typed (`container-disk-gb`, `HCTL_GPU`); ConfigError if none."""
    name = given.strip().lower().replace("-", "_")
    name = name.removeprefix("hctl_")
    if name in Settings.model_fields:
        return name
    raise ConfigError(
        f"There is no setting called {given!r}.",
        did_you_mean(name) + "`hctl config show` lists them all.",
    )


def is_secret(name: str) -> bool:
    return Settings.model_fields[name].annotation in (SecretStr, SecretStr | None)


def mask(secret: str) -> str:
    """Enough of a secret to recognise it, never enough to use it."""
    return "****" + secret[-4:] if len(secret) >= 12 else "****"


def read_config_file() -> dict[str, Any]:
    path = config_file()
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"Cannot read the config file {path}: {error}",
            CONFIG_FILE_UNREADABLE_HINT,
        ) from None


def describe_settings(settings: Settings) -> list[SettingView]:
    """Every setting with its value in force (secrets masked) and where that value comes from."""
    in_file = read_config_file()
    views = []
    for name, field_info in Settings.model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            shown = mask(value.get_secret_value())
        else:
            shown = "" if value is None else str(value)
        environment_names = [f"HCTL_{name.upper()}"]
        if isinstance(field_info.validation_alias, AliasChoices):
            environment_names += [str(choice) for choice in field_info.validation_alias.choices]
        if any(os.environ.get(variable) for variable in environment_names if variable.isupper()):
            source = "environment"
        elif name in in_file:
            source = "config file"
        elif name in settings.model_fields_set:
            source = "command line"
        else:
            source = "default"
        views.append(
            SettingView(
                name=name, value=shown, source=source, description=field_info.description or ""
            )
        )
    return views


def set_config_value(name: str, value: str | None) -> Path:
    """Check `value` for the setting `name` and write it to the config file (owner-only).

    `value` None (or "") removes the setting from the file, so its default applies again.
    Returns the file's path.
    """
    stored = read_config_file()
    if not value and name in stored and name not in Settings.model_fields:
        stored.pop(name)  # a key hctl does not know (a typo, an old setting) can be removed
        _write_config_file(stored)
        return config_file()
    name = setting_name(name)
    if value is None or value == "":
        stored.pop(name, None)
    else:
        stored[name] = _checked_value(name, value)
    _write_config_file(stored)
    return config_file()


def _checked_value(name: str, value: str) -> Any:
    field_info = Settings.model_fields[name]
    if is_secret(name) and (not value.strip() or any(char.isspace() for char in value)):
        raise ConfigError(
            f"That value for {name} has spaces or line breaks in it; a key has none.",
            "Copy the key again from https://www.runpod.io/console/user/settings.",
        )
    try:
        checked = TypeAdapter(_field_type(name)).validate_python(value)
    except ValidationError as error:
        problem = readable_message(error.errors()[0]["msg"])
        shown = "That value" if is_secret(name) else repr(value)
        raise ConfigError(
            f"{shown} is not a valid {name}: {problem}.",
            f"{name}: {field_info.description or 'see `hctl config show`'}",
        ) from None
    if isinstance(checked, SecretStr):
        return checked.get_secret_value()
    if isinstance(checked, Path):
        return value  # as typed: `~` stays `~`, for the machine the file is read on
    return checked


def _field_type(name: str) -> Any:
    """The setting's type with its constraints (e.g. `ge=10`), to check one value on its own."""
    field_info = Settings.model_fields[name]
    if not field_info.metadata:
        return field_info.annotation
    return Annotated[(field_info.annotation, *field_info.metadata)]  # type: ignore[return-value]


def _write_config_file(values: dict[str, Any]) -> None:
    path = config_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(path.name + ".tmp")
        # Owner-only from the first byte: the file may hold the API key.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(tomli_w.dumps(values))
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except OSError as error:
        raise ConfigError(
            f"Cannot write the config file {path}: {error.strerror or error}.",
            "Set HCTL_HOME to a folder you can write to.",
        ) from None
