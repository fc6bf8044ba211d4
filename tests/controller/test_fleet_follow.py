"""Following a job on several pods as one: every pod's events in one poll, alive while any pod's
workers are; a pod that stops answering and no longer runs is left out (the others go on), and
the loss of the first pod, which holds the study's database, ends the job with a plain message."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from hctl.errors import ConnectionLostError, PodNotFoundError
from hctl.providers.base import Pod, PodStatus
from hctl.services.fleet_follow import DatabaseLostError, FleetFollower, check_database_pod
from hctl.services.follow import Poll
from hctl.services.jobs import JobRecord, JobStore, PodMember
from hctl_worker.events import StartEvent, encode


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


def _follow(tmp_path: Path, followers: list[FakeFollower], statuses: dict) -> tuple:
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
    fleet = FleetFollower(record, toolkit, lambda view, offset: next(made), notes.append)  # type: ignore[arg-type]
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
