"""`hctl connect`: an interactive shell on the machine, in this terminal.

The local terminal goes raw (every key, Ctrl-C included, goes to the remote shell), the remote
PTY follows the window's size (SIGWINCH on POSIX; polled on Windows, which has no such signal),
and the terminal is restored however the session ends. POSIX uses termios/tty/select; Windows
reads keys with msvcrt. The remote side is a PTY shell on a new channel of the remote's SSH
connection, so it works through RunPod's proxy and over direct SSH alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import paramiko

from hctl.errors import ConnectError
from hctl.remote.base import Remote
from hctl.remote.ssh import lost_error

READ_SIZE = 1 << 15


def _terminal_size() -> tuple[int, int]:
    size = shutil.get_terminal_size((80, 24))
    return size.columns, size.lines


def open_terminal(remote: Remote) -> paramiko.Channel:
    """A new PTY shell channel on `remote`'s SSH connection."""
    connection = getattr(remote, "connection", None)
    if connection is None:
        raise ConnectError(f"{remote.description} has no SSH connection to open a terminal on.")
    channel = connection.open_session()
    columns, lines = _terminal_size()
    try:
        channel.get_pty(term=os.environ.get("TERM", "xterm-256color"), width=columns, height=lines)
        channel.invoke_shell()
    except (paramiko.SSHException, EOFError, OSError) as error:
        raise lost_error(remote.description, error) from None
    return channel


def interactive_shell(remote: Remote) -> int:
    """Run an interactive shell on `remote` until it exits; returns its exit status."""
    if remote.kind == "local":
        shell = os.environ.get("SHELL") or ("cmd.exe" if sys.platform == "win32" else "/bin/sh")
        return subprocess.call([shell])
    channel = open_terminal(remote)
    try:
        if sys.platform == "win32":
            _windows_loop(channel)
        else:
            _posix_loop(channel)
        # The output can end a moment before the exit status arrives.
        channel.status_event.wait(5)
        status = channel.exit_status if channel.exit_status_ready() else 0
    except (OSError, EOFError, paramiko.SSHException) as error:
        raise lost_error(remote.description, error) from None
    finally:
        channel.close()
    return status if status >= 0 else 0


def _posix_loop(channel: paramiko.Channel) -> None:
    import select
    import signal
    import termios
    import tty

    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None

    def resize(_signum: int, _frame: object) -> None:
        columns, lines = _terminal_size()
        channel.resize_pty(width=columns, height=lines)

    previous = signal.signal(signal.SIGWINCH, resize)
    try:
        if saved is not None:
            tty.setraw(stdin)
        while True:
            try:
                readable, _, _ = select.select([channel, stdin], [], [], 1.0)
            except InterruptedError:  # a SIGWINCH arrived
                continue
            if channel in readable:
                data = channel.recv(READ_SIZE)
                if not data:
                    return
                os.write(stdout, data)
            if stdin in readable:
                data = os.read(stdin, READ_SIZE)
                if not data:
                    channel.shutdown_write()
                    continue
                channel.sendall(data)
            if channel.exit_status_ready() and not channel.recv_ready():
                return
    finally:
        signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


# Windows console keys arrive as a prefix ("\x00" or "\xe0") and a code; these are the ones a
# shell needs, as the escape sequences an xterm sends.
_WINDOWS_KEYS = {
    "H": "\x1b[A",
    "P": "\x1b[B",
    "M": "\x1b[C",
    "K": "\x1b[D",
    "G": "\x1b[H",
    "O": "\x1b[F",
    "S": "\x1b[3~",
    "I": "\x1b[5~",
    "Q": "\x1b[6~",
}


def _windows_loop(channel: paramiko.Channel) -> None:  # pragma: no cover - needs Windows
    import msvcrt
    import signal

    os.system("")  # turns on the console's ANSI escape processing (Windows 10 and later)
    previous = signal.signal(signal.SIGINT, lambda *_: channel.send(b"\x03"))
    size = _terminal_size()
    try:
        while not channel.closed:
            busy = False
            while channel.recv_ready():
                sys.stdout.buffer.write(channel.recv(READ_SIZE))
                busy = True
            if busy:
                sys.stdout.flush()
            while msvcrt.kbhit():
                key = msvcrt.getwch()
                if key in ("\x00", "\xe0"):
                    key = _WINDOWS_KEYS.get(msvcrt.getwch(), "")
                channel.send(key.encode("utf-8"))
                busy = True
            now = _terminal_size()
            if now != size:
                size = now
                channel.resize_pty(width=now[0], height=now[1])
            if channel.exit_status_ready() and not channel.recv_ready():
                return
            if not busy:
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, previous)
