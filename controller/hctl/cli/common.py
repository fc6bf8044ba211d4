"""What every command shares: the consoles, error rendering (see `hctl.output`), confirmation."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from hctl.errors import Aborted
from hctl.output import console, error_console

__all__ = ["asking", "confirm", "console", "error_console"]


@contextmanager
def asking() -> Iterator[None]:
    """Around a question: Ctrl-C (or the end of input) there is a Ctrl-C as anywhere else
    ("interrupted", exit 130), not click's "Aborted!" with exit 1."""
    try:
        yield
    except typer.Abort:
        raise KeyboardInterrupt from None


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
    with asking():
        answer = typer.confirm(question, default=False)
    if not answer:
        raise Aborted("Cancelled.", "Nothing was changed.")
