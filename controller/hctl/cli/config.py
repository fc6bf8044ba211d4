"""Commands of this area (placeholder until they are written)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `hctl` application."""
