"""What every command shares: the consoles, error rendering, confirmation."""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from hctl.errors import Aborted, HctlError

console = Console(highlight=False)
error_console = Console(stderr=True, highlight=False)


def render_error(error: HctlError) -> None:
    """One line of what happened and one of what to do next; never a traceback."""
    error_console.print(f"[bold red]error:[/] {error.message}", soft_wrap=True)
    if error.hint:
        error_console.print(f"[yellow]hint:[/] {error.hint}", soft_wrap=True)


class HctlGroup(TyperGroup):
    """The root command group: turns every `HctlError` into a rendered message and an exit code.

    Doing it here, rather than in `main()`, means `typer.testing.CliRunner` sees exactly what a
    user sees.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HctlError as error:
            render_error(error)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            error_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None


def confirm(question: str, *, assume_yes: bool) -> None:
    """Ask before something that costs money or destroys data; `--yes` answers for the user.

    Without a terminal to ask on (a script, CI), the answer is no: hctl never spends money
    unattended unless told to with `--yes`.
    """
    if assume_yes:
        return
    if not sys.stdin.isatty():
        raise Aborted(
            f"{question} — no terminal to ask on.", "Add --yes to confirm without being asked."
        )
    if not typer.confirm(question, default=False):
        raise Aborted("Cancelled.", "Nothing was changed.")
