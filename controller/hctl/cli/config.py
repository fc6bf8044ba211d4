"""`hctl config` (= `hctl config show`) and `hctl config set`: the settings in force, the file."""

from __future__ import annotations

import sys

import typer

from hctl.config_file import (
    describe_settings,
    is_secret,
    read_config_file,
    set_config_value,
    setting_name,
)
from hctl.errors import ConfigError, ProviderError, UnknownGpuError
from hctl.gpus import resolve_gpu
from hctl.output import (
    Column,
    HctlCommand,
    HctlGroup,
    json_option,
    print_json,
    print_line,
    print_remark,
    print_table,
)
from hctl.providers import make_provider
from hctl.settings import config_file, load_settings

config_app = typer.Typer(
    name="config",
    cls=HctlGroup,
    help="Show the settings in force (the default), or change one in the config file.",
    invoke_without_command=True,
)
SETTING_COLUMNS = [Column("setting", whole=True), Column("value", whole=True), Column("from"),
                   Column("meaning")]  # fmt: skip


@config_app.callback()
def _config(ctx: typer.Context, as_json: bool = json_option()) -> None:
    """Show the settings in force (as `hctl config show`), or change one with `hctl config set`."""
    if ctx.invoked_subcommand is None:
        show(as_json=as_json)


@config_app.command("show", cls=HctlCommand)
def show(as_json: bool = json_option()) -> None:
    """Show every setting, where its value comes from, and the config file (secrets masked).

    Precedence: command line > HCTL_* environment > config file > default.
    """
    views = describe_settings(load_settings())
    if as_json:
        print_json([view.model_dump() for view in views])
        return
    rows = [[view.name, view.value, view.source, view.description] for view in views]
    print_table(SETTING_COLUMNS, rows, title="Settings (command line > HCTL_* > file > default)")
    print_remark(f"Config file: {config_file()}")


def _secret_from_input(name: str) -> str:
    """A secret typed at a hidden prompt, or read from stdin when there is no terminal."""
    if sys.stdin.isatty():
        return typer.prompt(f"{name} (hidden)", hide_input=True, default="", show_default=False)
    return sys.stdin.readline().strip()


@config_app.command("set", cls=HctlCommand)
def set_value(
    key: str = typer.Argument(..., help="Setting name, e.g. gpu, volume_gb, runpod_api_key."),
    value: str | None = typer.Argument(
        None, help="New value; left out for a secret, hctl asks for it (or reads it from stdin)."
    ),
) -> None:
    """Write one setting to the config file (readable only by you); "" removes it.

    For the API key give no value: hctl asks for it on a hidden prompt, so it never lands in your
    shell history; in a script, pipe it in (`hctl config set runpod_api_key < key.txt`).
    """
    if value == "" and key in read_config_file():  # any key in the file, a mistyped one too
        print_line(f"{key} removed from {set_config_value(key, '')}")
        return
    name = setting_name(key)
    given = value
    if value is None:
        if not is_secret(name):
            raise ConfigError(
                f"No value given for {name}.",
                f'Give one: hctl config set {name} VALUE ("" removes it from the file).',
            )
        value = _secret_from_input(name)
        if not value:
            raise ConfigError(
                f"No value given for {name}; nothing was changed.",
                f"Run `hctl config set {name}` again and paste the value at the prompt "
                "(or pipe it in).",
            )
    typed_secret = is_secret(name) and bool(given)  # "" removes it: nothing to keep secret
    remark = None
    if name == "gpu" and value:
        value, remark = _gpu_type(value)
    path = set_config_value(name, value)
    if typed_secret:
        print_line(
            "Tip: leave the value out next time; hctl then asks for it hidden, so it stays out "
            "of your shell history."
        )
    shown = "(hidden)" if is_secret(name) else repr(value)
    print_line(f"{name} = {shown} written to {path}" if value else f"{name} removed from {path}")
    if remark:
        print_remark(remark)


def _gpu_type(value: str) -> tuple[str, str | None]:
    """The id of the GPU type `value` names in the provider's catalogue (an unknown or ambiguous
    name is refused with the candidates), and a remark. When the provider cannot be asked now
    (no API key yet, no network), `value` as given, said to be unchecked: it is checked when
    it is used."""
    settings = load_settings()
    try:
        catalogue = make_provider(settings.model_copy(update={"api_retries": 0})).gpu_types()
    except UnknownGpuError:
        raise
    except (ConfigError, ProviderError) as error:
        return value, (
            f"Not checked against the provider's GPU types ({error.message.rstrip('.')}); "
            "hctl checks it when a pod is made. `hctl gpus` lists them."
        )
    gpu = resolve_gpu(catalogue, value)
    if gpu.id == value:
        return value, None
    return gpu.id, f"{value!r} is the GPU type {gpu.id!r} ({gpu.display_name})."


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `hctl` application."""
    app.add_typer(config_app, name="config")
