"""How both command lines, `hctl` and `hctl-worker`, parse and fail: the typer classes they share.

Errors render as one `error:` line and one `hint:` line on stderr; `HctlGroup` gives the same
shape to command-line mistakes (an unknown option, a value that is not a number), and
`HctlCommand` keeps help free of type tags on flags (`<bool>`) and names arguments in capitals.
Output never fails on a character its stream cannot encode (`HctlGroup.main`): Windows writes a
pipe or a file in its ANSI code page, which has no arrows, for one.

This lives on the worker's side, torch-free, because the worker never imports the controller;
`hctl.output` re-exports it with the rest of the controller's printing.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from hctl_worker.errors import HctlError

error_console = Console(stderr=True, highlight=False, soft_wrap=True)

# Typer ships its own copy of click; its usage error is the base of its public `BadParameter`.
UsageError: type[Exception] = typer.BadParameter.__base__  # type: ignore[assignment]


def render_error(error: HctlError) -> None:
    """One line of what happened and one of what to do next; never a traceback."""
    error_console.print(Text.assemble(("error:", "bold red"), " ", error.message))
    if error.hint:
        error_console.print(Text.assemble(("hint:", "yellow"), " ", error.hint))


def render_usage_error(error: Exception, program: str) -> None:
    """A command-line mistake in the same two lines as every other error."""
    context = getattr(error, "ctx", None)
    command = context.command_path if context is not None else program
    message = error.format_message() if hasattr(error, "format_message") else str(error)
    render_error(HctlError(message, f"Run `{command} --help` to see what it takes."))


def tolerant_streams() -> None:
    """Standard output and error print `?` for a character their encoding lacks (a `↓` in a
    table written to a cp1252 pipe) instead of failing with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", "strict") == "strict":
            # A closed or detached stream has nothing to print to.
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="replace")


def _untagged(params: list[Any]) -> list[Any]:
    """No `<bool>` after a flag in help: an empty metavar hides it (flags take no value)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class HctlCommand(TyperCommand):
    """A command whose help names its arguments in capitals (`MODEL`, `[POD]`) and tags no flag."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _untagged(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = (param.metavar or param.name or "").upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


class HctlGroup(TyperGroup):
    """A command group that renders every `HctlError` and usage error as `error:` and `hint:`.

    Doing it in the group, rather than in `main()`, means `typer.testing.CliRunner` sees exactly
    what a user sees. Parsing the root's own options happens in `make_context`; everything below
    it (the subcommand's name and options, the command itself) in `invoke`.
    """

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _untagged(super().get_params(ctx))

    def main(self, *args: Any, **kwargs: Any) -> Any:
        tolerant_streams()
        return super().main(*args, **kwargs)

    def make_context(self, info_name: str | None, args: list[str], **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, **extra)
        except UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":
                raise  # a bare command name: its help, as usual
            render_usage_error(error, info_name or "hctl")
            raise typer.Exit(2) from None

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HctlError as error:
            render_error(error)
            raise typer.Exit(error.exit_code) from None
        except UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":
                raise
            render_usage_error(error, ctx.command_path)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error_console.print(Text("interrupted", style="yellow"))
            raise typer.Exit(130) from None
