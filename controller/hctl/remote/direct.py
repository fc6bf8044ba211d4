"""The direct path: full SSH to a machine's own sshd (`root@<public ip>:<port>` on a pod).

Exec channels give separate stdout and stderr and the real exit status; files move over SFTP and
are verified with `sha256sum` on the machine. Each command runs after the pod's environment file
is sourced (`/etc/rp_environment` on RunPod), because a non-interactive SSH command does not read
it the way the pod's login shell does.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import posixpath
import secrets
import shlex
import time
from pathlib import Path

import paramiko

from hctl.errors import (
    CommandTimeoutError,
    ConnectError,
    ConnectionLostError,
    RemoteError,
    TransferError,
)
from hctl.remote.base import CommandResult, OutputCallback, RemoteKind
from hctl.remote.ssh import PTY_REFUSAL, SshConnection, environment_prefix, lost_error

DEFAULT_ENVIRONMENT_FILE = "/etc/rp_environment"
READ_SIZE = 1 << 16
COMMAND_ID_VARIABLE = "HCTL_COMMAND_ID"
POLL_S = 0.05


class _Stream:
    """Decodes one side (stdout or stderr) of a channel as it arrives."""

    def __init__(self, callback: OutputCallback | None) -> None:
        self.callback = callback
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.parts: list[str] = []

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final=final)
        if text:
            self.parts.append(text)
            if self.callback is not None:
                self.callback(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class DirectRemote:
    """A machine reached with exec channels and SFTP (see the module docstring)."""

    kind: RemoteKind = "direct"

    def __init__(
        self,
        connection: SshConnection,
        *,
        description: str | None = None,
        environment_file: str | None = DEFAULT_ENVIRONMENT_FILE,
    ) -> None:
        self.connection = connection
        self.description = description or str(connection.address)
        self.environment_file = environment_file
        self._sftp: paramiko.SFTPClient | None = None

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult:
        channel = self.connection.open_session()
        stdout, stderr = _Stream(on_output), _Stream(on_stderr)
        deadline = None if timeout is None else time.monotonic() + timeout
        # Every process of this command inherits this variable: that is how `_stop` finds them.
        command_id = secrets.token_hex(8)
        try:
            script = shlex.quote(environment_prefix(self.environment_file) + command)
            channel.exec_command(
                f'exec env {COMMAND_ID_VARIABLE}={command_id} "${{SHELL:-/bin/sh}}" -c {script}'
            )
            channel.shutdown_write()  # the command's stdin is empty, as on every path
            channel.settimeout(POLL_S)
            stdout_open = True
            while True:
                while channel.recv_stderr_ready():
                    stderr.feed(channel.recv_stderr(READ_SIZE))
                if stdout_open:
                    try:
                        data = channel.recv(READ_SIZE)
                    except TimeoutError:
                        data = None
                    if data:
                        stdout.feed(data)
                        continue
                    if data == b"":
                        stdout_open = False
                elif channel.exit_status_ready():
                    break
                else:
                    channel.status_event.wait(POLL_S)
                if not channel.exit_status_ready() and not self.connection.transport_alive():
                    raise lost_error(self.description)
                if deadline is not None and time.monotonic() > deadline:
                    self._stop(command_id)
                    raise CommandTimeoutError(
                        f"The command did not finish within {timeout:g} s on {self.description}; "
                        "it was interrupted."
                    )
            while channel.recv_stderr_ready():
                stderr.feed(channel.recv_stderr(READ_SIZE))
            exit_code = channel.recv_exit_status()
            if exit_code == -1:  # paramiko's value when the channel closed without a status
                raise lost_error(self.description)
        except ConnectionLostError:
            channel.close()
            self.connection.drop()
            raise
        except RemoteError:
            channel.close()
            raise
        except (OSError, EOFError, paramiko.SSHException) as error:
            channel.close()
            self.connection.drop()
            raise lost_error(self.description, error) from None
        except BaseException:
            # The callback raised (Ctrl-C, enough samples): stop the command, then re-raise.
            channel.close()
            self._stop(command_id)
            raise
        channel.close()
        stdout.feed(b"", final=True)
        stderr.feed(b"", final=True)
        if exit_code != 0 and PTY_REFUSAL in stdout.text + stderr.text:
            raise ConnectError(
                f"{self.description} refused a session without a terminal: "
                "Your SSH client doesn't support PTY.",
                "This is RunPod's proxy or something like it: add --pty (hctl then types the "
                "command into a shell on a pseudo-terminal).",
            )
        return CommandResult(exit_code=exit_code, output=stdout.text, stderr=stderr.text)

    def _stop(self, command_id: str) -> None:
        """Terminate every process of one command (closing an exec channel does not).

        A closed channel without a terminal sends the command no signal, and sshd refuses
        signal requests, so this finds the command's processes by the variable each of them
        inherited, on a second channel. Best effort: a failure here changes nothing.
        """
        finder = (
            "for p in /proc/[0-9]*; do "
            f'grep -qxz "{COMMAND_ID_VARIABLE}={command_id}" "$p/environ" 2>/dev/null '
            '&& kill -TERM "${p#/proc/}" 2>/dev/null; done; true'
        )
        with contextlib.suppress(Exception):
            channel = self.connection.open_session()
            channel.exec_command(finder)
            channel.status_event.wait(10)
            channel.close()

    def _sftp_client(self) -> paramiko.SFTPClient:
        transport = self.connection.transport()
        if self._sftp is not None and self._sftp.get_channel().get_transport() is transport:
            return self._sftp
        try:
            self._sftp = paramiko.SFTPClient.from_transport(transport)
        except (paramiko.SSHException, EOFError, OSError) as error:
            raise TransferError(
                f"{self.description} offers no SFTP: {error}",
                "Use the PTY path for files (`--pty`), or enable the sftp subsystem on the host.",
            ) from None
        assert self._sftp is not None
        return self._sftp

    def _remote_sha256(self, path: str) -> str:
        result = self.run(f"sha256sum -- {_quote(path)}", timeout=600)
        if result.exit_code != 0:
            raise TransferError(
                f"Cannot checksum {path} on {self.description}: {result.stderr.strip()}"
            )
        return result.output.split()[0]

    def put(self, local_path: Path, remote_path: str) -> None:
        try:
            digest = _sha256_file(local_path)
        except OSError as error:
            raise TransferError(f"Cannot read {local_path}: {error.strerror or error}") from None
        partial = remote_path + ".hctl-part"
        folder = posixpath.dirname(remote_path)
        if folder:
            self.run(f"mkdir -p -- {_quote(folder)}")
        try:
            sftp = self._sftp_client()
            sftp.put(str(local_path), partial, confirm=True)
        except (OSError, EOFError, paramiko.SSHException) as error:
            self._sftp = None
            raise TransferError(
                f"Uploading {local_path.name} to {remote_path} failed: {error}",
                "Check the free disk (`hctl status`) and run the command again.",
            ) from None
        if self._remote_sha256(partial) != digest:
            self.run(f"rm -f -- {_quote(partial)}")
            raise TransferError(
                f"{remote_path} arrived with a different sha256; it was discarded.",
                "Run the command again.",
            )
        result = self.run(f"mv -f -- {_quote(partial)} {_quote(remote_path)}")
        if result.exit_code != 0:
            raise TransferError(f"Cannot move {partial} into place: {result.stderr.strip()}")

    def get(self, remote_path: str, local_path: Path) -> None:
        expected = self._remote_sha256(remote_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        partial = local_path.with_name(local_path.name + ".hctl-part")
        try:
            self._sftp_client().get(remote_path, str(partial))
        except (OSError, EOFError, paramiko.SSHException) as error:
            self._sftp = None
            partial.unlink(missing_ok=True)
            raise TransferError(f"Downloading {remote_path} failed: {error}") from None
        if _sha256_file(partial) != expected:
            partial.unlink(missing_ok=True)
            raise TransferError(
                f"{remote_path} arrived with a different sha256; the copy was discarded.",
                "Run the command again.",
            )
        partial.replace(local_path)

    def close(self) -> None:
        if self._sftp is not None:
            # Closing over a dead transport may fail; it is gone either way.
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        self.connection.close()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
