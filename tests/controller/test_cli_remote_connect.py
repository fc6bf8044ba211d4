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
    # Typed in turn, each once the shell shows a prompt again: a long command, Ctrl-C (which
    # must stop that command on the remote side, not hctl), then a command and an exit code.
    steps = [b"sleep 30\r", b"\x03", b"echo hello-$((40+2)); exit 5\r"]
    prompts_needed = [1, 0, 2]  # Ctrl-C goes while sleep runs; the last waits for a new prompt
    started = time.monotonic()
    deadline = started + 30
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
            prompts = seen.count(b"# ")
            if steps and prompts >= prompts_needed[0]:
                if steps[0] == b"\x03":
                    time.sleep(0.5)  # let sleep start
                os.write(controller, steps.pop(0))
                prompts_needed.pop(0)
            if process.poll() is not None and not readable:
                break
        status = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    assert time.monotonic() - started < 25  # the remote sleep was interrupted
    assert b"hello-42" in seen, seen[-500:]
    assert status == 5
