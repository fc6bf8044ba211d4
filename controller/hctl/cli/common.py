"""What every command shares: the consoles, error rendering (see `hctl.output`), confirmation."""

from __future__ import annotations

import sys

import typer

from hctl.errors import Aborted
from hctl.output import console, error_console

__all__ = ["confirm", "console", "error_console"]


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
