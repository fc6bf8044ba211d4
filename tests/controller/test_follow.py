"""Following events by byte offset through dropped connections: nothing lost, nothing twice."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from hctl.errors import ConnectionLostError
from hctl.services.follow import Follower, RemoteJobChannel
from hctl.services.job_protocol import STATUS_MARK, parse_read_output
from hctl_worker.events import EventWriter, TrialEvent, encode
from tests.e2e.fakes import ShellRemote


def trial(number: int) -> TrialEvent:
    return TrialEvent(
        number=number,
        n_trials=10,
        params={"scale": 0.5},
        kl=0.01 * number,
        refusals=10 - number,
        total_bad=10,
        seconds=1.0,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_pty_mangled_reply_still_decodes_exactly() -> None:
    data = b'{"a": 1}\n{"b": "\xc3\xa9"}\n'
    encoded = base64.encodebytes(data).decode().replace("\n", "\r\n")
    chunk = parse_read_output(f"{encoded}\r\n{STATUS_MARK}alive\r\n")
    assert chunk.data == data and chunk.worker_alive is True
    assert parse_read_output(f"\n{STATUS_MARK}unknown\n").worker_alive is None
    with pytest.raises(ConnectionLostError):
        parse_read_output("AAAA")  # the status line never came: the reply was cut short


def test_every_event_arrives_once_across_drops_and_partial_lines(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    writer = EventWriter(job_dir / "events.jsonl")
    (job_dir / "launcher.pid").write_text("999999999")  # no such process: the worker is "dead"
    calls = {"count": 0}

    def flaky(command: str) -> bool:
        calls["count"] += 1
        return calls["count"] in {2, 3, 6}  # drop the connection on these calls

    remotes: list[ShellRemote] = []

    def connect() -> RemoteJobChannel:
        remotes.append(ShellRemote(fail_on=flaky))
        return RemoteJobChannel(remotes[-1], str(job_dir))

    clock = Clock()
    follower = Follower(connect, sleep=clock.sleep, clock=clock)
    seen: list[int] = []
    for number in range(1, 4):
        writer.emit(trial(number))
    # A line the worker is still writing is not consumed.
    with (job_dir / "events.jsonl").open("a") as handle:
        handle.write(encode(trial(4))[:20])
    for _ in range(3):
        seen += [event.number for event in follower.poll().events]
    assert seen == [1, 2, 3]
    offset_before = follower.offset
    with (job_dir / "events.jsonl").open("a") as handle:
        handle.write(encode(trial(4))[20:] + "\n")
    writer.close()  # the worker restarts: its successor's events follow
    writer2 = EventWriter(job_dir / "events.jsonl")
    for number in range(5, 8):
        writer2.emit(trial(number))
    for _ in range(4):
        poll = follower.poll()
        seen += [event.number for event in poll.events]
    assert seen == [1, 2, 3, 4, 5, 6, 7]
    assert follower.offset > offset_before
    assert follower.reconnects == 3 and clock.sleeps == [1.0, 2.0, 1.0]
    assert all(remote.closed for remote in remotes[:-1])
    assert poll.worker_alive is False


def test_the_follower_gives_up_after_its_limit_with_a_reattach_hint(tmp_path: Path) -> None:
    clock = Clock()

    def connect() -> RemoteJobChannel:
        return RemoteJobChannel(ShellRemote(fail_on=lambda command: True), str(tmp_path))

    follower = Follower(connect, sleep=clock.sleep, clock=clock, give_up_after_s=60)
    with pytest.raises(ConnectionLostError) as raised:
        follower.poll()
    assert "hctl attach" in raised.value.hint
    assert clock.now >= 60


def test_fetch_copies_a_file_home_and_reports_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "study.journal").write_text("journal")
    channel = RemoteJobChannel(ShellRemote(), str(tmp_path))
    assert channel.fetch("study.journal", tmp_path / "home" / "copy")
    assert (tmp_path / "home" / "copy").read_text() == "journal"
    assert not channel.fetch("missing", tmp_path / "home" / "missing")


def test_the_journal_is_mirrored_with_the_events_and_covers_them(tmp_path: Path) -> None:
    (tmp_path / "study.journal").write_bytes(b'{"op": 1}\n{"op": 2}\n{"op"')
    writer = EventWriter(tmp_path / "events.jsonl")
    writer.emit(trial(1))
    follower = Follower(lambda: RemoteJobChannel(ShellRemote(), str(tmp_path)), journal_offset=0)
    first = follower.poll()
    assert [event.number for event in first.events] == [1]
    assert first.journal_raw == b'{"op": 1}\n{"op": 2}\n'  # the half-written line waits
    with (tmp_path / "study.journal").open("ab") as handle:
        handle.write(b": 3}\n")
    second = follower.poll()
    assert second.events == [] and second.journal_raw == b'{"op": 3}\n'
    assert follower.journal_offset == (tmp_path / "study.journal").stat().st_size
