"""The `hctl` command line. Commands are thin: parse, call one function below the CLI, render.

Each area registers its commands from its own module (`pods`, `config`, `remote`, `runs`, `jobs`),
so the command list is read here in one place.
"""

from __future__ import annotations

import typer

from hctl import __version__
from hctl.cli import config as config_commands
from hctl.cli import jobs as job_commands
from hctl.cli import pods as pod_commands
from hctl.cli import remote as remote_commands
from hctl.cli import runs as run_commands
from hctl.output import HctlGroup

app = typer.Typer(
    name="hctl",
    cls=HctlGroup,
    help="Rent a GPU on RunPod, abliterate a model there, watch it live, stop paying when done.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"hctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """Rent a GPU on RunPod, abliterate a model there, watch it live, stop paying when done."""


pod_commands.register(app)
config_commands.register(app)
remote_commands.register(app)
run_commands.register(app)
job_commands.register(app)


def main() -> None:
    app()
