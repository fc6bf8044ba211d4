"""The `hctl-worker` command line (placeholder until the worker is written)."""

from __future__ import annotations

import typer

app = typer.Typer(name="hctl-worker", no_args_is_help=True)


@app.command()
def version() -> None:
    """Show the version."""
    from hctl_worker import __version__

    typer.echo(__version__)


def main() -> None:
    app()
