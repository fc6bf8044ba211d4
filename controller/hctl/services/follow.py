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

import contextlib
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hctl.errors import ConnectError, ConnectionLostError, RemoteError, TransferError
from hctl.remote.base import Remote
from hctl.services.job_protocol import Chunk, parse_read_output, read_command
from hctl_worker.events import decode, split_complete_lines

RECONNECT_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class JobChannel(Protocol):
    """How the controller reads a job directory on its machine."""

    def read(self, offset: int, journal_offset: int | None = None) -> Chunk: ...

    def fetch(self, name: str, local_path: Path) -> bool:
        """Copy a file of the job directory home; False when it does not exist (yet)."""
        ...

    def close(self) -> None: ...


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
    parts: dict[int, bytes] = field(default_factory=dict)  # several pods: each pod's new lines


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

    def recover(self) -> Poll:
        """Events the search's end shows were never read: none, one machine's events file
        being the whole record (see `FleetFollower.recover` for several pods)."""
        return Poll(worker_alive=None)

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
