"""The local path: the same interface over a subprocess on this machine (`--on local`).

Commands run in the platform's shell (`/bin/sh -c` on POSIX, `cmd /c` on Windows) with an empty
stdin; stdout and stderr stream separately, as on the direct path. `put` and `get` are verified
copies.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from hctl.errors import CommandTimeoutError, TransferError
from hctl.remote.base import CommandResult, OutputCallback, RemoteKind


class LocalRemote:
    """This machine, behind the Remote interface."""

    kind: RemoteKind = "local"
    description = "this machine"

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult:
        process = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=sys.platform != "win32",
        )
        stderr_parts: list[str] = []
        stderr_reader = threading.Thread(
            target=_pump, args=(process.stderr, stderr_parts, on_stderr), daemon=True
        )
        stderr_reader.start()
        stdout_parts: list[str] = []
        watchdog = None
        timed_out = threading.Event()
        if timeout is not None:

            def expire() -> None:
                timed_out.set()
                _terminate(process)

            watchdog = threading.Timer(timeout, expire)
            watchdog.start()
        try:
            _pump(process.stdout, stdout_parts, on_output)
            exit_code = process.wait()
        except BaseException:
            _terminate(process)  # the callback raised (Ctrl-C, enough samples)
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            stderr_reader.join(timeout=5)
        if timed_out.is_set():
            raise CommandTimeoutError(
                f"The command did not finish within {timeout:g} s on this machine; it was stopped."
            )
        if exit_code < 0:  # killed by a signal: report it the way a shell would
            exit_code = 128 - exit_code
        return CommandResult(
            exit_code=exit_code, output="".join(stdout_parts), stderr="".join(stderr_parts)
        )

    def put(self, local_path: Path, remote_path: str) -> None:
        _verified_copy(local_path, Path(remote_path).expanduser())

    def get(self, remote_path: str, local_path: Path) -> None:
        _verified_copy(Path(remote_path).expanduser(), local_path)

    def close(self) -> None:
        pass


def _pump(stream, parts: list[str], callback: OutputCallback | None) -> None:  # noqa: ANN001
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while True:
        data = stream.read1(1 << 16)
        text = decoder.decode(data, final=not data)
        if text:
            parts.append(text)
            if callback is not None:
                callback(text)
        if not data:
            return


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    if sys.platform != "win32":
        import signal

        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 3
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _verified_copy(source: Path, destination: Path) -> None:
    partial = destination.with_name(destination.name + ".hctl-part")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        expected = _sha256(source)
        shutil.copyfile(source, partial)
        if _sha256(partial) != expected:
            partial.unlink(missing_ok=True)
            raise TransferError(f"The copy of {source} did not verify; it was discarded.")
        partial.replace(destination)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise TransferError(
            f"Cannot copy {source} to {destination}: {error.strerror or error}"
        ) from None
