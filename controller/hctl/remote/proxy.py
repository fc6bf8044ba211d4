"""The proxy path: commands typed into a PTY shell (RunPod's `ssh.runpod.io`, or `--pty`).

RunPod's SSH proxy only accepts sessions with a pseudo-terminal and offers neither exec channels
nor SFTP. `ProxyRemote` opens one interactive shell per connection and frames every command in it
(see `hctl.remote.framing`): output streams back exactly, exit codes come back, files travel as
base64 lines with a sha256 check at the end. Uploads stream without waiting for replies (the SSH
window is the only flow control), so they run at the speed of the link and of the terminal.

Interrupting a command (timeout, or an `on_output` callback raising) sends Ctrl-C, then
re-synchronises the shell with an empty command; if the shell does not answer, it is closed and
the next command opens a fresh one.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from hctl.errors import CommandTimeoutError, ConnectError, RemoteError, TransferError
from hctl.remote import framing
from hctl.remote.base import CommandResult, OutputCallback, RemoteKind
from hctl.remote.ssh import CONTAINER_NOT_FOUND, PTY_REFUSAL, SshConnection, lost_error

DEFAULT_ENVIRONMENT_FILE = "/etc/rp_environment"
READ_SIZE = 1 << 18
SETUP_TIMEOUT_S = 30.0
RESYNC_TIMEOUT_S = 5.0
UPLOAD_BLOCK_BYTES = framing.UPLOAD_LINE_BYTES * 128  # 384 KB of file per read and send

ByteSink = Callable[[bytes], None]


class _Shell:
    """One interactive shell on one channel, ready for framed commands."""

    def __init__(self, channel: paramiko.Channel, description: str) -> None:
        self.channel = channel
        self.description = description

    def send(self, text: str | bytes) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        try:
            self.channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as error:
            raise lost_error(self.description, error) from None

    def read_frame(
        self,
        reader: framing.FrameReader,
        sink: ByteSink,
        deadline: float | None,
        *,
        until_started: bool = False,
    ) -> None:
        """Feed the channel's bytes to `reader` until the frame (or only its start) is complete."""
        while not (reader.done or (until_started and reader.started)):
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            if deadline is not None and wait <= 0:
                raise TimeoutError
            self.channel.settimeout(wait)
            try:
                data = self.channel.recv(READ_SIZE)
            except TimeoutError:
                continue
            except (OSError, EOFError, paramiko.SSHException) as error:
                raise lost_error(self.description, error) from None
            if not data:
                raise self._closed(reader)
            output = reader.feed(data)
            if output:
                sink(output)

    def _closed(self, reader: framing.FrameReader) -> RemoteError:
        said = reader.noise_text()
        if PTY_REFUSAL in said:
            return ConnectError(
                f"{self.description} refused the session: Your SSH client doesn't support PTY.",
                "This is RunPod's proxy: hctl should have used a PTY; report this as a bug.",
            )
        if CONTAINER_NOT_FOUND in said.lower():
            return ConnectError(
                f"RunPod's proxy says: container not found ({self.description}).",
                "The pod may still be starting (wait 30-60 s), its container may have crashed "
                "(check the RunPod console), or the proxy user (pod host id) is wrong.",
            )
        return lost_error(self.description)

    def close(self) -> None:
        # Closing a dead channel may fail; it is gone either way.
        with contextlib.suppress(Exception):
            self.channel.close()


class ProxyRemote:
    """A machine reached through an interactive shell on a PTY (see the module docstring)."""

    kind: RemoteKind = "proxy"

    def __init__(
        self,
        connection: SshConnection,
        *,
        description: str | None = None,
        environment_file: str | None = DEFAULT_ENVIRONMENT_FILE,
    ) -> None:
        self.connection = connection
        self.description = description or f"{connection.address} (PTY)"
        self.environment_file = environment_file
        self._shell: _Shell | None = None
        # One shell carries one command at a time: callers on several threads take turns.
        self._lock = threading.RLock()

    # The shell -----------------------------------------------------------------------------

    def _ready_shell(self) -> _Shell:
        if self._shell is not None and not self._shell.channel.closed:
            return self._shell
        self._shell = None
        channel = self.connection.open_session()
        try:
            channel.get_pty(term="dumb", width=250, height=50)
            channel.invoke_shell()
        except (paramiko.SSHException, EOFError, OSError) as error:
            self.connection.drop()
            raise lost_error(self.description, error) from None
        shell = _Shell(channel, self.description)
        tag = framing.new_tag()
        shell.send(framing.session_setup(tag, self.environment_file))
        reader = framing.FrameReader(tag)
        try:
            shell.read_frame(reader, lambda _data: None, time.monotonic() + SETUP_TIMEOUT_S)
        except TimeoutError:
            shell.close()
            raise ConnectError(
                f"The shell on {self.description} did not answer within {SETUP_TIMEOUT_S:.0f} s.",
                "Its login shell may not be bash, or it waits for input; try `hctl connect`.",
            ) from None
        except RemoteError:
            shell.close()
            self.connection.drop()
            raise
        self._shell = shell
        return shell

    def _discard_shell(self) -> None:
        if self._shell is not None:
            self._shell.close()
        self._shell = None

    def _interrupt(self, shell: _Shell) -> None:
        """Stop the running command and bring the shell back to a known state."""
        try:
            shell.send(b"\x03")
            tag = framing.new_tag()
            shell.send(framing.run_invocation(tag, "true"))
            shell.read_frame(
                framing.FrameReader(tag), lambda _data: None, time.monotonic() + RESYNC_TIMEOUT_S
            )
        except (TimeoutError, RemoteError):
            self._discard_shell()

    def _execute(self, command: str, sink: ByteSink, timeout: float | None) -> int:
        shell = self._ready_shell()
        tag = framing.new_tag()
        reader = framing.FrameReader(tag)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            shell.send(framing.run_invocation(tag, command))
            shell.read_frame(reader, sink, deadline)
        except TimeoutError:
            self._interrupt(shell)
            raise CommandTimeoutError(
                f"The command did not finish within {timeout:g} s on {self.description}; "
                "it was interrupted."
            ) from None
        except RemoteError:
            self._discard_shell()
            self.connection.drop()
            raise
        except BaseException:
            # The callback raised (Ctrl-C, enough samples): stop the command, keep the shell.
            self._interrupt(shell)
            raise
        assert reader.status is not None
        return reader.status

    # The Remote protocol ---------------------------------------------------------------------

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult:
        with self._lock:
            return self._run(command, timeout=timeout, on_output=on_output)

    def _run(
        self, command: str, *, timeout: float | None, on_output: OutputCallback | None
    ) -> CommandResult:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        parts: list[str] = []

        def sink(data: bytes) -> None:
            text = decoder.decode(data)
            if text:
                parts.append(text)
                if on_output is not None:
                    on_output(text)

        status = self._execute(command, sink, timeout)
        rest = decoder.decode(b"", final=True)
        if rest:
            parts.append(rest)
            if on_output is not None:
                on_output(rest)
        return CommandResult(exit_code=status, output="".join(parts))

    def put(self, local_path: Path, remote_path: str) -> None:
        with self._lock:
            self._put(local_path, remote_path)

    def _put(self, local_path: Path, remote_path: str) -> None:
        try:
            size = local_path.stat().st_size
            digest = _sha256_file(local_path)
        except OSError as error:
            raise TransferError(f"Cannot read {local_path}: {error.strerror or error}") from None
        shell = self._ready_shell()
        tag = framing.new_tag()
        reader = framing.FrameReader(tag)
        said = bytearray()
        try:
            shell.send(framing.put_invocation(tag, remote_path, framing.encoded_size(size), digest))
            shell.read_frame(
                reader, said.extend, time.monotonic() + SETUP_TIMEOUT_S, until_started=True
            )
            with local_path.open("rb") as handle:
                while block := handle.read(UPLOAD_BLOCK_BYTES):
                    shell.send(framing.encode_lines(block))
            shell.read_frame(reader, said.extend, None)
        except TimeoutError:
            self._discard_shell()
            raise TransferError(
                f"{self.description} did not start receiving {remote_path}."
            ) from None
        except BaseException as error:
            # Whatever stopped the upload (Ctrl-C included), the shell is mid-transfer and
            # would read the next command as data: close it; the next call opens a fresh one.
            self._discard_shell()
            if not isinstance(error, RemoteError):
                raise
            self.connection.drop()
            raise TransferError(
                f"Uploading {local_path.name} to {remote_path} failed: {error.message}",
                "Run the command again: the upload starts over and nothing half-written is kept.",
            ) from None
        if reader.status != 0:
            detail = framing.strip_ansi(said.decode("utf-8", "replace")).strip()
            if reader.status == 3:
                raise TransferError(
                    f"{remote_path} arrived with a different sha256 ({detail}); it was discarded.",
                    "Run the command again; if it keeps failing, the terminal path mangles data.",
                )
            raise TransferError(
                f"Cannot write {remote_path} on {self.description}: {detail}",
                "Check the folder exists and is writable, and the free disk (`hctl status`).",
            )

    def get(self, remote_path: str, local_path: Path) -> None:
        with self._lock:
            self._get(remote_path, local_path)

    def _get(self, remote_path: str, local_path: Path) -> None:
        quoted = _shell_quote(remote_path)
        command = (
            f"[ -f {quoted} ] && [ -r {quoted} ] || {{ echo 'no readable file there'; exit 2; }}; "
            f"sha256sum -- {quoted} | cut -c1-64 && base64 -w 0 -- {quoted}"
        )
        local_path.parent.mkdir(parents=True, exist_ok=True)
        partial = local_path.with_name(local_path.name + ".hctl-part")
        decoder = _Base64Sink()
        try:
            with partial.open("wb") as handle:
                decoder.handle = handle
                status = self._execute(command, decoder.feed, None)
                decoder.finish()
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise TransferError(f"Cannot write {local_path}: {error.strerror or error}") from None
        except RemoteError as error:
            partial.unlink(missing_ok=True)
            if isinstance(error, TransferError):
                raise
            raise TransferError(f"Downloading {remote_path} failed: {error.message}") from None
        if status != 0:
            partial.unlink(missing_ok=True)
            raise TransferError(
                f"Cannot read {remote_path} on {self.description}: "
                f"{decoder.header.decode('utf-8', 'replace').strip()}",
                "Check the path (`hctl exec TARGET -- ls -l PATH`).",
            )
        if decoder.digest.hexdigest() != decoder.expected:
            partial.unlink(missing_ok=True)
            raise TransferError(
                f"{remote_path} arrived with a different sha256; the copy was discarded.",
                "Run the command again.",
            )
        partial.replace(local_path)

    def close(self) -> None:
        with self._lock:
            self._discard_shell()
            self.connection.close()


class _Base64Sink:
    """Decodes `sha256\\nBASE64` as it streams in, writing the file and hashing it."""

    def __init__(self) -> None:
        self.header = bytearray()
        self.expected = ""
        self.digest = hashlib.sha256()
        self.handle = None
        self._pending = bytearray()
        self._in_body = False

    def feed(self, data: bytes) -> None:
        if not self._in_body:
            self.header += data
            newline = self.header.find(b"\n")
            if newline < 0:
                return
            self.expected = self.header[:newline].decode("ascii", "replace").strip()
            data = bytes(self.header[newline + 1 :])
            del self.header[newline + 1 :]
            self._in_body = True
        self._pending += data.replace(b"\n", b"").replace(b"\r", b"")
        usable = len(self._pending) - len(self._pending) % 4
        if usable:
            self._write(bytes(self._pending[:usable]))
            del self._pending[:usable]

    def _write(self, encoded: bytes) -> None:
        try:
            chunk = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise TransferError(
                "The download arrived garbled (not base64); the copy was discarded.",
                "Run the command again.",
            ) from None
        self.digest.update(chunk)
        assert self.handle is not None
        self.handle.write(chunk)

    def finish(self) -> None:
        if self._pending:
            self._write(bytes(self._pending))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
