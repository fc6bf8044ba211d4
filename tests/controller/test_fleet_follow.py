"""Following a job on several pods as one: every pod's events in one poll, alive while any pod's
workers are; a pod that stops answering and no longer runs is left out (the others go on), and
the loss of the first pod, which holds the study's database, ends the job with a plain message.
The trials a lost pod finished but whose lines never arrived are read from the study."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from hctl.errors import ConnectionLostError, PodNotFoundError, RemoteError
from hctl.providers.base import Pod, PodStatus
from hctl.services.fleet_follow import (
    DatabaseLostError,
    FleetFollower,
    check_database_pod,
    trial_numbers,
)
from hctl.services.follow import Poll
from hctl.services.jobs import JobRecord, JobStore, PodMember
from hctl_worker.events import StartEvent, TrialEvent, encode, read_events
from hctl_worker.trials import legacy_scores


class FakeFollower:
    """A pod's follower: its polls in turn; an exception in the list is raised."""

    def __init__(self, polls: list) -> None:
        self.polls = polls
        self.closed = False

    def poll(self) -> Poll:
        item = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self.closed = True


class FakeProvider:
    def __init__(self, statuses: dict[str, PodStatus | None]) -> None:
        self.statuses = statuses

    def get(self, pod_id: str) -> Pod:
        status = self.statuses[pod_id]
        if status is None:
            raise PodNotFoundError(f"No pod {pod_id}.")
        return Pod(id=pod_id, name=pod_id, status=status)


def _poll(worker: str, alive: bool | None) -> Poll:
    event = StartEvent(worker=worker, model="m", n_trials=4, job_id="j", worker_version="0")
    line = encode(event).encode() + b"\n"
    return Poll(events=[event], raw=line, worker_alive=alive)


def _trial(number: int, worker: str) -> TrialEvent:
    return TrialEvent(number=number, worker=worker, run_by=worker, n_trials=4, params={},
                      scores=legacy_scores(3, 8, 0.01 * number), seconds=1.0)  # fmt: skip


def _trial_poll(worker: str, *numbers: int) -> Poll:
    events = [_trial(number, worker) for number in numbers]
    raw = b"".join(encode(event).encode() + b"\n" for event in events)
    return Poll(events=events, raw=raw, worker_alive=True)


def _follow(
    tmp_path: Path, followers: list[FakeFollower], statuses: dict, read_study=list
) -> tuple:
    record = JobRecord(
        job_id="1129-2200-ab12", model="m", worker_model="m", n_trials=4, target="pod",
        remote_job_dir="/v/jobs/1129-2200-ab12-pod1", database_dir="/v/databases/1129-2200-ab12",
        members=[PodMember(pod_id=f"pod{index + 1}", remote_job_dir=f"/v/jobs/x-pod{index + 1}",
                           first_worker=index + 1) for index in range(len(followers))],
    )  # fmt: skip
    store = JobStore(tmp_path / "jobs")
    store.save(record)
    toolkit = SimpleNamespace(store=store, provider=lambda: FakeProvider(statuses))
    notes: list[str] = []
    made = iter(followers)
    fleet = FleetFollower(record, toolkit, lambda view, offset: next(made), notes.append,  # type: ignore[arg-type]
                          set(), read_study=read_study)  # fmt: skip
    return fleet, record, notes, store


def test_one_poll_brings_every_pods_events_and_is_alive_while_any_pod_is(tmp_path: Path) -> None:
    pods = [FakeFollower([_poll("1", False)]), FakeFollower([_poll("2", True)])]
    fleet, _, _, _ = _follow(tmp_path, pods, {})
    poll = fleet.poll()
    assert [event.worker for event in poll.events] == ["1", "2"]
    assert poll.worker_alive is True and set(poll.parts) == {0, 1}
    assert poll.raw == poll.parts[0] + poll.parts[1]


def test_a_pod_that_no_longer_runs_is_left_out_and_the_others_go_on(tmp_path: Path) -> None:
    lost = ConnectionLostError("The connection dropped.")
    pods = [FakeFollower([_poll("1", True)]), FakeFollower([lost])]
    fleet, record, notes, store = _follow(tmp_path, pods, {"pod2": None})
    poll = fleet.poll()
    assert [event.worker for event in poll.events] == ["1"] and poll.worker_alive is True
    assert pods[1].closed and "pod pod2 is terminated: the other pods go on" in notes[0]
    assert store.load(record.job_id).members[1].lost == "terminated mid-search"
    assert fleet.poll().worker_alive is True  # pod 2 is not asked again
    assert pods[1].polls == [lost]


def test_a_pod_that_still_runs_but_does_not_answer_is_asked_again(tmp_path: Path) -> None:
    pods = [FakeFollower([_poll("1", True)]),
            FakeFollower([ConnectionLostError("dropped"), _poll("2", True)])]  # fmt: skip
    fleet, record, notes, _ = _follow(tmp_path, pods, {"pod2": PodStatus.RUNNING})
    fleet.poll()
    assert "pod pod2 does not answer" in notes[0] and not record.members[1].lost
    assert [event.worker for event in fleet.poll().events] == ["1", "2"]
    assert notes[-1] == "pod pod2 answers again"


@pytest.mark.parametrize(
    ("status", "kept"),
    [(None, "its volume went with it"), (PodStatus.STOPPED, "its volume keeps the study's")],
)
def test_losing_the_first_pod_says_the_database_was_on_it(
    tmp_path: Path, status: PodStatus | None, kept: str
) -> None:
    pods = [FakeFollower([ConnectionLostError("dropped")]), FakeFollower([_poll("2", True)])]
    fleet, _, _, _ = _follow(tmp_path, pods, {"pod1": status})
    with pytest.raises(DatabaseLostError) as raised:
        fleet.poll()
    message = raised.value.message
    assert "pod pod1, which held the study's database" in message and kept in message
    assert "the other pods cannot go on without it and are released" in message


def test_the_database_pod_is_checked_when_every_worker_went_quiet(tmp_path: Path) -> None:
    pods = [FakeFollower([_poll("1", False)]), FakeFollower([_poll("2", False)])]
    _, record, _, store = _follow(tmp_path, pods, {"pod1": PodStatus.RUNNING})
    toolkit = SimpleNamespace(
        store=store, provider=lambda: FakeProvider({"pod1": PodStatus.RUNNING})
    )
    check_database_pod(record, toolkit)  # type: ignore[arg-type]  # runs: nothing to say
    stopped = SimpleNamespace(
        store=store, provider=lambda: FakeProvider({"pod1": PodStatus.STOPPED})
    )
    with pytest.raises(DatabaseLostError, match="pod pod1, which held the study's database"):
        check_database_pod(record, stopped)  # type: ignore[arg-type]
    assert store.load(record.job_id).members[0].lost == "stopped mid-search"


def test_the_trials_a_lost_pod_finished_unseen_are_read_from_the_study(tmp_path: Path) -> None:
    """Pod 2 finished trials 2 and 3 and was lost before their lines arrived: the poll that finds
    it lost brings them from the study (once, with a note), and none shown before comes again.
    Pod 1's trial 4, not yet read from pod 1, comes from pod 1 (or, at the search's end, from
    the study)."""
    study = [_trial(1, "1"), _trial(2, "2"), _trial(3, "2"), _trial(4, "1")]
    reads: list[int] = []

    def read_study() -> list[TrialEvent]:
        reads.append(1)
        return study

    lost = ConnectionLostError("The connection dropped.")
    pods = [FakeFollower([_trial_poll("1", 1), _trial_poll("1")]),
            FakeFollower([lost])]  # fmt: skip
    fleet, _, notes, _ = _follow(tmp_path, pods, {"pod2": None}, read_study)
    poll = fleet.poll()  # pod 2 found lost in this poll: the study is read at its end
    trials = [event for event in poll.events if isinstance(event, TrialEvent)]
    assert [(event.number, event.worker) for event in trials] == [(1, "1"), (2, "2"), (3, "2")]
    recovered = b"".join(encode(event).encode() + b"\n" for event in trials[1:])
    assert poll.raw == poll.parts[0] + recovered  # merged copy: pod 1's lines, then the study's
    assert set(poll.parts) == {0} and recovered not in poll.parts[0]  # pod 1's own copy
    assert "read from the study: trial 2, 3" in notes[-1]
    assert reads == [1]
    assert fleet.poll().events == [] and reads == [1]  # read once per loss
    assert [event.number for event in fleet.recover().events] == [4]  # at the search's end


def test_a_study_that_cannot_be_read_leaves_a_note_and_the_search_goes_on(tmp_path: Path) -> None:
    def read_study() -> list[TrialEvent]:
        raise RemoteError("`hctl-worker trials` failed: no database")

    lost = ConnectionLostError("The connection dropped.")
    pods = [FakeFollower([_trial_poll("1", 1)]), FakeFollower([lost])]
    fleet, _, notes, _ = _follow(tmp_path, pods, {"pod2": None}, read_study)
    assert [event.number for event in fleet.poll().events] == [1]
    assert "could not read the study's trials on pod pod1" in notes[-1]
    assert "no database" in notes[-1]
    assert fleet.recover().events == []


def test_the_study_is_read_at_the_end_only_when_a_pod_was_lost_or_silent(tmp_path: Path) -> None:
    """Every pod answered to the end: their events hold every trial, nothing is read. A pod that
    stopped answering (not known lost) may have taken lines with it: the study is read."""
    reads: list[int] = []

    def read_study() -> list[TrialEvent]:
        reads.append(1)
        return [_trial(1, "1"), _trial(2, "2")]

    pods = [FakeFollower([_trial_poll("1", 1)]), FakeFollower([_trial_poll("2")])]
    fleet, _, _, _ = _follow(tmp_path, pods, {}, read_study)
    fleet.poll()
    assert fleet.recover().events == [] and not reads
    silent = [FakeFollower([_trial_poll("1", 1)]), FakeFollower([ConnectionLostError("dropped")])]
    fleet, _, _, _ = _follow(tmp_path / "silent", silent, {"pod2": PodStatus.RUNNING}, read_study)
    fleet.poll()
    assert [event.number for event in fleet.recover().events] == [2] and reads == [1]


def test_the_trials_shown_before_a_restart_are_not_read_again(tmp_path: Path) -> None:
    """A controller attached again knows the trials its copy of the events holds."""
    study = [_trial(1, "1"), _trial(2, "2"), _trial(3, "2")]
    pods = [FakeFollower([_trial_poll("1")]), FakeFollower([_trial_poll("2")])]
    _, record, _, store = _follow(tmp_path, pods, {}, lambda: study)
    store.append_events(record.job_id, _trial_poll("2", 2).raw)
    record.members[1].lost = "terminated mid-search"
    shown = trial_numbers(read_events(store.events_path(record.job_id))[0])  # as sync.py does
    again = FleetFollower(record, SimpleNamespace(store=store), lambda view, offset: pods[0],  # type: ignore[arg-type]
                          lambda message: None, shown, read_study=lambda: study)  # fmt: skip
    assert [event.number for event in again.recover().events] == [1, 3]
