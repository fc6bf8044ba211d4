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
`HctlCommand` keeps help free of type tags on flags (`<bool>`), for `hctl` and `hctl-worker` alike
(both live in `hctl_worker.command_line`, since the worker never imports the controller).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Errors and usage errors render the same in both command lines (re-exported from there).
from hctl_worker.command_line import HctlCommand as HctlCommand
from hctl_worker.command_line import HctlGroup as HctlGroup
from hctl_worker.command_line import UsageError as UsageError
from hctl_worker.command_line import error_console
from hctl_worker.command_line import render_error as render_error
from hctl_worker.command_line import render_usage_error as render_usage_error

console = Console(highlight=False, soft_wrap=True)
COLUMN_GAP = 3  # the frameless table's space between columns
FOLDED_MINIMUM = 6  # the narrowest a folding column gets before the table goes plain


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


def write_lines(output: Console, lines: list[str]) -> None:
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
        write_lines(output, plain_lines(columns, rows))
        return
    if title:
        output.print(Text(title, style="bold"))
    if not _fits(columns, rows, output.width):
        write_lines(output, aligned_lines(columns, rows))
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


# --- streamed output ----------------------------------------------------------------------------

# The exit status of a command whose output was closed under it, as a shell reports one that a
# closed pipe (SIGPIPE) ended: 128 + 13.
OUTPUT_CLOSED_EXIT = 141


class OutputClosed(Exception):  # noqa: N818 - an event, not a failure: the reader went away
    """The program reading hctl's streamed output went away (`hctl exec ... | head -1`).

    Not an OSError on purpose: the remotes read an OSError from their callback as a lost
    connection, and anything else as the caller stopping the command (which they then end)."""


def stream_to(stream: IO[str]) -> Callable[[str], None]:
    """A callback that writes streamed text through at once; OutputClosed when the reader left."""

    def write(text: str) -> None:
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:
            raise OutputClosed from None

    return write


def silence_closed_output() -> None:
    """Point stdout at the null device, so the interpreter's last flush into the closed pipe
    prints no "Exception ignored" message on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file behind stdout (a test's capture)
        pass


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
