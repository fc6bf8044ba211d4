"""The remote boundary: run a command on a machine, stream its output, move files.

Implementations: SSH through RunPod's proxy (needs a PTY; no SFTP), direct SSH over a public TCP
port (exec channels and SFTP), and a local subprocess. Every method raises
`hctl.errors.RemoteError` subclasses, never paramiko's or the OS's own exceptions.

Contract details every implementation keeps:

- A command's stdin is empty (`/dev/null`): nothing the controller sends can be swallowed by it.
- `on_output` receives decoded text as it arrives. If the callback raises (Ctrl-C, or a viewer
  that has seen enough samples), the command is interrupted and the exception propagates; the
  remote stays usable for the next command.
- `timeout` is in seconds for the whole command; past it the command is interrupted and
  `CommandTimeoutError` is raised.
- A connection lost during a command raises `ConnectionLostError`; the next call reconnects.
- `put` / `get` create missing parent folders, write to a temporary name, verify the sha256
  checksum and only then move the file into place (`TransferError` otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel


class CommandResult(BaseModel):
    exit_code: int
    output: str  # stdout (and stderr, where a PTY merges them)
    stderr: str = ""


OutputCallback = Callable[[str], None]
RemoteKind = Literal["proxy", "direct", "local"]


class Remote(Protocol):
    """A machine commands can be run on."""

    description: str  # for messages, e.g. "pod abc123 (proxy)" or "ssh://root@host:22"
    kind: RemoteKind  # which path: "proxy" (PTY shell), "direct" (exec + SFTP) or "local"

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult:
        """Run a shell command; stream its output to `on_output` as it arrives.

        Where stderr is separate (direct, local) it streams to `on_stderr`, or, when that is
        None, only lands in `CommandResult.stderr`. Through a PTY it is part of the output.
        """
        ...

    def put(self, local_path: Path, remote_path: str) -> None:
        """Upload a file, verified by checksum."""
        ...

    def get(self, remote_path: str, local_path: Path) -> None:
        """Download a file, verified by checksum."""
        ...

    def close(self) -> None: ...
