"""Following a job's events on its machine, by byte offset, through dropped connections.

The worker appends one event per line to `<job dir>/events.jsonl`. The follower asks for the
bytes after the last complete line it has read (`tail -c +OFFSET`, base64-encoded so a PTY
cannot mangle them), keeps only complete lines, and advances its offset past exactly those. A
reconnect resumes from that offset: no event is lost and none is seen twice.

The Optuna journal is append-only too, and is mirrored the same way in the same command, read
just after the events: the copy at home always holds every trial the copied events report, so a
job resumed from it never runs a reported trial again.
"""

from __future__ import annotations

import base64
import contextlib
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hctl.errors import ConnectError, ConnectionLostError, RemoteError, TransferError
from hctl.remote.base import Remote
from hctl_worker.events import EVENTS_FILE, JOURNAL_FILE, decode, split_complete_lines

# One read returns at most this much of each file; a long backlog arrives over a few polls.
MAX_READ_BYTES = 4 * 1024 * 1024
STATUS_MARK = "@@hctl-worker:"
JOURNAL_MARK = "@@hctl-journal"
# Written by the shell that runs the worker (see `launch.launch_command`); it lives exactly as
# long as the worker does, whatever the worker does with its own pid file.
LAUNCHER_PID_FILE = "launcher.pid"
EXIT_FILE = "worker.exit"  # the worker's exit status, written by the launcher when it ends
# Touched by every read: a pod only stops itself when no controller has looked for a while.
ATTACHED_FILE = ".attached"
# Present while a controller exports the chosen trial (see `launch.self_stop_command`).
FINISHING_FILE = ".finishing"
RECONNECT_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


@dataclass
class Chunk:
    """Bytes after the offsets, and whether the worker's process was alive when they were read."""

    data: bytes  # of the events file
    worker_alive: bool | None  # None: unknown (no pid file yet)
    journal: bytes = b""  # of the Optuna journal, read after the events


class JobChannel(Protocol):
    """How the controller reads a job directory on its machine."""

    def read(self, offset: int, journal_offset: int | None = None) -> Chunk: ...

    def fetch(self, name: str, local_path: Path) -> bool:
        """Copy a file of the job directory home; False when it does not exist (yet)."""
        ...

    def close(self) -> None: ...


def running_test(job_dir: str) -> str:
    """A shell condition: true while the job's launcher (hence its worker) runs.

    The launcher writes `worker.exit` when the worker ends; a launcher killed outright fails
    `kill -0`; and one left a zombie by an init that does not reap (containers) shows state Z.
    """
    pid_file = shlex.quote(f"{job_dir}/{LAUNCHER_PID_FILE}")
    exit_file = shlex.quote(f"{job_dir}/{EXIT_FILE}")
    return (
        f'{{ [ -s {pid_file} ] && [ ! -f {exit_file} ] && kill -0 "$(cat {pid_file})" 2>/dev/null '
        f"&& ! grep -qs '^State:.*Z' \"/proc/$(cat {pid_file})/status\"; }}"
    )


def _tail(path: str, offset: int, max_bytes: int) -> str:
    return f"(tail -c +{offset + 1} {shlex.quote(path)} 2>/dev/null | head -c {max_bytes} | base64)"


def read_command(
    job_dir: str, offset: int, journal_offset: int | None = None, max_bytes: int = MAX_READ_BYTES
) -> str:
    """The shell command that prints the events after `offset`, the journal after
    `journal_offset` (read after the events, so it covers every trial they report), and whether
    the worker is alive."""
    pid = shlex.quote(f"{job_dir}/{LAUNCHER_PID_FILE}")
    journal = ""
    if journal_offset is not None:
        journal = (
            f"echo; echo '{JOURNAL_MARK}'; "
            + _tail(f"{job_dir}/{JOURNAL_FILE}", journal_offset, max_bytes)
            + "; "
        )
    attached = shlex.quote(f"{job_dir}/{ATTACHED_FILE}")
    return (
        f"touch {attached} 2>/dev/null; "
        + _tail(f"{job_dir}/{EVENTS_FILE}", offset, max_bytes)
        + f"; {journal}echo; if [ ! -f {pid} ]; then echo '{STATUS_MARK}unknown'; "
        f"elif {running_test(job_dir)}; then echo '{STATUS_MARK}alive'; "
        f"else echo '{STATUS_MARK}dead'; fi"
    )


def _decode_base64(text: str) -> bytes:
    # Drop the line breaks (and a PTY's carriage returns) between base64 blocks first.
    cleaned = "".join(character for character in text if not character.isspace())
    return base64.b64decode(cleaned) if cleaned else b""


def parse_read_output(output: str) -> Chunk:
    """Decode what `read_command` printed; a reply without the status line was cut short."""
    encoded, mark, status = output.partition(STATUS_MARK)
    if not mark:
        raise ConnectionLostError("The reply to an event read was cut short.")
    events, _, journal = encoded.partition(JOURNAL_MARK)
    state = status.strip().split()[0] if status.strip() else "unknown"
    alive = {"alive": True, "dead": False}.get(state)
    return Chunk(data=_decode_base64(events), worker_alive=alive, journal=_decode_base64(journal))


class RemoteJobChannel:
    """A job directory on a machine reached through a `Remote`."""

    def __init__(self, remote: Remote, job_dir: str) -> None:
        self.remote = remote
        self.job_dir = job_dir

    def read(self, offset: int, journal_offset: int | None = None) -> Chunk:
        result = self.remote.run(read_command(self.job_dir, offset, journal_offset), timeout=60)
        return parse_read_output(result.output)

    def fetch(self, name: str, local_path: Path) -> bool:
        path = f"{self.job_dir}/{name}"
        check = self.remote.run(f"test -f {shlex.quote(path)}", timeout=30)
        if check.exit_code != 0:
            return False
        local_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = local_path.with_name(local_path.name + ".part")
        self.remote.get(path, temporary)
        temporary.replace(local_path)
        return True

    def close(self) -> None:
        self.remote.close()


@dataclass
class Poll:
    """What one poll brought: the new events (parsed) and the raw lines they came from."""

    events: list = field(default_factory=list)
    raw: bytes = b""
    worker_alive: bool | None = None
    journal_raw: bytes = b""  # complete journal lines after the journal offset


class Follower:
    """Reads a job's new events, reconnecting with backoff when the connection drops."""

    def __init__(
        self,
        connect: Callable[[], JobChannel],
        *,
        offset: int = 0,
        journal_offset: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        give_up_after_s: float = 900.0,
        on_reconnect: Callable[[str], None] | None = None,
    ) -> None:
        self._connect = connect
        self._channel: JobChannel | None = None
        self.offset = offset
        self.journal_offset = journal_offset  # None: the journal is not mirrored
        self._sleep = sleep
        self._clock = clock
        self._give_up_after_s = give_up_after_s
        self._on_reconnect = on_reconnect
        self.reconnects = 0

    def poll(self) -> Poll:
        """The complete events (and journal lines) after the offsets, which move past exactly
        those."""
        chunk = self._with_reconnect(lambda channel: channel.read(self.offset, self.journal_offset))
        lines, consumed = split_complete_lines(chunk.data)
        raw = chunk.data[:consumed]
        self.offset += consumed
        journal_raw = b""
        if self.journal_offset is not None:
            _, journal_consumed = split_complete_lines(chunk.journal)
            journal_raw = chunk.journal[:journal_consumed]
            self.journal_offset += journal_consumed
        return Poll(
            events=[decode(line) for line in lines],
            raw=raw,
            worker_alive=chunk.worker_alive,
            journal_raw=journal_raw,
        )

    def fetch(self, name: str, local_path: Path) -> bool:
        return self._with_reconnect(lambda channel: channel.fetch(name, local_path))

    def close(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(RemoteError):
                self._channel.close()
            self._channel = None

    def _with_reconnect(self, action: Callable[[JobChannel], object]):  # noqa: ANN202
        failing_since: float | None = None
        attempt = 0
        while True:
            try:
                if self._channel is None:
                    self._channel = self._connect()
                return action(self._channel)
            except (ConnectionLostError, ConnectError, TransferError) as error:
                self.close()
                now = self._clock()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= self._give_up_after_s:
                    raise ConnectionLostError(
                        f"Lost the connection to the job and could not reconnect: {error.message}",
                        "The job keeps running on its machine; reattach with `hctl attach JOB`.",
                    ) from None
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                attempt += 1
                self.reconnects += 1
                if self._on_reconnect is not None:
                    self._on_reconnect(
                        f"connection lost ({error.message}); retrying in {delay:.0f}s"
                    )
                self._sleep(delay)
