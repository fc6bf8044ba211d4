"""`hctl config show` and `hctl config set`: the settings in force, and the config file."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from hctl.cli.common import console
from hctl.errors import ConfigError
from hctl.settings import (
    config_file,
    describe_settings,
    is_secret,
    load_settings,
    set_config_value,
    setting_name,
)

config_app = typer.Typer(
    name="config",
    help="Show the settings in force, or change one in the config file.",
    no_args_is_help=True,
)


@config_app.command("show")
def show(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show every setting, where its value comes from, and the config file (secrets masked).

    Precedence: command line > HCTL_* environment > config file > default.
    """
    views = describe_settings(load_settings())
    if as_json:
        typer.echo(json.dumps([view.model_dump() for view in views], indent=2))
        return
    table = Table(title="Settings (command line > HCTL_* environment > config file > default)")
    for column in ("setting", "value", "from", "meaning"):
        table.add_column(column, overflow="fold")
    for view in views:
        table.add_row(view.name, view.value, view.source, view.description)
    console.print(table)
    console.print(f"Config file: {config_file()}", soft_wrap=True)


@config_app.command("set")
def set_value(
    key: str = typer.Argument(..., help="Setting name, e.g. gpu, volume_gb, runpod_api_key."),
    value: str | None = typer.Argument(
        None, help="New value; left out for a secret, hctl asks for it without echoing it."
    ),
) -> None:
    """Write one setting to the config file (readable only by you); "" removes it.

    For the API key give no value: hctl asks for it on a hidden prompt, so it never lands in your
    shell history.
    """
    name = setting_name(key)
    given = value
    if value is None:
        if not is_secret(name):
            raise ConfigError(
                f"No value given for {name}.",
                f'Give one: hctl config set {name} VALUE ("" removes it from the file).',
            )
        value = typer.prompt(f"{name} (hidden)", hide_input=True, default="", show_default=False)
        if not value:
            raise ConfigError(
                f"No value given for {name}; nothing was changed.",
                f"Run `hctl config set {name}` again and paste the value at the prompt.",
            )
    typed_secret = is_secret(name) and given is not None
    path = set_config_value(name, value)
    if typed_secret:
        console.print(
            "Tip: leave the value out next time; hctl then asks for it hidden, so it stays out "
            "of your shell history."
        )
    shown = "(hidden)" if is_secret(name) else repr(value)
    console.print(f"{name} = {shown} written to {path}" if value else f"{name} removed from {path}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `hctl` application."""
    app.add_typer(config_app, name="config")
