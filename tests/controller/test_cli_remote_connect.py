"""`hctl connect` in a real terminal (a pseudo-terminal here): keys in, output out, exit code."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from tests.standins.sshd import SshdServer


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX terminal test")
@pytest.mark.parametrize("server_name", ["sshd_pod", "sshd_proxy"])
def test_connect_gives_an_interactive_shell(
    server_name: str, request: pytest.FixtureRequest
) -> None:
    server: SshdServer = request.getfixturevalue(server_name)
    controller, terminal = os.openpty()
    environment = {
        **os.environ,
        "HCTL_SSH_KEY": str(server.client_key_path),
        "TERM": "xterm",
        "COLUMNS": "100",
    }
    process = subprocess.Popen(
        [sys.executable, "-c", "from hctl.cli import main; main()", "connect", server.address],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=environment,
        close_fds=True,
    )
    os.close(terminal)
    seen = b""
    interrupted_at = None
    sent = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([controller], [], [], 0.2)
            if readable:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
            if interrupted_at is None and (b"#" in seen or b"$" in seen):
                # Ctrl-C at the prompt must reach the remote shell, not kill hctl.
                os.write(controller, b"\x03")
                interrupted_at = time.monotonic()
            elif not sent and interrupted_at and time.monotonic() - interrupted_at > 0.5:
                # (bash drops what is typed while it handles the interrupt)
                os.write(controller, b"echo hello-$((40+2)); exit 5\r")
                sent = True
            if process.poll() is not None and not readable:
                break
        status = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    assert b"hello-42" in seen, seen[-500:]
    assert status == 5
