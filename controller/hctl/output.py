"""How hctl prints: the two consoles, errors and usage errors, tables, notes and JSON.

Ids and paths are copied from hctl's output into other commands, so they are never wrapped,
folded or cut, wherever the output goes:

- On a terminal a table is drawn with rich, without a frame; its id and path columns
  (`Column(whole=True)`) keep their full width and the other columns fold. When even that does
  not fit the terminal, the table is printed as plain aligned lines instead.
- Piped or redirected, a table is a header line and one tab-separated line per row (like `gh`),
  ready for `cut -f`, `grep` and `sort`; its title and a listing's closing remark go to stderr
  then, so the rows are all stdout holds.
- Every listing and show command also has `--json` (`print_json`): the same data, whole.

Plain text goes through consoles that never wrap (`soft_wrap=True`): a long path stays on one
line and the terminal, not hctl, decides where to break it. Messages are never read as rich
markup, so a `[bracketed]` word in a path, a host key name or a hint survives.

Errors render as one `error:` line and one `hint:` line on stderr; `HctlGroup` gives the same
shape to command-line mistakes (an unknown option, a value that is not a number), and
`HctlCommand` keeps help free of type tags on flags (`<bool>`), for `hctl` and `hctl-worker` alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from hctl.errors import HctlError

console = Console(highlight=False, soft_wrap=True)
error_console = Console(stderr=True, highlight=False, soft_wrap=True)

# Typer ships its own copy of click; its usage error is the base of its public `BadParameter`.
UsageError: type[Exception] = typer.BadParameter.__base__  # type: ignore[assignment]
COLUMN_GAP = 3  # the frameless table's space between columns
FOLDED_MINIMUM = 6  # the narrowest a folding column gets before the table goes plain


# --- errors ---------------------------------------------------------------------------------


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


# --- tables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a table. `whole`: an id or a path, never wrapped or cut."""

    name: str
    whole: bool = False
    justify: Literal["left", "right"] = "left"
    style: str | None = None


Cell = str | Text


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


def _lines(cell: Cell) -> list[str]:
    return _plain(cell).splitlines() or [""]


def plain_lines(columns: Sequence[Column], rows: Sequence[Sequence[Cell]]) -> list[str]:
    """The table as tab-separated lines, header first; a cell's own lines are joined by "; "."""
    lines = ["\t".join(column.name for column in columns)]
    for row in rows:
        cells = ("; ".join(_lines(cell)).replace("\t", " ") for cell in row)
        lines.append("\t".join(cells))
    return lines


def aligned_lines(columns: Sequence[Column], rows: Sequence[Sequence[Cell]]) -> list[str]:
    """The table as plain lines with its columns aligned by spaces (nothing wraps)."""
    table = [[column.name for column in columns]] + [
        ["; ".join(_lines(cell)) for cell in row] for row in rows
    ]
    widths = [max(len(row[index]) for row in table) for index in range(len(columns))]
    lines = []
    for row in table:
        cells = [
            cell.rjust(width) if column.justify == "right" else cell.ljust(width)
            for cell, width, column in zip(row, widths, columns, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _fits(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int) -> bool:
    needed = COLUMN_GAP * (len(columns) - 1)
    for index, column in enumerate(columns):
        longest = max(
            [len(column.name)] + [len(line) for row in rows for line in _lines(row[index])]
        )
        needed += longest if column.whole else min(longest, max(len(column.name), FOLDED_MINIMUM))
    return needed <= width


def _write_lines(output: Console, lines: list[str]) -> None:
    """Lines exactly as given (rich would expand the tabs)."""
    output.file.write("".join(line + "\n" for line in lines))
    output.file.flush()


def print_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
    *,
    title: str | None = None,
    output: Console | None = None,
) -> None:
    """A table on a terminal, plain lines elsewhere (see the module docstring)."""
    output = output or console
    if not output.is_terminal:
        if title:
            print_line(title, output=error_console)  # the rows are all stdout holds
        _write_lines(output, plain_lines(columns, rows))
        return
    if title:
        output.print(Text(title, style="bold"))
    if not _fits(columns, rows, output.width):
        _write_lines(output, aligned_lines(columns, rows))
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for index, column in enumerate(columns):
        longest = max(
            [len(column.name)] + [len(line) for row in rows for line in _lines(row[index])]
        )
        table.add_column(
            column.name,
            justify=column.justify,
            style=column.style,
            no_wrap=column.whole,
            min_width=longest if column.whole else min(longest, len(column.name)),
            overflow="fold",
        )
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in row))
    output.print(table)


# --- notes and JSON -----------------------------------------------------------------------------


def print_line(text: str, *, style: str | None = None, output: Console | None = None) -> None:
    """One line of plain text (never markup, never wrapped)."""
    (output or console).print(Text(text, style=style or ""))


def print_remark(text: str) -> None:
    """A listing's closing remark: on stdout at a terminal, on stderr when the rows are piped."""
    print_line(text, output=console if console.is_terminal else error_console)


def print_json(data: Any) -> None:
    """JSON on stdout, whole and uncoloured, for scripts (`--json`)."""
    typer.echo(json.dumps(data, indent=2, default=str))


JSON_HELP = "Print JSON instead of text (for scripts)."


def json_option() -> Any:
    """The `--json` option every listing and show command has."""
    return typer.Option(False, "--json", help=JSON_HELP)
