"""The remote boundary: run a command on a machine, stream its output, move files.

Implementations: SSH through RunPod's proxy (needs a PTY; no SFTP), direct SSH over a public TCP
port (exec channels and SFTP), and a local subprocess. Every method raises
`hctl.errors.RemoteError` subclasses, never paramiko's or the OS's own exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel


class CommandResult(BaseModel):
    exit_code: int
    output: str  # stdout (and stderr, where a PTY merges them)
    stderr: str = ""


OutputCallback = Callable[[str], None]


class Remote(Protocol):
    """A machine commands can be run on."""

    description: str  # for messages, e.g. "pod abc123 (proxy)" or "ssh://root@host:22"

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> CommandResult:
        """Run a shell command; stream its output to `on_output` as it arrives."""
        ...

    def put(self, local_path: Path, remote_path: str) -> None:
        """Upload a file, verified by checksum."""
        ...

    def get(self, remote_path: str, local_path: Path) -> None:
        """Download a file, verified by checksum."""
        ...

    def close(self) -> None: ...
